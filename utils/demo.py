"""The built-in demo dataset: scikit-learn's handwritten digits as PNG class folders.

`python train.py` without --dataset_path builds data/digits/{train,val,test}/<0..9>/*.png
once (1797 real 8x8 scans, shipped inside scikit-learn, so nothing is downloaded) and trains
on it. It is also the real data the tests use.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from utils.distributed import on_main_process

DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "digits"
DEMO_IMAGE_SIDE = 32


def make_digits_dataset(root: str | Path = DEMO_DIR, seed: int = 0, val_ratio: float = 0.15, test_ratio: float = 0.15) -> Path:
    """Write the digits as grayscale PNGs under root/{train,val,test}/<digit>/ (skips if present)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    marker = root / ".complete"
    if marker.is_file():
        return root
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    indices = np.arange(len(images))
    train_val, test = train_test_split(indices, test_size=test_ratio, stratify=digits.target, random_state=seed)
    train, val = train_test_split(
        train_val, test_size=val_ratio / (1 - test_ratio), stratify=digits.target[train_val], random_state=seed
    )
    for split, members in (("train", train), ("val", val), ("test", test)):
        for i in members:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            big = cv2.resize(images[i], (DEMO_IMAGE_SIDE, DEMO_IMAGE_SIDE), interpolation=cv2.INTER_CUBIC)
            _, png = cv2.imencode(".png", big)
            png.tofile(folder / f"digit_{i:04d}.png")  # unlike cv2.imwrite, fine with non-ASCII paths
    marker.write_text("built by utils/demo.py from sklearn.datasets.load_digits\n")
    return root


def use_digits_demo(args: argparse.Namespace, announce: bool) -> None:
    """train.py without --dataset_path: build the digits demo (rank 0 only) and use the settings that suit it."""
    if announce:
        print(f"No --dataset_path: using the built-in demo, scikit-learn's handwritten digits in {DEMO_DIR}")
    args.dataset_path = str(on_main_process(make_digits_dataset))
    args.input_shape = args.input_shape or [DEMO_IMAGE_SIDE]
    args.epochs = args.epochs or 10
    args.hflip = 0.0  # a mirrored digit is another digit
    args.crop_scale = max(args.crop_scale, 0.5)  # 32-pixel digits: small crops lose the digit
