"""Pictures of predictions: an image with its label drawn above it, and grids of such images.

Shared by infer.py and the UI. Images are RGB uint8 arrays (H, W, 3), as utils.data.read_rgb
returns them. Text is drawn with Pillow and a TrueType font (DejaVu Sans ships with matplotlib,
so it is always there; a CJK font is used for CJK class names when the system has one), so
class names outside ASCII render, which OpenCV's putText cannot do.

    tile = annotate(image, caption_lines("daisy", 0.9913, true_name="rose"), WRONG)
    save_rgb("out.jpg", make_grid([tile, ...], columns=5))
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Colour = tuple[int, int, int]
CORRECT: Colour = (30, 140, 50)  # caption bar of a right answer on a labelled image
WRONG: Colour = (200, 30, 30)  # ... of a wrong one
NEUTRAL: Colour = (40, 40, 40)  # ... when the truth is unknown
GRID_BACKGROUND = 255
_CJK_FONT_FILES = (  # tried in order when a caption has CJK characters
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/simhei.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Medium.ttc",
)


def caption_lines(name: str, probability: float, true_name: Optional[str] = None) -> list[str]:
    """["daisy 99.13%"] or, with the truth known, ["daisy 99.13%", "true: rose"]."""
    lines = [f"{name} {probability:.2%}"]
    if true_name is not None:
        lines.append(f"true: {true_name}")
    return lines


def caption_colour(predicted: str, true_name: Optional[str]) -> Colour:
    if true_name is None:
        return NEUTRAL
    return CORRECT if predicted == true_name else WRONG


def annotate(image: np.ndarray, lines: Sequence[str], colour: Colour = NEUTRAL, min_side: int = 0) -> np.ndarray:
    """A copy of `image` with a caption bar above it (the image itself stays uncovered).

    `min_side`: enlarge smaller images first, so a 32-pixel digit still gets a readable label.
    """
    image = _enlarge(image, min_side)
    return np.concatenate([caption_bar(image.shape[1], lines, colour), image], axis=0)


def caption_bar(width: int, lines: Sequence[str], colour: Colour = NEUTRAL) -> np.ndarray:
    """The bar that `annotate` draws above an image `width` pixels wide (RGB uint8): white text,
    about 1/16 of the width high per line."""
    font = _fitting_font(lines, width)
    line_height = _line_height(font)
    pad = max(2, line_height // 4)
    bar = Image.new("RGB", (width, pad * 2 + line_height * len(lines)), colour)
    draw = ImageDraw.Draw(bar)
    for row, line in enumerate(lines):
        draw.text((pad, pad + row * line_height), _clip(line, font, width - 2 * pad), fill=(255, 255, 255), font=font)
    return np.asarray(bar)


GRID_TILE_SIDE = 224  # prediction_grid's tiles; a reader may decode large JPEGs down to it (read_rgb's min_size)


def fit_tile(image: np.ndarray, side: int) -> np.ndarray:
    """Resize into a side x side square keeping the aspect ratio; the rest is background."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    tile = np.full((side, side, 3), GRID_BACKGROUND, dtype=np.uint8)
    top, left = (side - new_h) // 2, (side - new_w) // 2
    tile[top:top + new_h, left:left + new_w] = resized
    return tile


