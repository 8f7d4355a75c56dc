"""Export a checkpoint to ONNX or TorchScript as one module that carries its preprocessing.

The exported model takes what any image library gives after one resize, and returns what a user
wants, so nobody re-implements normalisation by hand (the usual cause of "ONNX gives other
results than PyTorch"):

    input   images         uint8 [N, 3, H, W], RGB, already resized by the stored resize rule
    graph   float, (x - 255*mean) / (255*std)  (= (x/255 - mean)/std), the network,
            logits / temperature, softmax
    output  probabilities  float32 [N, C]

Metadata (ONNX `metadata_props`, TorchScript `_extra_files`), all strings: see METADATA_KEYS.
Every export is written to a temporary name, checked against PyTorch on images (`export_checked`)
and renamed only when it passes, so a failed export leaves no file behind.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn as nn

from models.pretrained import sha256_file
from utils.checkpoint import load_checkpoint, timestamp, versions
from utils.errors import UsageError
from utils.files import unique_path
from utils.transforms import Preprocess, normalize_batch

EXPORT_FORMAT = "pytorch-classification-export/1"
FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
METADATA_KEYS = ("format", "model", "class_names", "preprocess", "temperature", "source", "source_sha256",
                 "versions", "exporter", "created")
PARITY_TOLERANCE = 1e-4  # max |delta p| allowed between PyTorch and the exported fp32 model
TIE_TOLERANCE = 1e-6  # two classes this close in PyTorch are a tie: either top-1 counts as agreeing
DYNAMO_MIN_OPSET = 18  # below this the dynamo exporter has no implementations (it would convert down)
MAX_OPSET = int(getattr(getattr(torch.onnx, "_constants", None), "ONNX_MAX_OPSET", 23))
ONNX_MIN_TORCH = "2.5"  # the first torch whose torch.onnx.export has the dynamo= switch
LEGACY_MAX_OPSET, LEGACY_DEFAULT_OPSET = 20, 17  # the TorchScript-based exporter's range ends at 20
ONNX_SIZE_LIMIT = 2 * 1024**3  # protobuf limit: bigger models need external data files (not supported)
CHUNK = 32  # images per forward pass in the parity check: bounds memory for any image count


class ParityError(Exception):
    """The exported model disagrees with PyTorch; nothing was saved (exit 1: not a user mistake)."""


class ExportWrapper(nn.Module):
    """uint8 RGB [N, 3, H, W] -> probabilities [N, C]: the steps after resizing, in the graph."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, temperature: float = 1.0):
        super().__init__()
        self.model = model
        # The same arithmetic as utils.transforms.normalize_batch (255-scaled mean/std, so no
        # separate /255), held as buffers so a TorchScript module moved with .to(device) takes
        # them along. The parity check compares against normalize_batch itself.
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model((images.float() - self.mean) / self.std)
        return (logits.float() / self.temperature).softmax(dim=1)


@dataclass
class ExportSource:
    """A checkpoint ready to export: the model in eval mode on the CPU and what describes it."""

    path: Path
    model: nn.Module
    model_name: str
    class_names: list[str]
    preprocess: Preprocess
    temperature: float
    train_args: dict  # train.py's flags ({} for a bare state_dict): where the dataset is
    sha256: str

    def wrapper(self) -> ExportWrapper:
        return ExportWrapper(self.model, self.preprocess, self.temperature).eval()


def load_source(path: str | os.PathLike, model_name: Optional[str] = None,
                categories: Optional[Sequence[str]] = None,
                input_shape: Optional[Sequence[int]] = None) -> ExportSource:
    """Our checkpoint, or a bare state_dict with model name, class names and input size given."""
    from inference.predictor import (  # the one checkpoint -> model path (bare ones too)
        Predictor,
        parse_categories,
    )

    predictor = Predictor.from_checkpoint(str(path), "cpu", model_name=model_name,
                                          class_names=parse_categories(categories),
                                          input_shape=input_shape, channels_last=False)
    # A second read for what Predictor does not keep (the training args); a bare state_dict has none.
    # The temperature is Predictor's: the checkpoint's "temperature" (1.0 when absent), checked by the reader.
    checkpoint = load_checkpoint(path)
    temperature = predictor.temperature
    train_args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    return ExportSource(Path(path), predictor.model, predictor.model_name, predictor.class_names,
                        predictor.preprocess, float(temperature), train_args, sha256_file(path))


