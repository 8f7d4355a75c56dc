"""Shared fixtures: real image folders on disk, the digits demo data, a trained checkpoint."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before anything imports Qt: headless windows
os.environ.setdefault("MPLBACKEND", "Agg")

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def run_script(*args: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would: a subprocess, output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env, encoding="utf-8")


def write_image(path: Path, array: np.ndarray) -> Path:
    """Write an image with OpenCV (RGB in), through bytes so non-ASCII paths work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(path.suffix, array)
    assert ok, path
    data.tofile(path)
    return path


def make_class_tree(root: Path, classes: dict[str, int], size: int = 40, seed: int = 0,
                    splits: tuple[str, ...] = ("train", "val")) -> Path:
    """Colour-coded classes (learnable): class i is a noisy image dominated by one colour."""
    rng = np.random.default_rng(seed)
    palette = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40), (200, 40, 200), (40, 200, 200)]
    for split in splits:
        for index, (name, count) in enumerate(classes.items()):
            for k in range(count):
                base = np.array(palette[index % len(palette)], dtype=np.int16)
                noise = rng.integers(-40, 40, size=(size, size, 3))
                image = np.clip(base + noise, 0, 255).astype(np.uint8)
                write_image(root / split / name / f"{name}_{k}.png", image)
    return root


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The real digits demo data (scikit-learn's bundled scans) as PNG class folders."""
    from utils.demo import make_digits_dataset

    return make_digits_dataset(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture(scope="session")
def trained_run(digits_root, tmp_path_factory) -> Path:
    """A short real training run on the digits; returns its run folder (with best.pth)."""
    log_dir = tmp_path_factory.mktemp("logs")
    result = run_script("train.py", "--dataset_path", str(digits_root), "--model", "resnet18",
                        "--input_shape", "32", "--epochs", "2", "--hflip", "0", "--crop_scale", "0.5",
                        "--log_dir", str(log_dir), "--workers", "0")
    assert result.returncode == 0, result.stderr
    (run_dir,) = [p for p in log_dir.iterdir() if p.is_dir()]
    return run_dir
