"""Model EMA: an exponential moving average of the weights, often better than the last weights.

After every optimizer step, each floating-point tensor of the state (parameters and BatchNorm
statistics) moves a share (1 - decay) towards the trained model's:

    ema = decay_t * ema + (1 - decay_t) * weights,   decay_t = min(decay, (1 + t) / (10 + t))

where t counts the updates so far. The warm-up in decay_t (TensorFlow's ExponentialMovingAverage
with num_updates, timm's ModelEmaV3 warm-up) lets the average forget the random initial weights
within the first steps, so short runs on small datasets profit too. Integer buffers (BatchNorm's
num_batches_tracked) are copied.

The average lives on a plain copy of the unwrapped model (never DDP or torch.compile): under
torchrun every rank holds the same weights after each step, so every rank's EMA agrees too
(BatchNorm statistics excepted; utils.engine.evaluate evaluates rank 0's, like the model's).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from utils.checkpoint import unwrap_model

DEFAULT_EMA_DECAY = 0.9998  # timm's default; the warm-up makes it short for short runs


class ModelEma:
    """`module` holds the averaged weights; `update(model)` after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float = DEFAULT_EMA_DECAY):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        """decay_t for the next update: warmed up from 0.1 towards `decay`."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        trained = unwrap_model(model).state_dict()
        for name, averaged in self.module.state_dict().items():
            if averaged.is_floating_point():
                averaged.lerp_(trained[name].to(averaged.dtype), 1 - decay)
            else:
                averaged.copy_(trained[name])
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """What last.pth keeps (plain tensors and numbers: weights_only-loadable)."""
        return {"state_dict": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["state_dict"])
        self.updates = int(state["updates"])
