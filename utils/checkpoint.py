"""The one checkpoint format and its one reader, for train.py, infer.py and the UI.

A checkpoint is a plain dict that `torch.load(path, weights_only=True)` reads back (a .pth is a
pickle; weights_only refuses files that would run code):

    format       "pytorch-classification/1"
    model        registry name, e.g. "resnet18"
    class_names  ["daisy", "dandelion", ...]   (index = model output)
    state_dict   model weights, no "module." / "_orig_mod." prefix
    preprocess   utils.transforms.Preprocess as a dict
    epoch, metrics, best_metric, args, versions, created, pretrained
    temperature  calibration scalar fitted on val at the end of training (utils.calibration);
                 probabilities are softmax(logits / temperature); 1.0 when absent (older files)
    suggested_min_confidence   lowest top probability that kept 99% of val answers right, or None
    optimizer, scheduler, scaler, rng, history     only in resumable checkpoints (last.pth)
    ema          under --ema, in last.pth: the averaged weights ({"state_dict", "updates", "decay"});
                 last.pth's own state_dict is then the trained weights, best.pth's the EMA's

A bare state_dict (what other templates save) is read too; the caller then supplies the model
name, the class names and the input size.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import secrets
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
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
_TEMP_NAME = re.compile(r"^\.[^/\\]+\.pth\.[a-z0-9_]{8}\.tmp$")  # what save_checkpoint writes before its rename


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """Write atomically: a temp file in the same folder, then rename, so a crash leaves the old file.

    The file gets the permissions any new file gets (0666 less the umask), like the run's other files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp, handle = _create_temp_file(path)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _create_temp_file(path: Path) -> tuple[Path, int]:
    """A new, uniquely named ".<name>.<8 random hex>.tmp" beside `path`, opened for writing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):  # 8 hex digits: a clash is one in four billion, so this never really loops
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return temp, os.open(temp, flags, 0o666)  # the OS takes the umask off 0o666, as for any new file
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def is_checkpoint_temp_file(path: str | os.PathLike) -> bool:
    """True for a file named as save_checkpoint names its temp files."""
    return bool(_TEMP_NAME.match(Path(path).name)) and Path(path).is_file()


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that saves cut short by a kill left in `folder`; return them.

    Only files named as save_checkpoint names them (also as earlier versions did with tempfile.mkstemp:
    8 random letters, digits or _) for a .pth file. Call it only for a folder no other process is
    saving into, such as the run folder of a run being resumed.
    """
    stale = [entry for entry in Path(folder).iterdir() if is_checkpoint_temp_file(entry)]
    for entry in stale:
        entry.unlink(missing_ok=True)
    return stale


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
    temperature = checkpoint.get("temperature", 1.0)
    if not (_is_number(temperature) and 0 < float(temperature) < float("inf")):
        raise UsageError(f"field 'temperature' must be a positive number, got {temperature!r}")
    threshold = checkpoint.get("suggested_min_confidence")
    if threshold is not None and not (_is_number(threshold) and 0 <= float(threshold) <= 1):
        raise UsageError(f"field 'suggested_min_confidence' must be a probability or None, got {threshold!r}")
    kwargs = checkpoint.get("model_kwargs")
    if kwargs is not None and not (isinstance(kwargs, Mapping) and all(
            isinstance(k, str) and isinstance(v, _PLAIN) for k, v in kwargs.items())):
        raise UsageError(f"field 'model_kwargs' must be a dict of names to plain values, got {kwargs!r}")


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
        isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point())


def checkpoint_temperature(checkpoint: Mapping) -> float:
    """The calibration temperature of a checked checkpoint; 1.0 when absent or for a bare state_dict."""
    return float(checkpoint.get("temperature", 1.0)) if checkpoint.get("format") == CHECKPOINT_FORMAT else 1.0


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


