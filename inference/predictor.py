"""Predictor: a checkpoint or an exported .onnx -> class probabilities for image files, arrays or tensors.

infer.py and the UI both use it, so they read the checkpoint, preprocess and batch the same way
as training's evaluation (utils.checkpoint, utils.transforms, utils.data.read_rgb).

    predictor = Predictor.from_file("logs/<run>/best.pth", device="auto")   # or best.onnx
    for batch in predictor.predict_paths(paths, batch_size=64, workers=2):
        batch.paths, batch.probs, batch.errors   # probs: (N, C) float tensor on the CPU
    results = Predictions.collect(predictor.predict_paths(paths), predictor.class_names, labels)
    results.metrics()                            # the same ClassificationMetrics as training
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from inference.decoding import ThreadedDecoder, plan_threads
from inference.onnx_model import CUDA, OnnxModel, is_onnx_file
from models.registry import check_model_name, create_model
from utils.checkpoint import CHECKPOINT_FORMAT, checkpoint_temperature, load_checkpoint, load_model_weights
from utils.data import ImageReadError, available_cores, create_dataloader, default_workers, read_rgb
from utils.device import amp_dtype, describe_device, select_device
from utils.errors import UsageError
from utils.transforms import (
    DEFAULT_INPUT_SIDE,
    Preprocess,
    build_eval_transform,
    normalize_batch,
    parse_input_shape,
)

_NCHW_PREFERRED = ("vit_", "swin_", "maxvit", "convnext")  # models that channels_last does not speed up
_INFO_KEYS = ("format", "epoch", "metrics", "created", "pretrained", "suggested_min_confidence")  # kept from the checkpoint for display


@dataclass
class PredictionBatch:
    paths: list[str]
    probs: torch.Tensor  # (N, C) on the CPU; rows of unreadable files are NaN
    errors: list[str]  # "" where the image was read, else the reason


class PathDataset(torch.utils.data.Dataset):
    """Image paths -> (uint8 CHW tensor, index, error). An unreadable file yields a blank image
    and its error text, so one bad file never stops a folder."""

    def __init__(self, paths: Sequence[str], preprocess: Preprocess):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.transform = build_eval_transform(preprocess)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            # min_size: large JPEGs are decoded smaller, as in train.py's evaluation (utils.data.read_rgb)
            image = torch.from_numpy(read_rgb(self.paths[index], self.transform.source_min_size)).permute(2, 0, 1)
        except ImageReadError as error:
            return torch.zeros(3, *self.preprocess.input_size, dtype=torch.uint8), index, str(error)
        return self.transform(image), index, ""


class TorchBackend:
    """A PyTorch model on a device, in eval mode: uint8 batch -> probabilities."""

    name = "torch"

    def __init__(self, model: nn.Module, preprocess: Preprocess, device: torch.device, amp: bool = False,
                 channels_last: bool = False, temperature: float = 1.0):
        self.preprocess, self.device, self.channels_last = preprocess, device, channels_last
        self.temperature = float(temperature)  # probabilities = softmax(logits / temperature) (utils.calibration)
        self.dtype = amp_dtype(device, amp)
        self.model: Optional[nn.Module] = model.to(device).eval()
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def where(self) -> str:
        return f"on {describe_device(self.device)}"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        inputs = normalize_batch(images.to(self.device, non_blocking=True), self.preprocess,
                                 channels_last=self.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext():
            logits = self.model(inputs)
        return (logits.float() / self.temperature).softmax(1).cpu()


class OnnxBackend:
    """An exported .onnx in onnxruntime (inference.onnx_model.OnnxModel). Its graph does the
    /255, mean/std and softmax itself, so it gets the uint8 batch as it comes from PathDataset."""

    name = "onnxruntime"
    model: Optional[nn.Module] = None  # no PyTorch module to hook (Grad-CAM etc. need the .pth)
    channels_last = False

    def __init__(self, onnx_model: OnnxModel):
        self.onnx_model = onnx_model
        # the graph already divides by the checkpoint's temperature; kept for reports (1.0 in older exports)
        self.temperature = float(onnx_model.metadata.get("temperature", 1.0))

    def where(self) -> str:
        return "onnxruntime on " + ("CUDA" if self.onnx_model.providers[0] == CUDA else "CPU")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.onnx_model.predict_uint8(images.cpu().numpy()))


class Predictor:
    """A model loaded once, with the preprocessing it was trained with, behind one interface for
    PyTorch checkpoints (TorchBackend) and exported .onnx files (OnnxBackend)."""

    def __init__(self, backend: TorchBackend | OnnxBackend, model_name: str, class_names: list[str],
                 preprocess: Preprocess, device: torch.device):
        # device: where the DataLoader delivers batches (pinned memory, worker count); for onnxruntime
        # the CPU, or CUDA when onnxruntime runs there and torch sees CUDA too.
        self.backend, self.model_name, self.class_names = backend, model_name, class_names
        self.preprocess, self.device = preprocess, device
        self.transform = build_eval_transform(preprocess)
        self.checkpoint_info: dict = {}  # format, epoch, metrics, created: empty for a bare state_dict
        self.decoding: dict = {}  # how the last predict_paths decoded: decode_threads, workers, torch_threads

    @property
    def model(self) -> Optional[nn.Module]:
        """The PyTorch module; None for an .onnx model."""
        return self.backend.model

    @property
    def channels_last(self) -> bool:
        return self.backend.channels_last

    @property
    def temperature(self) -> float:
        """The calibration temperature the probabilities are made with (1.0: uncalibrated)."""
        return self.backend.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.backend.temperature = float(value)

    @classmethod
    def from_file(cls, path: str, device: str = "auto", model_name: Optional[str] = None,
                  class_names: Optional[Sequence[str]] = None, input_shape: Optional[Sequence[int]] = None,
                  amp: bool = False, channels_last: Optional[bool] = None) -> Predictor:
        """What infer.py and the viewer load: an exported ONNX model (told by its content, else by
        the .onnx suffix) runs in onnxruntime, anything else is read as a PyTorch checkpoint.
        model_name, input_shape, amp and channels_last apply to checkpoints only: an .onnx file
        fixes them (infer.py prints a note)."""
        if is_onnx_file(path):
            return cls.from_onnx(path, device, class_names)
        return cls.from_checkpoint(path, device, model_name, class_names, input_shape, amp, channels_last)

    @classmethod
    def from_onnx(cls, path: str, device: str = "auto", class_names: Optional[Sequence[str]] = None) -> Predictor:
        """An .onnx from export.py; class_names may rename its classes, one name per class."""
        onnx_model = OnnxModel(path, device)
        names = _checked_renaming(onnx_model.class_names, class_names, path)
        on_cuda = onnx_model.providers[0] == CUDA and torch.cuda.is_available()
        predictor = cls(OnnxBackend(onnx_model), onnx_model.model_name, names, onnx_model.preprocess,
                        torch.device("cuda") if on_cuda else torch.device("cpu"))
        predictor.checkpoint_info = {key: onnx_model.metadata[key] for key in ("format", "created")
                                     if key in onnx_model.metadata}
        return predictor

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto", model_name: Optional[str] = None,
                        class_names: Optional[Sequence[str]] = None, input_shape: Optional[Sequence[int]] = None,
                        amp: bool = False, channels_last: Optional[bool] = None) -> Predictor:
        """Our checkpoints describe themselves; a bare state_dict needs model_name and class_names.

        channels_last None: on where it is faster (see `prefers_channels_last`).
        """
        target = select_device(device)  # a wrong --device fails before the checkpoint loads
        checkpoint = load_checkpoint(path)  # checks the fields read below (utils.checkpoint.check_fields)
        if checkpoint.get("format") == CHECKPOINT_FORMAT:
            model_name = checkpoint["model"]
            class_names = _checked_renaming(list(checkpoint["class_names"]), class_names, path)
            preprocess = Preprocess.from_dict(checkpoint["preprocess"])
            model_kwargs = checkpoint.get("model_kwargs") or {}
            try:
                model = create_model(model_name, len(class_names), tuple(preprocess.input_size), weights_follow=True,
                                     **model_kwargs)
            except UsageError as error:  # the stored model, input size or model_kwargs: the file's fault
                raise UsageError(f"checkpoint {path} holds a model that cannot be built: {error}") from None
        else:
            if not model_name or not class_names:
                raise UsageError(f"{path} is a bare state_dict: also give --model and --categories (class names "
                                 f"in output order), and --input_shape if it is not {DEFAULT_INPUT_SIDE}")
            check_model_name(model_name)
            preprocess = Preprocess(input_size=parse_input_shape(input_shape)) if input_shape else Preprocess()
            model = create_model(model_name, len(class_names), tuple(preprocess.input_size), weights_follow=True)
        _check_head_size(model, checkpoint["state_dict"], len(class_names), path)
        try:
            load_model_weights(model, checkpoint["state_dict"], path)
        except UsageError as error:
            raise UsageError(f"{error}; it was built for {len(class_names)} classes ({model_name})") from None
        if channels_last is None:
            channels_last = prefers_channels_last(model_name, target)
        backend = TorchBackend(model, preprocess, target, amp, channels_last, checkpoint_temperature(checkpoint))
        predictor = cls(backend, model_name, list(class_names), preprocess, target)
        predictor.checkpoint_info = {key: checkpoint[key] for key in _INFO_KEYS if key in checkpoint}
        return predictor

    def describe(self) -> str:
        """One line for consoles and window titles."""
        height, width = self.preprocess.input_size
        return (f"{self.model_name}, {len(self.class_names)} classes, input {height}x{width} "
                f"({self.preprocess.resize_mode}), {self.backend.where()}")

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW batch (already resized to input_size) -> (N, C) probabilities on the CPU."""
        return self.backend(images)

    def predict_arrays(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 HWC arrays (any sizes) -> (N, C) probabilities."""
        batch = torch.stack([self.transform(torch.from_numpy(a).permute(2, 0, 1)) for a in arrays])
        return self.predict_batch(batch)

    def predict_paths(self, paths: Sequence[str], batch_size: int = 32, workers: int = 0) -> Iterator[PredictionBatch]:
        """Batched prediction over files, in order; an unreadable file gets a NaN row and its error.

        workers 0 (the default; infer.py's on the CPU): decoding runs in threads of this process,
        one batch ahead of the model (inference.decoding), and the forward pass keeps all its
        intra-op threads. workers > 0: DataLoader processes decode, and on the CPU the forward
        pass gets the cores they leave free (`_cpu_share`). `self.decoding` says which ran.
        """
        dataset = PathDataset(paths, self.preprocess)
        if workers > 0:
            with _cpu_share(self.device, workers):
                self.decoding = {"decode_threads": 0, "workers": workers, "torch_threads": torch.get_num_threads()}
                for images, indices, errors in create_dataloader(dataset, batch_size, False, workers, self.device):
                    yield self._predicted(images, [paths[i] for i in indices.tolist()], list(errors))
            return
        # The first batch is decoded by one thread per core (the model has nothing to do yet); then
        # plan_threads sizes the decoding from that batch's decode CPU time and forward time.
        cores = available_cores()
        decoder = ThreadedDecoder(dataset.__getitem__, len(dataset), batch_size, threads=cores, max_threads=cores)
        self.decoding = {"decode_threads": cores, "workers": 0, "torch_threads": torch.get_num_threads()}
        with contextlib.closing(iter(decoder)) as batches:
            for number, batch in enumerate(batches):
                started = time.perf_counter()
                predicted = self._predicted(batch.images, [paths[i] for i in batch.indices], batch.errors)
                if number == 0 and len(dataset) > batch_size:  # a next batch exists: plan its decoding
                    decoder.threads = plan_threads(batch.decode_seconds, time.perf_counter() - started, cores)
                    self.decoding["decode_threads"] = decoder.threads
                yield predicted

    def _predicted(self, images: torch.Tensor, paths: list[str], errors: list[str]) -> PredictionBatch:
        probs = self.predict_batch(images)
        failed = torch.tensor([bool(e) for e in errors]).unsqueeze(1)
        return PredictionBatch(paths, torch.where(failed, float("nan"), probs), errors)


CPU_WORKERS_FROM = 64  # images; below this a worker's start-up costs more than it saves


def inference_workers(num_images: int, device: torch.device) -> int:
    """Decoding processes for predicting `num_images` files on `device`.

    On the CPU the workers take cores from the model, and decoding a photo costs a fraction of
    a forward pass, so a quarter of the cores (at least one) keep the model fed.
    """
    if device.type != "cpu":
        return default_workers(num_images)
    cores = available_cores()
    if num_images < CPU_WORKERS_FROM or cores < 2:
        return 0
    return max(1, cores // 4)


def prediction_workers(num_images: int, device: torch.device) -> int:
    """Decoding processes for infer.py: none on the CPU (threads of the predicting process decode,
    see `Predictor.predict_paths`), on an accelerator as for training's evaluation."""
    return 0 if device.type == "cpu" else default_workers(num_images)


@contextlib.contextmanager
def _cpu_share(device: torch.device, workers: int) -> Iterator[None]:
    """Run the CPU forward pass on the cores the decoding workers leave free, then restore.

    Workers and intra-op threads together beyond the core count made batched inference 2-3x
    slower on a busy 2-core machine: OpenMP threads wait at every layer for a descheduled peer.
    """
    if device.type != "cpu" or workers == 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, available_cores() - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def topk(probs: torch.Tensor, class_names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Per row: the k most probable (class name, probability) pairs."""
    k = min(k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [[(class_names[i], float(v)) for v, i in zip(vs, ids)] for vs, ids in zip(values.tolist(), indices.tolist())]



def prefers_channels_last(model_name: str, device: torch.device) -> bool:
    """NHWC on the CPU: convolutional nets ran 10-40% faster per image in batches (oneDNN;
    resnet18, mobilenet_v3_small, efficientnet_b0, shufflenet), while transformers were level
    or a little slower (convnext_tiny, vit_b_16), measured on a 2-core AVX-512 CPU."""
    return device.type == "cpu" and not model_name.startswith(_NCHW_PREFERRED)


UNKNOWN = "unknown"  # the answer when the top probability is below --min_confidence


def below_min_confidence(probs: torch.Tensor, min_confidence: Optional[float]) -> torch.Tensor:
    """(N,) bool: the top probability of the row is below min_confidence, so the answer is UNKNOWN
    (all False without a threshold; NaN rows, unreadable files, are never below)."""
    if min_confidence is None:
        return torch.zeros(probs.shape[0], dtype=torch.bool)
    return probs.max(dim=1).values < min_confidence


def coverage_counts(probs: torch.Tensor, labels: torch.Tensor, min_confidence: Optional[float]) -> tuple[int, int, int]:
    """Over evaluated rows (read, with a true class): (count, answered, answered right). Counts add
    up batch by batch, so the viewer's live metrics and infer.py's report come out the same."""
    answered = ~below_min_confidence(probs, min_confidence)
    right = int((probs.argmax(dim=1)[answered] == labels[answered]).sum())
    return len(labels), int(answered.sum()), right


def coverage_report(min_confidence: Optional[float], count: int, answered: int, right: int) -> dict:
    """unknown (count), coverage (share answered) and covered_accuracy (accuracy on the answered)."""
    return {"min_confidence": min_confidence, "unknown": count - answered,
            "coverage": answered / count if count else None,
            "covered_accuracy": right / answered if answered else None}


@dataclass
class Predictions:
    """All predictions of one run in input order, with the ground truth when it is known.

    With `min_confidence` P, an image whose top (calibrated) probability is below P gets the
    answer UNKNOWN: it is not counted as a mistake, and the metrics add how many images were
    answered (coverage) and the accuracy on those. top1, f1 and the like stay those of the
    model's best guess on every image, so they compare with training's.
    """

    paths: list[str]
    probs: torch.Tensor  # (N, C) on the CPU; NaN rows for unreadable files
    errors: list[str]  # "" where the image was read, else the reason
    class_names: list[str]
    labels: Optional[torch.Tensor] = None  # (N,) true class index per file, for a labelled tree
    temperature: float = 1.0  # the one the probabilities were made with (Predictor.temperature)
    min_confidence: Optional[float] = None  # below it the answer is UNKNOWN; None: always answer
    cam_points: Optional[torch.Tensor] = None  # (N, 2) heat-map peak (x, y) in original pixels; NaN: none

    @classmethod
    def collect(cls, batches: Iterable[PredictionBatch], class_names: Sequence[str],
                labels: Optional[Sequence[int]] = None) -> Predictions:
        paths: list[str] = []
        probs: list[torch.Tensor] = []
        errors: list[str] = []
        for batch in batches:
            paths += batch.paths
            probs.append(batch.probs)
            errors += batch.errors
        stacked = torch.cat(probs) if probs else torch.empty(0, len(class_names))
        truth = torch.as_tensor(list(labels), dtype=torch.long) if labels is not None else None
        return cls(paths, stacked, errors, list(class_names), truth)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def readable(self) -> torch.Tensor:
        """(N,) bool: the image was read and predicted."""
        return torch.tensor([not error for error in self.errors], dtype=torch.bool)

    def top1(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(confidence, class index) per row; NaN confidence for unreadable files."""
        return self.probs.max(dim=1)

    def topk(self, k: int) -> list[list[tuple[str, float]]]:
        """Per file, the k most probable (class name, probability); [] for unreadable files."""
        ranked = topk(self.probs, self.class_names, k)
        return [pairs if not error else [] for pairs, error in zip(ranked, self.errors)]

    def unknown(self) -> torch.Tensor:
        """(N,) bool: read, but the top probability is below min_confidence (answer UNKNOWN)."""
        return self.readable & below_min_confidence(self.probs, self.min_confidence)

    def answers(self) -> list[Optional[str]]:
        """Per file: the predicted class name, UNKNOWN, or None for an unreadable file."""
        _, predicted = self.top1()
        unknown = self.unknown().tolist()
        return [None if error else UNKNOWN if unsure else self.class_names[int(index)]
                for error, unsure, index in zip(self.errors, unknown, predicted.tolist())]

    def unreadable(self) -> list[tuple[str, str]]:
        return [(path, error) for path, error in zip(self.paths, self.errors) if error]

    def evaluated(self) -> torch.Tensor:
        """(N,) bool: has a label and was read, so it counts in the metrics."""
        if self.labels is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.readable

    def metrics(self) -> Optional[dict]:
        """Split-wide metrics over the evaluated files with utils.metrics.ClassificationMetrics
        (the class training validates with, so the numbers agree); None without labels."""
        mask = self.evaluated()
        if not mask.any():
            return None
        from utils.metrics import ClassificationMetrics, calibration_error  # torchmetrics: seconds to import

        scores = ClassificationMetrics(len(self.class_names))
        scores.update(self.probs[mask], self.labels[mask])  # type: ignore[index]
        result = scores.compute()
        # ece: of the uncalibrated probabilities (softmax(logits) = softmax(T * log p)), as in training;
        # ece_calibrated: of the probabilities reported, softmax(logits / T).
        log_probs, targets = self.evaluated_outputs()
        result["ece_calibrated"] = result["ece"]
        result["ece"] = calibration_error(log_probs, targets, 1 / self.temperature)
        if self.min_confidence is not None:
            result.update(self._coverage(mask))
        return result

    def _coverage(self, evaluated: torch.Tensor) -> dict:
        """unknown (count), coverage (share answered) and covered_accuracy over the evaluated files."""
        counts = coverage_counts(self.probs[evaluated], self.labels[evaluated], self.min_confidence)  # type: ignore[index]
        return coverage_report(self.min_confidence, *counts)

    def evaluated_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities, true classes) of the evaluated files: what the curves are drawn from."""
        from utils.metrics import to_log_probs

        mask = self.evaluated()
        return to_log_probs(self.probs[mask]), self.labels[mask]  # type: ignore[index]

    def mistakes(self) -> list[int]:
        """Indices of wrongly predicted evaluated files, most confident mistake first (an UNKNOWN
        answer is no mistake)."""
        if self.labels is None:
            return []
        confidence, predicted = self.top1()
        wrong = self.evaluated() & ~self.unknown() & (predicted != self.labels)
        indices = wrong.nonzero().flatten().tolist()
        return sorted(indices, key=lambda i: -float(confidence[i]))


def parse_categories(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    """`--categories daisy dandelion` or `--categories daisy,dandelion` -> ["daisy", "dandelion"].

    With a comma anywhere, names are split on commas only, so "sea lion,seal" keeps its space.
    """
    if not values:
        return None
    if any("," in value for value in values):
        names = [name.strip() for value in values for name in value.split(",")]
    else:
        names = [value.strip() for value in values]
    names = [name for name in names if name]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"--categories names {', '.join(repeated)} more than once; each class needs its own name")
    if not names:
        raise UsageError("--categories is empty: give the class names in output order, e.g. --categories cat dog")
    return names


def _checked_renaming(saved: list[str], given: Optional[Sequence[str]], path: str) -> list[str]:
    """Our checkpoint names its classes; --categories may rename them, one name per class."""
    if not given:
        return saved
    if len(given) != len(saved):
        shown = ", ".join(saved[:10]) + (", ..." if len(saved) > 10 else "")
        raise UsageError(f"--categories gives {len(given)} names but {path} was trained for {len(saved)} classes "
                         f"({shown}); drop --categories or give exactly {len(saved)} names")
    return list(given)


def _check_head_size(model: nn.Module, state_dict: dict[str, torch.Tensor], num_classes: int, path: str) -> None:
    """Name the real cause when the only tensors that do not fit are the classifier's outputs."""
    own = model.state_dict()
    mismatched = [key for key in own if key in state_dict and state_dict[key].shape != own[key].shape]
    if not mismatched:
        return
    head_sizes = set()
    for key in mismatched:
        mine, theirs = own[key].shape, state_dict[key].shape
        if not mine or len(mine) != len(theirs) or mine[0] != num_classes or mine[1:] != theirs[1:]:
            return  # not just a head of another size: load_model_weights reports it
        head_sizes.add(theirs[0])
    if len(head_sizes) == 1:
        (size,) = head_sizes
        raise UsageError(f"{path} has a {size}-class head ({mismatched[0]}) but {num_classes} class names were "
                         f"given (--categories); give exactly {size} names, in the model's output order")
