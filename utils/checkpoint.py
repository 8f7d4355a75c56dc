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
import re
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torchvision

from utils.errors import UsageError
from utils.transforms import Preprocess

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
    with no "format" key. In one of ours the fields the tools read are checked (`check_fields`):
    a malformed one is a UsageError naming the file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL (\S+)", str(error))
        if not unsafe:
            raise UsageError(f"{path} is not a readable PyTorch checkpoint (truncated or damaged?)") from None
        raise UsageError(
            f"{path} holds a {unsafe.group(1)} object, so it is not loaded (weights_only=True runs no code "
            "from files): re-save it as a plain state_dict or a dict of tensors and plain data"
        ) from None
    except Exception:  # torch.load raises many types on garbage (KeyError, RuntimeError, EOFError...)
        raise UsageError(f"{path} is not a readable PyTorch checkpoint (truncated or damaged?)") from None
    state_dict = _find_state_dict(loaded)
    if state_dict is None:
        raise UsageError(f"{path} holds neither a pytorch-classification checkpoint nor a state_dict")
    checkpoint = dict(loaded) if state_dict is not loaded else {}
    checkpoint["state_dict"] = strip_wrapper_prefixes(state_dict)
    if checkpoint.get("format") == CHECKPOINT_FORMAT:
        try:
            check_fields(checkpoint)
        except UsageError as error:
            raise UsageError(f"checkpoint {path}: {error} (edited or damaged? train.py writes valid ones)") from None
    return checkpoint


_PLAIN = (bool, int, float, str, type(None))


def check_fields(checkpoint: Mapping) -> None:
    """The fields every tool reads from one of our checkpoints; a malformed one is a UsageError
    naming it (the caller adds the file). Checked here, in the one reader, so that no tool
    meets NaN probabilities, a traceback or an out-of-memory kill later."""
    model = checkpoint.get("model")
    if not isinstance(model, str) or not model:
        raise UsageError(f"field 'model' must be a model name, got {model!r}")
    names = checkpoint.get("class_names")
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        shown = repr(names) if len(repr(names)) <= 80 else repr(names)[:77] + "..."
        raise UsageError(f"field 'class_names' must be a list of class names (non-empty strings), got {shown}")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise UsageError(f"field 'class_names' names {', '.join(repeated[:10])} more than once")
    if "preprocess" not in checkpoint:
        raise UsageError("field 'preprocess' is missing")
    Preprocess.from_dict(checkpoint["preprocess"])  # checks each of its fields
    kwargs = checkpoint.get("model_kwargs")
    if kwargs is not None and not (isinstance(kwargs, Mapping) and all(
            isinstance(k, str) and isinstance(v, _PLAIN) for k, v in kwargs.items())):
        raise UsageError(f"field 'model_kwargs' must be a dict of names to plain values, got {kwargs!r}")


def _is_state_dict(obj: object) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _find_state_dict(obj: object) -> Optional[Mapping]:
    """A bare state_dict, or the one a checkpoint dict holds (ours: "state_dict"; others' names too)."""
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if _is_state_dict(obj.get(key)):
                return obj[key]
    return None


def strip_wrapper_prefix(key: str) -> str:
    """"module.layer.weight" (DDP) or "_orig_mod.layer.weight" (torch.compile) -> "layer.weight"."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict:
    """The state_dict with bare-model key names; torchvision's per-module `_metadata` kept along."""
    cleaned = OrderedDict((strip_wrapper_prefix(k), v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # its keys are module paths without the trailing dot ("" = root)
        cleaned._metadata = OrderedDict((strip_wrapper_prefix(k + ".")[:-1], v) for k, v in metadata.items())
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


def load_model_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load weights that must fit exactly (inference, resume); a mismatch is a short UsageError."""
    state_dict = strip_wrapper_prefixes(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        details = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in (
            (missing, "tensors missing"), (unexpected, "unknown tensors"), (wrong_shape, "tensors of another shape"))
            if keys]
        raise UsageError(f"{source} does not fit the model {type(model).__name__}: {'; '.join(details)} "
                         "(wrong --model, or a checkpoint for another number of classes?)")
    model.load_state_dict(state_dict, strict=True)


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
