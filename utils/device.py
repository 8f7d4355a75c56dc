"""Pick the device and the mixed-precision type, the same way for train, infer and the UI."""

from __future__ import annotations

import platform
import warnings
from collections.abc import Sequence
from typing import Optional

import torch

from utils.errors import UsageError

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "mps")


def select_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA, then Apple MPS, then the CPU; an explicit choice is checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in SUPPORTED_DEVICE_TYPES:  # "meta" computes nothing; others untested
        raise UsageError(f"--device {name!r} is not a device this project runs on (use auto, cpu, cuda, cuda:N or mps)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: Apple MPS is not available on this machine")
    return device


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AMX or AVX512-BF16); elsewhere bf16 is slow."""
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            flags = next((line for line in file if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def amp_dtype(device: torch.device, requested: bool) -> Optional[torch.dtype]:
    """The autocast dtype for --amp on `device`, or None (full fp32).

    CUDA: bf16 where the GPU has it (no loss scaling needed), else fp16 with a GradScaler.
    MPS: fp16. CPU: bf16 only with native support; without it bf16 runs 7-12x slower than
    fp32 (measured on a 2-core AVX2 machine), so --amp warns and stays fp32.
    """
    if not requested:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    if cpu_has_native_bf16():
        return torch.bfloat16
    warnings.warn("--amp ignored: this CPU has no native bf16, which would be slower than fp32", stacklevel=2)
    return None


def default_channels_last(device: torch.device, input_size: Sequence[int]) -> bool:
    """Whether NHWC is the faster memory layout for training on `device` (train.py's default).

    CPU, inputs of 64 px and more: yes. oneDNN's convolutions run natively in NHWC and skip
    layout reorders: train steps 1.4-1.8x faster for mobilenet_v2 and efficientnet_b0 and
    1.0-1.1x for resnet18 at 64 and 224 px (bench/bench_train.py, bench/RESULTS.md). Below 64 px
    the feature maps are too small to gain (resnet18 at 32 px: 0.95x). Other devices: not
    measured here, so off.
    """
    return device.type == "cpu" and min(input_size) >= 64


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
