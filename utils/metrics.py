"""Classification metrics over a whole split (torchmetrics), per-class table, confusion matrix.

The same `ClassificationMetrics` serves training validation, infer.py and the UI's live
panel, so the numbers agree everywhere. Two classes are treated like any other count
(softmax over 2 logits), so binary tasks report the same metrics.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

# Metric names as they appear in history.csv, checkpoints and --best_metric.
METRIC_NAMES = ("loss", "top1", "top5", "precision", "recall", "f1")


class ClassificationMetrics:
    """Accumulate predictions batch by batch; `compute()` gives split-wide numbers.

    `update` takes logits or probabilities (N, C) and integer targets (N,). Under
    torch.distributed, torchmetrics gathers the states of all ranks in `compute()`.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        scores = {
            "top1": MulticlassAccuracy(num_classes, average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "confusion": MulticlassConfusionMatrix(num_classes),
        }
        if num_classes > 5:
            scores["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        # compute_groups=False: grouping top1 with top5 (same state shapes) gives wrong top5
        self.scores = MetricCollection(scores, compute_groups=False).to(device)
        self.loss = MeanMetric().to(device)

    def update(self, scores: torch.Tensor, targets: torch.Tensor, loss: Optional[torch.Tensor] = None) -> None:
        """`loss` is the batch mean; it is weighted by the batch size."""
        self.scores.update(scores.detach().float(), targets)
        if loss is not None:
            self.loss.update(loss.detach().float(), weight=targets.numel())

    def compute(self) -> dict:
        """{"loss", "top1", ["top5"], "precision", "recall", "f1", "count"} as floats, plus "confusion"."""
        values = self.scores.compute()
        confusion = values.pop("confusion").cpu()
        result = {name: float(value) for name, value in values.items()}
        result["count"] = int(confusion.sum())
        # Every rank must join the loss sync, even one whose shard was empty (more ranks than samples).
        if self.loss.update_called or (dist.is_available() and dist.is_initialized()):
            loss = float(self.loss.compute())
            if not math.isnan(loss):  # nan: no rank passed a loss
                result["loss"] = loss
        result["confusion"] = confusion
        return result

    def reset(self) -> None:
        self.scores.reset()
        self.loss.reset()


def per_class_rows(confusion: torch.Tensor, class_names: Sequence[str]) -> list[dict]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows = truth)."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    predicted = confusion.sum(0)
    support = confusion.sum(1)
    rows = []
    for i, name in enumerate(class_names):
        precision = float(true_positive[i] / predicted[i]) if predicted[i] else 0.0
        recall = float(true_positive[i] / support[i]) if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": int(support[i])})
    return rows


def format_per_class(rows: list[dict]) -> str:
    width = max([len(r["class"]) for r in rows] + [5])
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    lines += [
        f"{r['class']:<{width}} {r['precision']:>9.4f} {r['recall']:>7.4f} {r['f1']:>7.4f} {r['support']:>8d}"
        for r in rows
    ]
    return "\n".join(lines)


def write_per_class_csv(rows: list[dict], path: str | os.PathLike) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["class", "precision", "recall", "f1", "support"])
        writer.writeheader()
        writer.writerows(rows)


def format_metrics(metrics: dict, prefix: str = "") -> str:
    """'loss 0.1234  top1 98.10%  f1 0.9790' style one-liner (and how many images were unreadable)."""
    parts = []
    for name in METRIC_NAMES:
        if name not in metrics:
            continue
        value = metrics[name]
        parts.append(f"{prefix}{name} {value * 100:.2f}%" if name.startswith("top") else f"{prefix}{name} {value:.4f}")
    if metrics.get("unreadable"):  # from utils.engine.evaluate: images that failed to decode, not counted
        parts.append(f"({metrics['unreadable']} unreadable image(s) left out)")
    return "  ".join(parts)


def plot_confusion_matrix(
    confusion: torch.Tensor, class_names: Sequence[str], path: str | os.PathLike, title: str = "Confusion matrix"
) -> None:
    """Counts and row-normalised (recall) side by side, saved as a PNG."""
    counts = confusion.double()
    normalised = counts / counts.sum(1, keepdim=True).clamp(min=1)
    size = min(24, 3 + 0.45 * len(class_names))
    fig = Figure(figsize=(2 * size + 2, size))  # no pyplot: works headless and in threads
    axes = fig.subplots(1, 2)
    for axis, matrix, label, fmt in ((axes[0], counts, "counts", "{:.0f}"), (axes[1], normalised, "normalised by true class", "{:.2f}")):
        image = axis.imshow(matrix.numpy(), cmap="Blues", vmin=0)
        axis.set_title(f"{title} ({label})")
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        ticks = range(len(class_names))
        axis.set_xticks(ticks, class_names, rotation=45, ha="right")
        axis.set_yticks(ticks, class_names)
        if len(class_names) <= 30:
            threshold = float(matrix.max()) / 2
            for i in ticks:
                for j in ticks:
                    value = float(matrix[i, j])
                    axis.text(j, i, fmt.format(value), ha="center", va="center", fontsize=8,
                              color="white" if value > threshold else "black")
        fig.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
