"""train_one_epoch and evaluate: the inner loops, used by train.py and tested on their own."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from utils.data import UNREADABLE
from utils.distributed import broadcast_buffers, gradient_sync, sum_over_ranks
from utils.ema import ModelEma
from utils.metrics import ClassificationMetrics
from utils.transforms import Preprocess, normalize_batch

AUX_LOSS_WEIGHT = 0.3  # GoogLeNet's weight for its auxiliary classifiers (Szegedy et al.)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training cannot go on."""


@dataclass
class StepSettings:
    """How each batch is run: device, precision, memory layout."""

    device: torch.device
    preprocess: Preprocess
    amp_dtype: Optional[torch.dtype] = None  # None: full fp32
    channels_last: bool = False
    # How train_one_epoch puts the model in training mode; train.py passes models.finetune.train_mode,
    # which keeps BatchNorms frozen by --freeze_backbone in eval mode (their statistics stay fixed).
    train_mode: Callable[[nn.Module], object] = nn.Module.train
    # MixUp/CutMix on each normalised training batch (utils.transforms.build_batch_mix): the
    # targets become soft (rows of class weights), which the losses take as they are.
    batch_mix: Optional[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 CPU batch -> normalised float batch on the device."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        return normalize_batch(images, self.preprocess, channels_last=self.channels_last), targets


def compute_loss(outputs, targets: torch.Tensor, criterion: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, main logits). GoogLeNet/Inception return (logits, aux...) in training mode."""
    if isinstance(outputs, torch.Tensor):
        return criterion(outputs, targets), outputs
    logits, *aux = outputs
    loss = criterion(logits, targets)
    for aux_logits in aux:
        if aux_logits is not None:
            loss = loss + AUX_LOSS_WEIGHT * criterion(aux_logits, targets)
    return loss, logits


def progress_bar(loader, description: str, enabled: bool) -> tqdm:
    """A tqdm bar on a terminal; nothing animated when output goes to a file or pipe."""
    return tqdm(loader, desc=description, disable=not enabled, leave=False, dynamic_ncols=True, file=sys.stderr)


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: StepSettings,
    scaler: Optional[torch.amp.GradScaler] = None,
    accum_steps: int = 1,
    grad_clip: float = 0.0,
    description: str = "train",
    show_progress: bool = True,
    ema: Optional[ModelEma] = None,
) -> dict:
    """One pass over `loader`; the scheduler steps, and `ema` updates, once per optimizer step.

    Returns {"loss", "acc", "images", "time", "images_per_s", "lr"} (loss and accuracy are
    running means over the epoch's training batches, of all ranks under torchrun). With
    settings.batch_mix the accuracy counts a prediction right when it is the label with the
    larger share of the mixed image (its dominant label).
    """
    settings.train_mode(model)
    loss_sum = torch.zeros((), device=settings.device)
    correct = torch.zeros((), device=settings.device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    bar = progress_bar(loader, description, show_progress)
    for step, (images, targets) in enumerate(bar, start=1):
        images, targets = settings.prepare(images, targets)
        if settings.batch_mix is not None:
            images, targets = settings.batch_mix(images, targets)
        optimizer_step = step % accum_steps == 0 or step == len(loader)
        with gradient_sync(model, enabled=optimizer_step):
            with settings.autocast():
                loss, logits = compute_loss(model(images), targets, criterion)
            (scaler.scale(loss / accum_steps) if scaler else loss / accum_steps).backward()
        if optimizer_step:
            _optimizer_step(model, optimizer, scaler, grad_clip)
            scheduler.step()
            if ema is not None:
                ema.update(model)
        labels = targets.argmax(1) if targets.ndim == 2 else targets  # soft targets: the dominant label
        batch = labels.numel()
        seen += batch
        loss_sum += loss.detach() * batch
        correct += (logits.detach().argmax(1) == labels).sum()
        if step % 10 == 0 or step == len(loader):  # reading values syncs a GPU: not every step
            mean_loss = loss_sum.item() / seen
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(f"the loss became {loss.item()} by step {step} of {description}")
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{mean_loss:.4f}",
                acc=f"{correct.item() / seen:.2%}",
                lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                img_s=f"{seen / elapsed:.0f}",
            )
    bar.close()
    elapsed = time.perf_counter() - start
    # Under torchrun: the epoch's numbers over all ranks, not just this rank's share.
    loss_total, correct_total, seen = sum_over_ranks([loss_sum.item(), correct.item(), seen], settings.device)
    seen = int(seen)
    return {
        "loss": loss_total / max(seen, 1),
        "acc": correct_total / max(seen, 1),
        "images": seen,
        "time": elapsed,
        "images_per_s": seen / elapsed if elapsed > 0 else math.nan,
        "lr": optimizer.param_groups[0]["lr"],
    }


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, grad_clip: float) -> None:
    if scaler:
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: nn.Module,
    settings: StepSettings,
    num_classes: int,
    description: str = "val",
    show_progress: bool = True,
    keep_outputs: bool = False,
) -> dict:
    """Metrics over the whole split (see utils.metrics.ClassificationMetrics.compute), plus
    "unreadable": images the dataset could not read (label utils.data.UNREADABLE), left out,
    and with `keep_outputs` "outputs": (log-probabilities, targets) of every image (curves,
    temperature scaling).

    Under torchrun each rank passes its own shard of the split (utils.distributed.ShardSampler)
    and compute() sums the counts of all ranks, so every rank gets the split-wide numbers.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # DDP's forward syncs buffers; shards may differ by one batch
    broadcast_buffers(model)  # under torchrun: every rank evaluates rank 0's model, the one saved
    model.eval()
    metrics = ClassificationMetrics(num_classes, settings.device)
    unreadable = 0
    for images, targets in progress_bar(loader, description, show_progress):
        readable = targets != UNREADABLE  # still on the CPU: masking costs no device sync
        if not readable.all():
            unreadable += int((~readable).sum())
            images, targets = images[readable], targets[readable]
            if not len(targets):
                continue
        images, targets = settings.prepare(images, targets)
        with settings.autocast():
            logits = model(images)
        logits = logits.float()
        metrics.update(logits, targets, criterion(logits, targets))
    result = metrics.compute()
    result["unreadable"] = int(sum_over_ranks([unreadable], settings.device)[0])
    if keep_outputs:
        result["outputs"] = metrics.outputs()
    return result
