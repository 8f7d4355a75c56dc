"""The training losses: cross-entropy or focal loss, both taking class indices or soft targets
(the mixed labels of --mixup / --cutmix)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("ce", "focal")


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy with each class term scaled by (1 - p_c)^gamma,
    so the confident, easy examples weigh less and the hard (rare, or mislabelled) ones more.

        loss = mean over the batch of  sum_c  w_c * t_c * (1 - p_c)^gamma * (-log p_c)

    t is the one-hot (label-smoothed) target or a soft target; w the class weights (1 when None).
    gamma 0 is cross-entropy with soft targets (a plain mean over the batch, as torch's
    cross_entropy takes soft targets; with class weights and hard labels torch instead divides
    by the summed weights of the labels).
    """

    def __init__(self, gamma: float = 2.0, weight: Optional[torch.Tensor] = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        if targets.ndim == 1:  # class indices
            targets = F.one_hot(targets, num_classes).to(logits.dtype)
        if self.label_smoothing:
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        log_probs = F.log_softmax(logits.float(), dim=1)
        terms = -targets * (1 - log_probs.exp()).pow(self.gamma) * log_probs
        if self.weight is not None:
            terms = terms * self.weight
        return terms.sum(1).mean()


def create_criterion(loss: str, class_weight: Optional[torch.Tensor] = None, label_smoothing: float = 0.0,
                     focal_gamma: float = 2.0) -> nn.Module:
    """The training loss named by --loss."""
    if loss == "focal":
        return FocalLoss(focal_gamma, class_weight, label_smoothing)
    if loss == "ce":
        return nn.CrossEntropyLoss(weight=class_weight, label_smoothing=label_smoothing)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
