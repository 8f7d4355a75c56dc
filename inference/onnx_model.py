"""An exported .onnx model run by onnxruntime, described by nothing but its own metadata.

    model = OnnxModel("logs/<run>/best.onnx", device="auto")
    model.class_names, model.preprocess       # read from the file's metadata_props
    probs = model.predict_uint8(batch)        # uint8 [N, 3, H, W], resized by model.preprocess -> float32 [N, C]
    probs = model.predict_arrays([rgb, ...])  # RGB uint8 (H, W, 3) of any size: resized here first

It takes the same uint8 batch as inference.predictor.Predictor.predict_batch and returns the same
probabilities (as numpy), so infer.py and the viewer can run either backend. The file layout is
described in inference/export.py and docs/export.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from utils.errors import UsageError
from utils.transforms import Preprocess, build_eval_transform

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
REQUIRED_METADATA = ("class_names", "preprocess")


ONNX_SUFFIX = ".onnx"
TORCH_MAGICS = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; the legacy pickle format
ONNX_FIRST_BYTE = b"\x08"  # protobuf tag of ModelProto.ir_version (field 1, varint), which exporters write first


def is_onnx_file(path: str | os.PathLike) -> bool:
    """True for an ONNX model: by its first bytes (a PyTorch file starts with a zip or pickle
    header, an ONNX ModelProto with its ir_version field), else by the .onnx suffix. So a
    renamed file goes to the right loader, and a damaged .onnx gets onnxruntime's error."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError:
        head = b""
    if head.startswith(TORCH_MAGICS):
        return False
    if head.startswith(ONNX_FIRST_BYTE):
        return True
    return Path(path).suffix.lower() == ONNX_SUFFIX


def providers_for(device: str) -> list:
    """onnxruntime execution providers for a --device value (auto: CUDA where this onnxruntime has it)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if device == "cuda" or device.startswith("cuda:"):
        if CUDA not in available:
            raise UsageError(f"--device {device}: this onnxruntime has no CUDA provider "
                             "(pip install onnxruntime-gpu), or use --device cpu")
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise UsageError(f"--device {device}: expected cuda or cuda:N")
        return [(CUDA, {"device_id": int(index)}), CPU]
    raise UsageError(f"--device {device}: onnxruntime models run on auto, cpu, cuda or cuda:N")


def run_batched(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, fixed_batch: Optional[int],
                max_batch: Optional[int] = None) -> np.ndarray:
    """`predict` over `images` in pieces: exactly `fixed_batch` per call for a model exported with a
    fixed batch (the last piece padded with copies of its last image, whose rows are dropped),
    otherwise up to `max_batch` per call (all at once when None)."""
    step = fixed_batch or max_batch or max(len(images), 1)
    outputs = []
    for start in range(0, len(images), step):
        piece = images[start:start + step]
        real = len(piece)
        if fixed_batch and real < fixed_batch:
            piece = np.concatenate([piece, np.repeat(piece[-1:], fixed_batch - real, axis=0)])
        outputs.append(predict(np.ascontiguousarray(piece))[:real])
    return np.concatenate(outputs) if outputs else np.empty((0, 0), dtype=np.float32)


class OnnxModel:
    """An exported model in an onnxruntime session, with its class names and preprocessing."""

    def __init__(self, path: str | os.PathLike, device: str = "auto"):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"{self.path} does not exist or is not a file")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: onnxruntime's optimiser notes are not for users
        providers = providers_for(device)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(f"{self.path} is not a readable ONNX model ({reason})") from None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.class_names, self.preprocess = _read_metadata(self.metadata, self.path)
        self.model_name = self.metadata.get("model", "unknown model")
        self.batch_size = self._check_input()  # None: any batch size
        self.output_name = self.session.get_outputs()[0].name
        self.transform = build_eval_transform(self.preprocess)

    def _check_input(self) -> Optional[int]:
        """The one input must be uint8 [N, 3, H, W] at the stored size; returns N when fixed."""
        inputs = self.session.get_inputs()
        height, width = self.preprocess.input_size
        shape = inputs[0].shape if len(inputs) == 1 else []
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or len(shape) != 4 or list(shape[1:]) != [3, height, width]:
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise UsageError(f"{self.path} takes {found}, not uint8 images [N, 3, {height}, {width}]: "
                             "it was not written by export.py")
        self.input_name = inputs[0].name
        return shape[0] if isinstance(shape[0], int) else None

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def describe(self) -> str:
        """One line for consoles and window titles, like Predictor.describe."""
        height, width = self.preprocess.input_size
        where = "CUDA" if self.providers[0] == CUDA else "CPU"
        return (f"{self.model_name}, {len(self.class_names)} classes, input {height}x{width} "
                f"({self.preprocess.resize_mode}), onnxruntime on {where}")

    def predict_uint8(self, images: np.ndarray, max_batch: Optional[int] = None) -> np.ndarray:
        """uint8 [N, 3, H, W] RGB, already resized -> float32 [N, C] probabilities."""
        height, width = self.preprocess.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, height, width):
            raise ValueError(f"expected uint8 images [N, 3, {height}, {width}], got {images.dtype} {list(images.shape)}")
        if len(images) == 0:
            return np.empty((0, len(self.class_names)), dtype=np.float32)

        def run(batch: np.ndarray) -> np.ndarray:
            return self.session.run([self.output_name], {self.input_name: batch})[0]

        return run_batched(run, images, self.batch_size, max_batch)

    def predict_arrays(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 (H, W, 3) arrays of any size -> float32 [N, C], resized by the stored rule."""
        if not arrays:
            return np.empty((0, len(self.class_names)), dtype=np.float32)
        batch = torch.stack([self.transform(torch.from_numpy(a).permute(2, 0, 1)) for a in arrays])
        return self.predict_uint8(batch.numpy())


def _read_metadata(metadata: dict[str, str], path: Path) -> tuple[list[str], Preprocess]:
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise UsageError(f"{path} has no {' or '.join(missing)} metadata: export the checkpoint with export.py")
    try:
        class_names = json.loads(metadata["class_names"])
        preprocess = json.loads(metadata["preprocess"])
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} has damaged metadata ({error})") from None
    if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names) or not class_names:
        raise UsageError(f"{path}: metadata class_names is not a list of names")
    if not isinstance(preprocess, dict):
        raise UsageError(f"{path}: metadata preprocess is not a JSON object")
    return class_names, Preprocess.from_dict(preprocess)
