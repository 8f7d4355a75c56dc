"""What both benchmarks share: the machine description, a matmul peak, photo-like JPEG files, tables.

Not a test helper: bench/*.py import it as `benchlib` (their own folder is on sys.path when run
as `python bench/<script>.py`) and put the repository root on sys.path for `utils` and `models`.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PHOTO_SIZE = (375, 500)  # (H, W) of a typical web photo (PASCAL VOC / Flickr size); some are portrait


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One markdown line: what produced the numbers (CPU, cores, load, library versions)."""
    import PIL
    import torchvision

    from utils.data import available_cores

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"CPU: {cpu_model()}, {available_cores()} cores usable, load average at start {load}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads, "
            f"{torch.backends.cpu.get_cpu_capability()}), torchvision {torchvision.__version__}, "
            f"OpenCV {cv2.__version__}, Pillow {PIL.__version__}, Python {platform.python_version()}")


def matmul_peak_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """fp32 matmul GFLOP/s with all intra-op threads: the best of repeated runs (a peak, not a mean)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool and BLAS kernels
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An RGB image with photo statistics: smooth shading, object edges, sensor noise.

    Random noise would compress badly and decode slowly; flat colour would be too easy. This
    lands at 40-60 KB as a quality-90 500x375 JPEG, like real photos of that size.
    """
    shading = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (width, height),
                         interpolation=cv2.INTER_CUBIC)
    for _ in range(12):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(shading, centre, int(rng.integers(10, max(11, width // 5))), colour, -1)
    image = cv2.GaussianBlur(shading, (0, 0), 2).astype(np.int16)
    image += rng.normal(0, 6, image.shape).astype(np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_photo_dataset(root: Path, train_images: int, val_images: int = 8, classes: int = 4, seed: int = 0) -> Path:
    """root/{train,val}/class_<k>/*.jpg of photo-like JPEGs (3 in 4 landscape 500x375, else portrait)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_images), ("val", val_images)):
        for i in range(count):
            height, width = PHOTO_SIZE if i % 4 else PHOTO_SIZE[::-1]
            folder = root / split / f"class_{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            bgr = cv2.cvtColor(photo_like(rng, height, width), cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(folder / f"photo_{i:05d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return root


def interleaved(runs: dict[str, Callable[[], float]], repeats: int, warmup: bool = True,
                seconds: float = float("inf")) -> dict[str, list[float]]:
    """Images/s per named run and round, the runs alternated (A B C, B C A, ...) so that load from
    other processes on a shared machine hits every contender alike. An untimed first round starts
    workers and lets oneDNN pick its kernels. Stops after `repeats` rounds, or earlier once
    `seconds` have passed (at least one timed round)."""
    deadline = time.perf_counter() + seconds
    names = list(runs)
    if warmup:
        for name in names:
            runs[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        if round_index and time.perf_counter() > deadline:
            break
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(runs[name]())
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


def ratio(samples: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of numerator/denominator measured in the same round: steadier than a
    ratio of medians when the machine's load drifts between rounds."""
    return statistics.median(a / b for a, b in zip(samples[numerator], samples[denominator]))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"  # NaN -> n/a
