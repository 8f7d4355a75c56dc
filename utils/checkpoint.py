"""The one checkpoint format and its one reader, for train.py, infer.py and the UI.

A checkpoint is a plain dict that `torch.load(path, weights_only=True)` reads back (a .pth is a
pickle; weights_only refuses files that would run code):

    format       "pytorch-classification/1"
    model        registry name, e.g. "resnet18"
    class_names  ["daisy", "dandelion", ...]   (index = model output)
    state_dict   model weights, no "module." / "_orig_mod." prefix
    preprocess   utils.transforms.Preprocess as a dict
    epoch, metrics, best_metric, args, versions, created, pretrained
    optimizer, scheduler, scaler, rng, history     only in resumable checkpoints (last.pth)

A bare state_dict (what other templates save) is read too; the caller then supplies the model
name, the class names and the input size.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torchvision

from utils.errors import UsageError

CHECKPOINT_FORMAT = "pytorch-classification/1"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """Write atomically: a temp file in the same folder, then rename, so a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint (ours or a bare state_dict) safely; user mistakes raise UsageError.

    The result always has a "state_dict"; a bare state_dict comes back as {"state_dict": ...}
    with no "format" key.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UsageError(
            f"{path} cannot be loaded safely (weights_only=True refused it: {str(error).splitlines()[0]}). "
            "Only tensors and plain Python values are accepted in a checkpoint."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UsageError(f"{path} is not a readable PyTorch checkpoint ({str(error).splitlines()[0]})") from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        checkpoint = dict(loaded)
    elif isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        checkpoint = {"state_dict": loaded}
    else:
        raise UsageError(f"{path} holds neither a pytorch-classification checkpoint nor a state_dict")
    checkpoint["state_dict"] = strip_wrapper_prefixes(checkpoint["state_dict"])
    return checkpoint


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the "module." (DDP) and "_orig_mod." (torch.compile) prefixes from keys."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def load_matching_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy every tensor whose name and shape fit; report the rest instead of failing.

    Used for fine-tuning (`--weights`, `--pretrained`): a head with another class count does
    not fit and keeps its fresh initialisation.
    """
    own = model.state_dict()
    state_dict = strip_wrapper_prefixes(state_dict)
    fitting = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    return {
        "loaded": [k for k in own if k in fitting],
        "reinitialised": [k for k in own if k not in fitting],
        "unexpected": [k for k in state_dict if k not in own],
        "shape_mismatch": [k for k in state_dict if k in own and k not in fitting],
    }


def format_load_report(report: dict[str, list[str]], source: str) -> str:
    """One short paragraph: how much of `source` was loaded, and what was not."""
    lines = [f"Loaded {len(report['loaded'])} tensors from {source}."]
    if report["reinitialised"]:
        lines.append(f"  newly initialised ({len(report['reinitialised'])}): {_short(report['reinitialised'])}")
    if report["unexpected"]:
        lines.append(f"  not used from the file ({len(report['unexpected'])}): {_short(report['unexpected'])}")
    return "\n".join(lines)


def _short(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_model_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights that must fit exactly (inference, resume); a mismatch is a UsageError."""
    try:
        model.load_state_dict(strip_wrapper_prefixes(state_dict), strict=True)
    except RuntimeError as error:
        first = [line.strip() for line in str(error).splitlines() if line.strip()][1:3]
        raise UsageError(
            f"{source} does not fit the model {type(model).__name__}: {' '.join(first)[:300]}"
            " (wrong --model, or a checkpoint for another number of classes?)"
        ) from None


def capture_rng_state() -> dict[str, Any]:
    """RNG state of torch, numpy and random as tensors/lists (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


def versions() -> dict[str, str]:
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}  # plain str: weights_only


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def checkpoint_summary(checkpoint: dict, path: Optional[str] = None) -> str:
    """One line describing a checkpoint, for logs and the UI title."""
    name = checkpoint.get("model", "unknown model")
    classes = checkpoint.get("class_names") or []
    epoch = checkpoint.get("epoch")
    where = f" ({path})" if path else ""
    return f"{name}, {len(classes)} classes, epoch {epoch}{where}"
