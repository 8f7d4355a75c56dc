"""The viewer's picture of a prediction: utils.visualize's caption (the same as infer.py's) on the
image, in the window's language, converted to a QImage for display.

Small images are enlarged by a whole factor, nearest-neighbour, before the caption is drawn: each
source pixel becomes an exact k x k block, so the window (and the saved copy) show the real pixels
rather than a blur, and the window can draw a grid on the pixel borders.

Everything here is thread-safe (numpy and QImage, no QPixmap), so the worker uses the same
function to write the annotated copies that the window shows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PyQt5.QtGui import QImage

from ui_classification.results import ImagePrediction
from ui_classification.strings import Text
from utils.files import unique_path
from utils.visualize import CORRECT, NEUTRAL, WRONG, caption_bar, save_rgb

MIN_SIDE = 320  # smaller images are enlarged first, so the caption stays legible (digits are 32 px)
SAVE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")  # kept on save; other formats are saved as PNG


def to_qimage(array: np.ndarray) -> QImage:
    """RGB uint8 HWC array (what utils.data.read_rgb returns) -> a QImage that owns its pixels."""
    array = np.ascontiguousarray(array)
    height, width = array.shape[:2]
    return QImage(array.data, width, height, 3 * width, QImage.Format_RGB888).copy()


def caption_lines(item: ImagePrediction, class_names: Sequence[str], text: Text) -> list[str]:
    """The text drawn on the image: prediction and probability, then the true class when known."""
    key = "overlay_unknown" if item.unknown else "overlay_prediction"
    lines = [text(key, name=class_names[item.predicted_index], probability=f"{item.probability:.1%}")]
    if item.true_index is not None:
        lines.append(text("overlay_truth", name=class_names[item.true_index], mark="✓" if item.correct else "✗"))
    return lines


def enlarge_nearest(array: np.ndarray, min_side: int = MIN_SIDE) -> tuple[np.ndarray, int]:
    """(image, k): enlarged k times, nearest-neighbour, the smallest whole k that brings the longer
    side to `min_side` (k = 1 for an image that big already). Both sides stay under 2 * min_side."""
    height, width = array.shape[:2]
    factor = max(1, -(-min_side // max(height, width, 1)))
    if factor == 1:
        return array, 1
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1), factor


@dataclass
class Picture:
    """What the window shows: the caption bar and, below it, the image enlarged `pixel` times."""

    bar: np.ndarray  # RGB uint8
    image: np.ndarray  # RGB uint8, every source pixel a pixel x pixel block
    pixel: int


def picture(array: np.ndarray, item: ImagePrediction, class_names: Sequence[str], text: Text) -> Picture:
    """The image (RGB array) and its caption bar: green when right, red when wrong, grey when unknown."""
    image, factor = enlarge_nearest(array)
    colour = NEUTRAL if item.correct is None else CORRECT if item.correct else WRONG
    # the bar alone: joined to the image only on save, a 12 MP photo is not copied at every key
    return Picture(caption_bar(image.shape[1], caption_lines(item, class_names, text), colour), image, factor)


def annotate(array: np.ndarray, item: ImagePrediction, class_names: Sequence[str], text: Text) -> np.ndarray:
    """The picture as one RGB array, caption bar above the image (the saved annotated copies)."""
    shown = picture(array, item, class_names, text)
    return np.concatenate([shown.bar, shown.image], axis=0)


def save_annotated(image: np.ndarray, folder: str | os.PathLike, source_path: str) -> str:
    """Save under the source's file name, made unique in `folder`; returns the path, or "" on failure."""
    stem, suffix = os.path.splitext(os.path.basename(source_path))
    if suffix.lower() not in SAVE_SUFFIXES:
        suffix = ".png"
    path = unique_path(folder, stem + suffix)
    try:
        save_rgb(path, image)
    except (OSError, ValueError):
        return ""
    return path