def build_metadata(source: ExportSource, exporter: str) -> dict[str, str]:
    """The strings every exported file carries: enough to use it without this repository."""
    library_versions = {**versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    return {
        "format": EXPORT_FORMAT,
        "model": source.model_name,
        "class_names": json.dumps(source.class_names, ensure_ascii=False),
        "preprocess": json.dumps(source.preprocess.to_dict()),
        "temperature": repr(source.temperature),
        "source": source.path.name,
        "source_sha256": source.sha256,
        "versions": json.dumps(library_versions),
        "exporter": exporter,
        "created": timestamp(),
    }


def example_batch(source: ExportSource, batch: Optional[int]) -> torch.Tensor:
    """The tracing input. A dynamic batch is traced at 2: torch.export fixes a dimension of size 1."""
    height, width = source.preprocess.input_size
    return torch.randint(0, 256, (batch or 2, 3, height, width), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(" [Caused by")[0]  # the legacy exporter appends a long graph dump


def export_onnx(source: ExportSource, batch: Optional[int], opset: Optional[int], path: Path) -> str:
    """Write source as ONNX to `path`; returns the exporter used, for the console and the metadata.

    The dynamo exporter (torch.export) is tried first. The TorchScript-based one is used for
    opsets below 18 (the dynamo one would export at 18 and convert down, often failing quietly)
    and when the dynamo one fails; an operator that neither can write is a UsageError naming it.
    """
    if torch.__version__ < ONNX_MIN_TORCH:  # TorchVersion compares with version strings
        raise UsageError(f"ONNX export needs torch {ONNX_MIN_TORCH} or newer (torch.onnx.export(dynamo=...)), this is "
                         f"{torch.__version__}: upgrade torch or use --format torchscript")
    if opset is not None and opset > MAX_OPSET:
        raise UsageError(f"--opset {opset}: torch {torch.__version__} writes ONNX opsets up to {MAX_OPSET}")
    parameter_bytes = sum(p.numel() * p.element_size() for p in source.model.parameters())
    if parameter_bytes >= ONNX_SIZE_LIMIT:
        raise UsageError(f"{source.model_name} has {parameter_bytes / 1024**3:.1f} GB of weights; a single .onnx "
                         "file holds under 2 GB (external data files are not supported): use --format torchscript")
    wrapper, example = source.wrapper(), example_batch(source, batch)
    if opset is None or opset >= DYNAMO_MIN_OPSET:
        try:
            return _export_dynamo(wrapper, example, batch, opset, path, source)
        except Exception as error:  # torch.export raises many types; the legacy exporter gets a try
            reason = _first_line(error)
            if opset is not None and opset > LEGACY_MAX_OPSET:
                raise UsageError(f"{source.model_name} cannot be exported to ONNX opset {opset}: {reason}") from None
            print(f"note: the dynamo ONNX exporter failed ({reason}); trying the TorchScript-based exporter")
    return _export_legacy(wrapper, example, batch, opset or LEGACY_DEFAULT_OPSET, path, source)


def _export_dynamo(wrapper: nn.Module, example: torch.Tensor, batch: Optional[int], opset: Optional[int],
                   path: Path, source: ExportSource) -> str:
    dynamic = {INPUT_NAME: {0: torch.export.Dim("batch")}} if batch is None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from torch internals; failures still raise
        program = torch.onnx.export(wrapper, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], opset_version=opset, dynamic_shapes=dynamic,
                                    verbose=False)
    written = _opset_of(program.model.opset_imports)
    exporter = f"torch.onnx dynamo exporter (torch {torch.__version__}), opset {written}"
    program.model.metadata_props.update(build_metadata(source, exporter))
    program.save(path, external_data=False)
    return exporter


def _export_legacy(wrapper: nn.Module, example: torch.Tensor, batch: Optional[int], opset: int,
                   path: Path, source: ExportSource) -> str:
    dynamic = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if batch is None else None
    try:
        with warnings.catch_warnings(), _native_stdout_silenced():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings; the parity check judges the result
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset, dynamic_axes=dynamic)
    except torch.onnx.errors.OnnxExporterError as error:
        raise UsageError(f"{source.model_name} cannot be exported to ONNX opset {opset}: {_first_line(error)}") from None
    exporter = f"torch.onnx TorchScript-based exporter (torch {torch.__version__}), opset {opset}"
    model = onnx.load(str(path))
    model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v)
                                for k, v in build_metadata(source, exporter).items())
    onnx.save(model, str(path))
    return exporter


@contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Send file descriptor 1 to the null device for a while. The TorchScript-based exporter
    switches its C++ log on by mistake (torch 2.14 tests a function object for truth in
    setup_onnx_logging) and then prints the whole graph, thousands of lines, on any failure."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _opset_of(opset_imports: dict[str, int]) -> int:
    return int(opset_imports.get("", opset_imports.get("ai.onnx", 0)))


def export_torchscript(source: ExportSource, batch: Optional[int], path: Path) -> str:
    """Trace the wrapper (scripting fails on many torchvision models) and save with the metadata."""
    exporter = f"torch.jit.trace (torch {torch.__version__})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings; the parity check runs another batch size
        traced = torch.jit.trace(source.wrapper(), example_batch(source, batch), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files=build_metadata(source, exporter))
    return exporter