def with_module_versions(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> OrderedDict:
    """A copy of the state_dict that carries torchvision's per-module versions (`_metadata`).

    Without them some modules refuse to load (MNASNet); a state_dict that lost them (rebuilt as a
    plain dict) is assumed to match this code's versions.
    """
    state = OrderedDict(state_dict)
    metadata = getattr(state_dict, "_metadata", None)
    state._metadata = metadata if metadata is not None else getattr(model.state_dict(), "_metadata", {})
    return state


def load_model_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load weights that must fit exactly (inference, resume); a mismatch is a short UsageError.

    A model built on the meta device (`create_model(..., weights_follow=True)`) takes the
    checkpoint's tensors as its own, in the dtype the model declares.
    """
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
    state_dict = with_module_versions(state_dict, model)
    if not any(tensor.is_meta for tensor in own.values()):
        model.load_state_dict(state_dict, strict=True)
        return
    for key, tensor in state_dict.items():
        state_dict[key] = tensor.to(own[key].dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:  # a tensor outside the state_dict would stay without data: a bug, not the user's
        raise RuntimeError(f"{type(model).__name__} built on the meta device keeps {left[0]} without data")


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


# ---- a run's checkpoint files and the policy that picks them ------------------------------------

BEST_METRICS = ("top1", "f1", "precision", "recall", "loss")


def is_better(metrics: Mapping[str, float], best: Mapping[str, float], name: str) -> bool:
    """Higher is better except for loss; equal values go to the lower loss."""
    value, best_value = metrics[name], best[name]
    if name == "loss":
        return value < best_value
    return value > best_value or (value == best_value and metrics["loss"] < best["loss"])


def detached_copy(value: Any) -> Any:
    """`value` (a state_dict, an optimizer state, nested dicts/lists) with every tensor copied to
    the CPU, so training can go on changing its weights while a background thread saves the copy.
    OrderedDicts keep their `_metadata` (torchvision reads it when loading old formats)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.clone() if value.device.type == "cpu" else value.to("cpu")
    if isinstance(value, Mapping):
        kind = OrderedDict if isinstance(value, OrderedDict) else dict
        copied = kind((key, detached_copy(item)) for key, item in value.items())
        metadata = getattr(value, "_metadata", None)
        if metadata is not None:
            copied._metadata = metadata
        return copied
    if isinstance(value, (list, tuple)):
        return type(value)(detached_copy(item) for item in value)
    return value


def _one_line_on_os_error(write: Callable[[], object]) -> None:
    """A checkpoint that cannot be written (the folder turned read-only, the disk is full) ends the
    run with one line naming the file, not a traceback; the files written before stay complete."""
    try:
        write()
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        raise UsageError(f"cannot write the checkpoint{where}: {error.strerror or error}; the files saved "
                         "before are complete (resume from last.pth with --resume auto once it can be "
                         "written)") from None


class BackgroundWriter:
    """Runs write jobs one at a time in one background thread, at most one waiting or running.

    `submit` first waits for the previous job, so writes land in the order given and at most one
    job's data is held in memory; an error raised by a job comes back on the calling thread at the
    next `submit`, `flush` or `close`. With `background` False every job runs at once, in the caller.
    """

    def __init__(self, background: bool = True):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer") if background else None
        self._pending: Optional[Future] = None

    def submit(self, job: Callable[[], None]) -> None:
        self.flush()
        if self._pool is None:
            _one_line_on_os_error(job)
        else:
            self._pending = self._pool.submit(job)

    def flush(self) -> None:
        """Wait for the job in progress; re-raise its error here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            _one_line_on_os_error(pending.result)

    def close(self) -> None:
        """Flush, then end the thread (a closed writer runs later jobs in the caller)."""
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class CheckpointSaver:
    """Owns a run's checkpoint files: builds each self-describing dict, decides which files an
    epoch writes, and writes them atomically (timm's CheckpointSaver is the model).

        last.pth       every epoch (and at epoch 0), with `training_state()` added: resumable
        best.pth       when `best_metric` on validation improves (ties go to the lower loss)
        epoch_<N>.pth  every `freq` epochs (0: never)

    `record` holds what describes the run and stays fixed (model, class_names, preprocess, args,
    pretrained, model_kwargs, ...); see the module docstring for the whole format. With
    run_dir None (torchrun ranks other than 0) it still decides, so every rank agrees on `best`,
    but writes nothing.

    The files are written in a background thread (`background`, the default), so the next epoch
    trains while they go to disk: the checkpoint is copied to CPU tensors first (detached_copy),
    each file is still written atomically, an epoch's files wait for the previous epoch's, and a
    failed write is raised on the training thread at the next save, `flush` or `close`. Use it as
    a context manager, or call `close`, so that the last files are on disk before the run ends.
    """

    def __init__(self, run_dir: Optional[Path], record: Mapping[str, Any], best_metric: str = "top1",
                 freq: int = 0, best: Optional[dict] = None, background: bool = True):
        if best_metric not in BEST_METRICS:
            raise ValueError(f"best_metric must be one of {BEST_METRICS}, got {best_metric!r}")
        self.run_dir = run_dir
        self.record = dict(record)
        self.best_metric = best_metric
        self.freq = freq
        self.best = best  # {"epoch", best_metric, "loss"} of the best epoch so far; None before the first
        self._writer = BackgroundWriter(background and run_dir is not None)

    def flush(self) -> None:
        """Wait until the files saved so far are on disk; raise a failed write's error here."""
        self._writer.flush()

    def close(self, raise_errors: bool = True) -> None:
        """Flush and stop the writer thread. With `raise_errors` False (the run is failing already)
        a failed write is only warned about, so the first error stays the one reported."""
        try:
            self._writer.close()
        except Exception as error:
            if raise_errors:
                raise
            warnings.warn(f"a checkpoint could not be written: {error}", stacklevel=2)

    def __enter__(self) -> CheckpointSaver:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(raise_errors=exc_type is None)

    def build(self, model: nn.Module | Mapping[str, torch.Tensor], epoch: int, metrics: Mapping[str, Any],
              training_state: Optional[Mapping[str, Any]] = None) -> dict:
        """The checkpoint dict: the run's record, the plain model's weights (or a state_dict already
        copied), where the run stands; every tensor a CPU copy that training does not change."""
        weights = model if isinstance(model, Mapping) else detached_copy(unwrap_model(model).state_dict())
        checkpoint = {"format": CHECKPOINT_FORMAT, **detached_copy(self.record), "state_dict": weights,
                      "epoch": epoch, "metrics": dict(metrics), "best_metric": dict(self.best or {}) or None,
                      "versions": versions(), "created": timestamp()}
        if training_state is not None:
            checkpoint.update(detached_copy(training_state))
        return checkpoint

    def save_start(self, model: nn.Module, training_state: Mapping[str, Any]) -> None:
        """last.pth before the first epoch, so a Ctrl-C during epoch 1 is resumable too."""
        self._write({"last.pth": self.build(model, 0, {}, training_state)})

    def improves(self, metrics: Mapping[str, Any]) -> bool:
        """Whether an epoch with these validation metrics would be the best so far."""
        return self.best is None or is_better(metrics, self.best, self.best_metric)

    def save_epoch(self, model: nn.Module, epoch: int, metrics: Mapping[str, Any],
                   training_state: Callable[[], Mapping[str, Any]], evaluated: Optional[nn.Module] = None,
                   then: Optional[Callable[[], None]] = None) -> bool:
        """Save the files this epoch calls for; return whether it is the best epoch so far.

        `evaluated` is the model whose weights gave `metrics` when that is not `model` (the EMA
        under --ema): best.pth and epoch_N.pth hold its weights; last.pth holds the trained
        model's, and training_state() carries the rest (the EMA's own weights among them).
        `then` runs (in the writer thread) once last.pth is on disk: train.py writes history.csv
        there, so the file never lists an epoch that last.pth does not hold.
        """
        improved = self.improves(metrics)
        if improved:
            self.best = {"epoch": epoch, self.best_metric: metrics[self.best_metric], "loss": metrics["loss"]}
        if self.run_dir is None:
            return improved
        self.flush()  # the previous epoch's files first: one epoch's copies in memory at a time
        trained = detached_copy(unwrap_model(model).state_dict())  # one copy per set of weights
        judged = trained if evaluated is None else detached_copy(unwrap_model(evaluated).state_dict())
        files = {"best.pth": self.build(judged, epoch, metrics)} if improved else {}
        files["last.pth"] = self.build(trained, epoch, metrics, training_state())
        if self.freq and epoch % self.freq == 0:
            files[f"epoch_{epoch}.pth"] = self.build(judged, epoch, metrics)
        self._write(files, then)
        return improved

    def add_fields(self, fields: Mapping[str, Any]) -> list[str]:
        """Add `fields` (say the temperature fitted after training) to the run's record and rewrite,
        atomically, best.pth and a last.pth that holds the same epoch (the same weights: a value
        fitted on best.pth's outputs does not describe other weights). Returns the names rewritten;
        they are on disk when it returns."""
        self.record.update(fields)
        self.flush()  # the files read below are the ones saved last
        if self.run_dir is None or not (self.run_dir / "best.pth").is_file():
            return []
        best = torch.load(self.run_dir / "best.pth", map_location="cpu", weights_only=True)
        files = {"best.pth": {**best, **fields}}
        last_path = self.run_dir / "last.pth"
        if last_path.is_file():
            last = torch.load(last_path, map_location="cpu", weights_only=True)
            if last.get("epoch") == best.get("epoch") and last.get("ema") is None:  # --ema: best.pth holds other weights
                files["last.pth"] = {**last, **fields}
        self._write(files)
        self.flush()
        return list(files)

    def _write(self, files: dict[str, dict], then: Optional[Callable[[], None]] = None) -> None:
        """Hand `files` ({name: checkpoint}, written in this order) and `then` to the writer."""
        if self.run_dir is None:
            return
        run_dir = self.run_dir

        def write_all() -> None:
            for name, checkpoint in files.items():
                save_checkpoint(checkpoint, run_dir / name)
            if then is not None:
                then()

        self._writer.submit(write_all)
