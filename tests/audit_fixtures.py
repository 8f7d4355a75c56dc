"""A generated dataset with planted faults for the audit tests and bench/bench_audit.py.

Each image is a scene: smooth random shading, a few grey discs, and one coloured object whose
shape and colour give the class (red disc, green square, blue triangle, ...). The backgrounds
differ per image, so perceptual hashes of unrelated images are far apart, as with photos.

Planted: label flips (an image of class A filed under B), near-duplicate copies in another
split (resized, JPEG-recompressed, slightly cropped), exact copies (same bytes), one file that
is not an image and one empty file. `Planted` lists them all.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

CLASS_NAMES = ("disc", "square", "triangle", "star")
_COLOURS = ((215, 50, 50), (50, 185, 60), (60, 80, 215), (225, 195, 40))


@dataclass
class Planted:
    """What was planted, as paths (str) inside the generated tree."""

    flipped: list[str] = field(default_factory=list)  # filed under the wrong class
    near_pairs: list[tuple[str, str, str]] = field(default_factory=list)  # (original, copy, how)
    exact_pairs: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    @property
    def duplicate_pairs(self) -> set[frozenset]:
        pairs = [(a, b) for a, b, _ in self.near_pairs] + self.exact_pairs
        return {frozenset(pair) for pair in pairs}


def scene(rng: np.random.Generator, label: int, side: int = 64) -> np.ndarray:
    """One RGB uint8 image of class `label`."""
    shading = cv2.resize(rng.integers(30, 226, (3, 3, 3), dtype=np.uint8), (side, side), interpolation=cv2.INTER_CUBIC)
    grey = shading.mean(axis=2, keepdims=True)
    shading = (0.35 * shading + 0.65 * grey).astype(np.uint8)  # muted background: the object's colour stands out
    for _ in range(4):
        grey = int(rng.integers(0, 256))
        centre = (int(rng.integers(0, side)), int(rng.integers(0, side)))
        cv2.circle(shading, centre, int(rng.integers(3, side // 5)), (grey, grey, grey), -1)
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in _COLOURS[label])
    radius = int(rng.integers(side // 5, side // 3))
    cx, cy = (int(v) for v in rng.integers(radius, side - radius, 2))
    if label == 0:
        cv2.circle(shading, (cx, cy), radius, colour, -1)
    elif label == 1:
        cv2.rectangle(shading, (cx - radius, cy - radius), (cx + radius, cy + radius), colour, -1)
    else:
        corners = 3 if label == 2 else 5
        angles = np.linspace(0, 2 * np.pi, corners, endpoint=False) - np.pi / 2
        points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(shading, [points], colour)
    noise = rng.normal(0, 4, shading.shape)
    return np.clip(shading + noise, 0, 255).astype(np.uint8)


def write_rgb(path: Path, image: np.ndarray, quality: int = 95) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix == ".jpg" else []
    ok, data = cv2.imencode(path.suffix, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    assert ok, path
    data.tofile(str(path))
    return str(path)


def _copy_variant(image: np.ndarray, how: str) -> tuple[np.ndarray, str, int]:
    """(changed image, file suffix, JPEG quality) of a near-duplicate copy."""
    side = image.shape[0]
    if how == "resized":
        return cv2.resize(image, (side * 3 // 2, side * 3 // 2), interpolation=cv2.INTER_CUBIC), ".png", 95
    if how == "recompressed":
        return image, ".jpg", 40
    border = max(1, side // 32)  # 2 px of 64 on every side: about 6% of the area
    return image[border:side - border, border:side - border], ".png", 95


def make_faulty_dataset(root: Path, per_class: int = 30, val_per_class: int = 10, classes: int = 3,
                        flips: int = 8, near_copies: int = 9, exact_copies: int = 3, side: int = 64,
                        seed: int = 0) -> Planted:
    """root/{train,val}/<class>/ with the faults listed in the returned `Planted`."""
    rng = np.random.default_rng(seed)
    planted = Planted()
    images: dict[str, np.ndarray] = {}
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label in range(classes):
            for k in range(count):
                image = scene(rng, label, side)
                filed = label
                if split == "train" and k < flips // classes + (label < flips % classes):
                    filed = (label + 1) % classes  # a flipped label: filed under the next class
                path = write_rgb(root / split / CLASS_NAMES[filed] / f"{split}_{label}_{k:03d}.png", image)
                images[path] = image
                if filed != label:
                    planted.flipped.append(path)
    _plant_copies(root, images, planted, near_copies, exact_copies, rng)
    (root / "train" / CLASS_NAMES[0] / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "train" / CLASS_NAMES[1] / "empty.png").write_bytes(b"")
    planted.unreadable += [str(root / "train" / CLASS_NAMES[0] / "broken.jpg"), str(root / "train" / CLASS_NAMES[1] / "empty.png")]
    return planted


def _plant_copies(root: Path, images: dict[str, np.ndarray], planted: Planted, near_copies: int,
                  exact_copies: int, rng: np.random.Generator) -> None:
    """Copies of clean train images put into val under the same class (train/test leakage)."""
    flipped = set(planted.flipped)
    sources = [p for p in images if "/train/" in p.replace("\\", "/") and p not in flipped]
    chosen = rng.choice(len(sources), near_copies + exact_copies, replace=False)
    for n, index in enumerate(chosen):
        source = Path(sources[index])
        folder = root / "val" / source.parent.name
        if n < exact_copies:
            target = folder / f"copy_{source.name}"
            shutil.copyfile(source, target)
            planted.exact_pairs.append((str(source), str(target)))
            continue
        how = ("resized", "recompressed", "cropped")[n % 3]
        variant, suffix, quality = _copy_variant(images[str(source)], how)
        target = write_rgb(folder / f"{how}_{source.stem}{suffix}", variant, quality)
        planted.near_pairs.append((str(source), target, how))