def load_torchscript(path: str | os.PathLike, map_location: str = "cpu") -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    """An exported TorchScript module and its metadata strings."""
    extra: dict[str, Any] = dict.fromkeys(METADATA_KEYS, "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation notices
        module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    return module, {k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items()}


@dataclass
class Parity:
    """How an exported model's probabilities compare with PyTorch's on the same images."""

    count: int
    max_delta: float  # max |delta p| over all images and classes
    agree: int  # images with the same top-1 class
    ties: int  # other top-1, but the two classes tie in PyTorch (within TIE_TOLERANCE): rounding picks either

    @property
    def ok(self) -> bool:
        return self.count > 0 and self.agree + self.ties == self.count and self.max_delta <= PARITY_TOLERANCE

    def describe(self) -> str:
        ties = f" (+{self.ties} exact tie{'s' if self.ties > 1 else ''})" if self.ties else ""
        return (f"max |delta p| {self.max_delta:.1e}, top-1 agreement {self.agree}/{self.count} "
                f"({self.agree / max(self.count, 1):.1%}){ties}")


def compare(reference: np.ndarray, exported: np.ndarray) -> Parity:
    """Parity of two (N, C) probability arrays; NaN counts as an infinite difference."""
    delta = np.abs(reference.astype(np.float64) - exported.astype(np.float64))
    max_delta = float(np.nan_to_num(delta, nan=np.inf).max()) if delta.size else 0.0
    rows = np.arange(len(reference))
    reference_top, exported_top = reference.argmax(1), exported.argmax(1)
    same = reference_top == exported_top
    tie = ~same & (reference[rows, reference_top] - reference[rows, exported_top] <= TIE_TOLERANCE)
    return Parity(len(reference), max_delta, int(same.sum()), int(tie.sum()))


@torch.inference_mode()
def reference_probabilities(source: ExportSource, images: torch.Tensor) -> np.ndarray:
    """What PyTorch says, through the project's own normalisation (not the wrapper's copy of it)."""
    outputs = []
    for chunk in images.split(CHUNK):
        logits = source.model(normalize_batch(chunk, source.preprocess))
        outputs.append((logits.float() / source.temperature).softmax(dim=1))
    return torch.cat(outputs).numpy()


def exported_probabilities(fmt: str, path: Path, images: torch.Tensor, batch: Optional[int]) -> np.ndarray:
    """Run an exported file as a user would: onnxruntime (CPU) or torch.jit.load, metadata included."""
    from inference.onnx_model import OnnxModel, run_batched

    if fmt == "onnx":
        return OnnxModel(path, device="cpu").predict_uint8(images.numpy(), max_batch=CHUNK)
    module, metadata = load_torchscript(path)
    missing = [key for key, value in metadata.items() if not value]
    if missing:
        raise ParityError(f"{path} lost its metadata {', '.join(missing)} on saving")

    @torch.inference_mode()
    def predict(chunk: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(chunk)).numpy()

    return run_batched(predict, images.numpy(), batch, max_batch=CHUNK)


@dataclass
class ExportResult:
    format: str
    path: Path
    exporter: str
    seconds: float  # export alone, without the parity check
    check_seconds: float
    parity: Parity


def temp_path(out_dir: Path, final_name: str) -> Path:
    """A fresh hidden file beside the final name (same file system, so the rename is atomic)."""
    handle, name = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=out_dir)
    os.close(handle)
    return Path(name)


def publish(temp: Path, out_dir: Path, final_name: str) -> Path:
    """Give a checked temporary file its name: final_name, or -1, -2... when that exists (never
    replaced). mkstemp made it private (0600); an exported model is meant to be shared, so it
    gets the permissions of any new file (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)
    final = Path(unique_path(out_dir, final_name))
    os.replace(temp, final)
    return final


def export_checked(source: ExportSource, fmt: str, out_dir: Path, images: torch.Tensor, reference: np.ndarray,
                   batch: Optional[int] = None, opset: Optional[int] = None) -> ExportResult:
    """Export to a temporary file, check parity with `reference`, then give it its final name
    (<checkpoint stem><suffix>, or -1, -2... beside an existing file, which is never replaced).
    Raises ParityError (nothing saved) when the export disagrees with PyTorch."""
    final_name = source.path.stem + SUFFIXES[fmt]
    temp = temp_path(out_dir, final_name)
    try:
        started = time.perf_counter()
        used = export_onnx(source, batch, opset, temp) if fmt == "onnx" else export_torchscript(source, batch, temp)
        exported_at = time.perf_counter()
        parity = compare(reference, exported_probabilities(fmt, temp, images, batch))
        if not parity.ok:
            raise ParityError(f"the {fmt} export of {source.model_name} disagrees with PyTorch on {parity.count} "
                              f"images: {parity.describe()}; limits: max |delta p| <= {PARITY_TOLERANCE:g} and the "
                              "same top-1; nothing was saved")
        final = publish(temp, out_dir, final_name)
        return ExportResult(fmt, final, used, exported_at - started, time.perf_counter() - exported_at, parity)
    finally:
        temp.unlink(missing_ok=True)
