"""Shared fixtures: real image folders on disk, the digits demo data, a trained checkpoint."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before anything imports Qt: headless windows
os.environ.setdefault("MPLBACKEND", "Agg")

import ctypes
import struct
import subprocess
import sys
import zlib
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


def write_blank_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black PNG of any size, written row by row (1-bit gray): a 30000 x 30000 image is
    110 KB on disk and never exists in memory here, the way a decompression bomb arrives."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = (b"\0" * (1 + (width + 7) // 8)) * 1000  # filter byte + packed pixels, 1000 rows at a time
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(rows) for _ in range(height // 1000))
    pixels += packer.compress(rows[:len(rows) // 1000 * (height % 1000)]) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, gray, deflate, no filter, no interlace
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def run_script_with_permissions(*args: str, locked: Path) -> subprocess.CompletedProcess:
    """run_script, with file permission bits in force even when the tests run as root.

    Root reads a chmod 000 folder (CAP_DAC_OVERRIDE), so there the child drops that capability
    and CAP_DAC_READ_SEARCH from its bounding set before exec (Linux prctl); it then meets the
    same PermissionError as any user. `locked` (already chmod 000) proves it works, else skip.
    """
    def drop_capabilities() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    preexec = drop_capabilities if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    probe = [sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])", str(locked)]
    try:
        blocked = subprocess.run(probe, preexec_fn=preexec, capture_output=True).returncode != 0
    except subprocess.SubprocessError:
        blocked = False
    if not blocked:
        pytest.skip("cannot make folder permissions apply to this process (root without CAP_SETPCAP, or Windows)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env, encoding="utf-8", preexec_fn=preexec)


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
    (run_dir,) = [p for p in log_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return run_dir


@pytest.fixture(scope="session")
def trained_onnx(trained_run, tmp_path_factory) -> Path:
    """`trained_run`'s best.pth exported by export.py (parity-checked on its val split): the .onnx path."""
    out = tmp_path_factory.mktemp("onnx")
    result = run_script("export.py", "--weights", str(trained_run / "best.pth"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out / "best.onnx"
