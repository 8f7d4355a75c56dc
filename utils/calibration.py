"""Calibrated probabilities: temperature scaling and the suggested confidence threshold.

A network trained with cross-entropy is usually over-confident: of the images it gives 95%,
fewer than 95% are right. Temperature scaling (Guo et al. 2017) divides the logits by one
scalar T > 0 fitted on the validation split (minimum negative log-likelihood); the predicted
class never changes, only how sure the probabilities say the model is. train.py fits T at the
end of training and stores it in the checkpoint as `temperature`; infer.py, the viewer and
export use softmax(logits / T).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

LBFGS_STEPS = 50  # one scalar: converges in a handful of steps; the bound keeps it finite
TEMPERATURE_RANGE = (0.05, 20.0)  # beyond this the fit says more about the split than the model
TARGET_PRECISION = 0.99  # suggested_min_confidence keeps this share of the answers right on val


def fit_temperature(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """The T minimising the cross-entropy of softmax(log_probs / T) on (N, C) log-probabilities
    (or logits: the same T) and (N,) targets; LBFGS on log T, so T stays positive. 1.0 for no images."""
    if not len(targets):
        return 1.0
    # clone: evaluate() makes them under inference_mode, and autograd may not save such tensors
    log_probs, targets = log_probs.detach().double().cpu().clone(), targets.cpu().clone()
    log_probs = log_probs.clamp(min=torch.finfo(torch.float32).min)  # log(0) = -inf would give NaN gradients
    log_temperature = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.5, max_iter=LBFGS_STEPS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(log_probs / log_temperature.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may sit under inference_mode
        optimizer.step(closure)
    temperature = float(log_temperature.detach().exp())
    if not torch.isfinite(torch.tensor(temperature)):
        return 1.0
    return min(max(temperature, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])


def suggested_min_confidence(probs: torch.Tensor, targets: torch.Tensor,
                             precision: float = TARGET_PRECISION) -> Optional[float]:
    """The lowest threshold P such that, of the images whose top probability is >= P, at least
    `precision` are predicted right (on val, with calibrated probabilities). Below P the answer
    becomes "unknown" (infer.py --min_confidence auto). None when no threshold reaches it."""
    if not len(targets):
        return None
    confidence, predicted = probs.max(1)
    order = confidence.argsort(descending=True)
    confidence, correct = confidence[order], (predicted == targets)[order].double()
    kept_precision = correct.cumsum(0) / torch.arange(1, len(correct) + 1, dtype=torch.float64)
    # A threshold keeps every image at or above it, so only the last of equal confidences counts.
    last_of_equal = torch.ones(len(confidence), dtype=torch.bool)
    last_of_equal[:-1] = confidence[:-1] != confidence[1:]
    good = ((kept_precision >= precision) & last_of_equal).nonzero().flatten()
    if not len(good):
        return None
    return float(confidence[good[-1]])
