"""Predictor: a checkpoint -> class probabilities for image files, arrays or tensors.

infer.py and the UI both use it, so they read the checkpoint, preprocess and batch the same way
as training's evaluation (utils.checkpoint, utils.transforms, utils.data.read_rgb).

    predictor = Predictor.from_checkpoint("logs/<run>/best.pth", device="auto")
    for batch in predictor.predict_paths(paths, batch_size=64, workers=2):
        batch.paths, batch.probs, batch.errors   # probs: (N, C) float tensor on the CPU
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from models.registry import check_model_name, create_model
from utils.checkpoint import load_checkpoint, load_model_weights
from utils.data import ImageReadError, create_dataloader, read_rgb
from utils.device import amp_dtype, select_device
from utils.errors import UsageError
from utils.transforms import Preprocess, build_eval_transform, normalize_batch, parse_input_shape


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
            image = torch.from_numpy(read_rgb(self.paths[index])).permute(2, 0, 1)
        except ImageReadError as error:
            return torch.zeros(3, *self.preprocess.input_size, dtype=torch.uint8), index, str(error)
        return self.transform(image), index, ""


class Predictor:
    """A model loaded once, in eval mode, with the preprocessing it was trained with."""

    def __init__(self, model: nn.Module, model_name: str, class_names: list[str], preprocess: Preprocess,
                 device: torch.device, amp: bool = False, channels_last: bool = False):
        self.model_name, self.class_names, self.preprocess, self.device = model_name, class_names, preprocess, device
        self.channels_last = channels_last
        self.dtype = amp_dtype(device, amp)
        self.model = model.to(device).eval()
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.transform = build_eval_transform(preprocess)

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "auto", model_name: Optional[str] = None,
                        class_names: Optional[Sequence[str]] = None, input_shape: Optional[Sequence[int]] = None,
                        amp: bool = False, channels_last: bool = False) -> Predictor:
        """Our checkpoints describe themselves; a bare state_dict needs model_name and class_names."""
        checkpoint = load_checkpoint(path)
        if "format" in checkpoint:
            model_name = checkpoint["model"]
            class_names = list(checkpoint["class_names"])
            preprocess = Preprocess.from_dict(checkpoint["preprocess"])
            model_kwargs = checkpoint.get("model_kwargs") or {}
        else:
            if not model_name or not class_names:
                raise UsageError(f"{path} is a bare state_dict: also give --model and --categories (class names "
                                 "in output order), and --input_shape if it is not 224")
            check_model_name(model_name)
            preprocess = Preprocess(input_size=parse_input_shape(input_shape or [224]))
            model_kwargs = {}
        model = create_model(model_name, len(class_names), tuple(preprocess.input_size), **model_kwargs)
        try:
            load_model_weights(model, checkpoint["state_dict"], path)
        except UsageError as error:
            raise UsageError(f"{error}; it was built for {len(class_names)} classes ({model_name})") from None
        return cls(model, model_name, list(class_names), preprocess, select_device(device), amp, channels_last)

    @torch.inference_mode()
    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW batch (already resized to input_size) -> (N, C) probabilities on the CPU."""
        inputs = normalize_batch(images.to(self.device, non_blocking=True), self.preprocess,
                                 channels_last=self.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext():
            logits = self.model(inputs)
        return logits.float().softmax(1).cpu()

    def predict_arrays(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 HWC arrays (any sizes) -> (N, C) probabilities."""
        batch = torch.stack([self.transform(torch.from_numpy(a).permute(2, 0, 1)) for a in arrays])
        return self.predict_batch(batch)

    def predict_paths(self, paths: Sequence[str], batch_size: int = 32, workers: int = 0) -> Iterator[PredictionBatch]:
        """Batched prediction over files; decoding runs in `workers` DataLoader processes."""
        loader = create_dataloader(PathDataset(paths, self.preprocess), batch_size, False, workers, self.device)
        for images, indices, errors in loader:
            probs = self.predict_batch(images)
            failed = torch.tensor([bool(e) for e in errors]).unsqueeze(1)
            probs = torch.where(failed, float("nan"), probs)
            yield PredictionBatch([paths[i] for i in indices.tolist()], probs, list(errors))


def topk(probs: torch.Tensor, class_names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Per row: the k most probable (class name, probability) pairs."""
    k = min(k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [[(class_names[i], float(v)) for v, i in zip(vs, ids)] for vs, ids in zip(values.tolist(), indices.tolist())]