def make_grid(tiles: Sequence[np.ndarray], columns: int = 5, gap: int = 6) -> np.ndarray:
    """Tiles of any sizes in rows of `columns`, each cell as large as the largest tile."""
    if not tiles:
        raise ValueError("make_grid needs at least one tile")
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    cell_h = max(t.shape[0] for t in tiles)
    cell_w = max(t.shape[1] for t in tiles)
    grid = np.full((rows * cell_h + (rows + 1) * gap, columns * cell_w + (columns + 1) * gap, 3),
                   GRID_BACKGROUND, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        top = gap + (i // columns) * (cell_h + gap)
        left = gap + (i % columns) * (cell_w + gap)
        grid[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
    return grid


def prediction_grid(images: Sequence[np.ndarray], captions: Sequence[Sequence[str]], colours: Sequence[Colour],
                    tile_side: int = GRID_TILE_SIDE, columns: int = 5) -> np.ndarray:
    """The usual picture: each image fitted to a square tile with its caption bar above it."""
    tiles = [annotate(fit_tile(image, tile_side), lines, colour)
             for image, lines, colour in zip(images, captions, colours)]
    return make_grid(tiles, columns)


def save_rgb(path: str | os.PathLike, image: np.ndarray, quality: int = 95) -> Path:
    """Write an RGB array (swapped to OpenCV's BGR, so colours stay right) to .jpg/.png/...;
    through bytes, so non-ASCII paths work on every OS."""
    path = Path(path)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in (".jpg", ".jpeg") else []
    ok, data = cv2.imencode(path.suffix, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"cannot encode an image as {path.suffix!r}")
    data.tofile(str(path))
    return path


def display_available() -> bool:
    """Whether a window can open: always on Windows and macOS, on Linux only with X11 or Wayland."""
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def show_image(image: np.ndarray, title: str) -> Optional[str]:
    """Show `image` in a window until it is closed; returns why it could not, or None."""
    if not display_available():
        return "no display (DISPLAY/WAYLAND_DISPLAY unset)"
    import matplotlib
    from matplotlib.backends import BackendFilter, backend_registry

    if matplotlib.get_backend().lower() in backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE):
        return f"matplotlib backend {matplotlib.get_backend()!r} cannot open windows"
    try:
        import matplotlib.pyplot as plt  # pyplot only here: it is the one place a window opens

        figure = plt.figure(title)
        plt.imshow(image)
        plt.axis("off")
        plt.show()
        plt.close(figure)
    except Exception as error:  # any GUI toolkit failure: the saved file is what matters
        return f"{type(error).__name__}: {error}"
    return None


def _enlarge(image: np.ndarray, min_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    if max(height, width) >= min_side:
        return image
    scale = min_side / max(height, width)
    return cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_CUBIC)


def _fitting_font(lines: Sequence[str], width: int) -> ImageFont.FreeTypeFont:
    """About 1/16 of the width, smaller for long lines, never below 10 px."""
    needs_cjk = any(_is_cjk(char) for line in lines for char in line)
    size = max(10, min(48, width // 16))
    font = _font(size, needs_cjk)
    longest = max(font.getlength(line) for line in lines)
    if longest > width * 0.95 and size > 10:
        font = _font(max(10, int(size * width * 0.95 / longest)), needs_cjk)
    return font


@lru_cache(maxsize=32)
def _font(size: int, cjk: bool) -> ImageFont.FreeTypeFont:
    candidates = [p for p in _CJK_FONT_FILES if os.path.isfile(p)] if cjk else []
    candidates.append(_dejavu_path())
    for candidate in candidates:
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    return ImageFont.load_default(size)  # type: ignore[return-value]


def new_figure(**kwargs) -> Figure:
    """A matplotlib Figure for a PNG (no pyplot: works headless and in threads) whose text falls
    back to an installed CJK font (the one the pictures use), so class names such as 猫 are drawn
    instead of empty boxes and a glyph warning per character."""
    from matplotlib.figure import Figure

    _add_cjk_fallback_font()
    return Figure(**kwargs)


@lru_cache(maxsize=1)
def _add_cjk_fallback_font() -> None:
    import matplotlib
    from matplotlib import font_manager

    for path in _CJK_FONT_FILES:
        if not os.path.isfile(path):
            continue
        try:
            font_manager.fontManager.addfont(path)
            name = font_manager.FontProperties(fname=path).get_name()
        except (OSError, RuntimeError, ValueError):  # an unreadable font file: try the next
            continue
        # matplotlib draws each character with the first family of the list that has it
        families = [f for f in matplotlib.rcParams["font.family"] if f != name]
        matplotlib.rcParams["font.family"] = [*families, name]
        return


def _dejavu_path() -> str:
    """The font file inside matplotlib's package folder, found without importing matplotlib (a
    second of start-up that infer.py's pictures would otherwise pay)."""
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
        if os.path.isfile(path):
            return path
    import matplotlib  # an unusual install: ask matplotlib itself

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent


def _clip(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """Cut `text` with an ellipsis so it fits `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _is_cjk(char: str) -> bool:
    return "\u2e80" <= char <= "\u9fff" or "\uac00" <= char <= "\ud7af" or "\uf900" <= char <= "\ufaff"
