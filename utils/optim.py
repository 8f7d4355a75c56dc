"""create_optimizer / create_scheduler: one place decides each, train.py calls them.

Schedulers are stepped once per optimizer step (iteration), so every length below is converted
from epochs to iterations here; a schedule behaves the same for any dataset or batch size.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
    StepLR,
)

from utils.errors import UsageError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cos", "step", "multistep", "warmup", "constant")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; biases and norm parameters (all 1-d tensors) without.

    Decaying norm scales and biases only hurts (they set scale and offset, not capacity).
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def create_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4
) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum), Adam or AdamW over `parameter_groups(model)`."""
    groups = parameter_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise UsageError(f"--optimizer_type must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: float = 0.0,
    step_size: int = 30,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_lr_ratio: float = 0.0,
) -> LRScheduler:
    """A per-iteration learning-rate schedule.

    cos        cosine from lr down to lr * min_lr_ratio over the whole run
    step       multiply by gamma every `step_size` epochs
    multistep  multiply by gamma at each epoch in `milestones`
    warmup     linear warmup over `warmup_epochs` (1 if not given), then cosine
    constant   lr unchanged
    Any `warmup_epochs` > 0 puts a linear warmup in front of the chosen schedule.
    """
    if schedule not in SCHEDULES:
        raise UsageError(f"--lr_schedule_type must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    total = max(1, epochs * iters_per_epoch)
    if schedule == "warmup" and warmup_epochs <= 0:
        warmup_epochs = 1
    warmup = min(total - 1, round(warmup_epochs * iters_per_epoch)) if warmup_epochs > 0 else 0
    if schedule in ("cos", "warmup"):
        base_lr = optimizer.param_groups[0]["lr"]
        main = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=base_lr * min_lr_ratio)
    elif schedule == "step":
        main = StepLR(optimizer, step_size=max(1, step_size * iters_per_epoch), gamma=gamma)
    elif schedule == "multistep":
        if not milestones:
            raise UsageError("--lr_schedule_type multistep needs --milestones, e.g. --milestones 30 60 90")
        steps = [m * iters_per_epoch - warmup for m in sorted(milestones)]
        main = MultiStepLR(optimizer, milestones=steps, gamma=gamma)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def restore_schedule(optimizer: torch.optim.Optimizer, scheduler: LRScheduler, optimizer_state: dict,
                     scheduler_state: dict, steps_done: int, new_length: bool = False) -> bool:
    """Continue a run's optimizer and lr schedule after `steps_done` optimizer steps.

    Normally both states load as saved. When the saved schedule no longer fits (the run
    resumes with another number of torchrun processes or another batch size, so an epoch
    has another number of steps; or --lr_scale gives another lr; or, `new_length`, another
    --epochs, so the schedule has another length), the optimizer's state (momenta) is kept
    and the fresh `scheduler` is replayed up to `steps_done`, so the lr continues from the
    same point of the run, on the schedule it now has. Returns True when it replayed.
    """
    saved_base = [group.get("initial_lr") for group in optimizer_state["param_groups"]]
    fresh_base = [group.get("initial_lr") for group in optimizer.param_groups]
    if not new_length and scheduler_state.get("last_epoch") == steps_done and saved_base == fresh_base:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
        for _ in range(steps_done):
            scheduler.step()
    replayed = [(group["lr"], group["initial_lr"]) for group in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    for group, (lr, initial_lr) in zip(optimizer.param_groups, replayed):
        group["lr"], group["initial_lr"] = lr, initial_lr
    return True
