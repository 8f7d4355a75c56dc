"""Classification metrics over a whole split (torchmetrics), per-class table, confusion matrix,
one-vs-rest ROC and precision-recall curves, calibration (ECE, reliability diagram).

The same `ClassificationMetrics` serves training validation, infer.py and the UI's live
panel, so the numbers agree everywhere. Two classes are treated like any other count
(softmax over 2 logits), so binary tasks report the same metrics.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

# Metric names as they appear in history.csv, checkpoints and --best_metric.
METRIC_NAMES = ("loss", "top1", "top5", "precision", "recall", "f1", "auroc", "ece")
# torchmetrics (with scipy) and matplotlib take seconds to import on a small CPU: they are imported
# where first used, so that a script stopping on a bad flag or folder answers at once.
ECE_BINS = 15  # the usual choice (Guo et al. 2017, "On Calibration of Modern Neural Networks")


def to_log_probs(scores: torch.Tensor) -> torch.Tensor:
    """Logits or probabilities (N, C) -> log-probabilities. Rows that are already probabilities
    (all in [0, 1], summing to 1) are taken as such; anything else is logits. Log-probabilities
    keep what temperature scaling needs: softmax(log_probs / T) == softmax(logits / T)."""
    scores = scores.detach().float()
    if len(scores) and scores.min() >= 0 and scores.max() <= 1 and torch.allclose(
            scores.sum(1), torch.ones(len(scores), device=scores.device), atol=1e-3):
        return scores.clamp(min=0).log()
    return scores.log_softmax(1)


def calibration_error(log_probs: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Expected calibration error (15 equal-width confidence bins, torchmetrics) of softmax(log_probs / T)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = (log_probs / temperature).softmax(1)
    return float(multiclass_calibration_error(probs, targets, log_probs.shape[1], n_bins=ECE_BINS, norm="l1"))


class ClassificationMetrics:
    """Accumulate predictions batch by batch; `compute()` gives split-wide numbers.

    `update` takes logits or probabilities (N, C) and integer targets (N,). Under
    torch.distributed, torchmetrics gathers the states of all ranks in `compute()`.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        from torchmetrics import CatMetric, MeanMetric, MetricCollection
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassConfusionMatrix,
            MulticlassF1Score,
            MulticlassPrecision,
            MulticlassRecall,
        )

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
        # Every image's log-probabilities and class: AUROC, ECE, the curves and temperature scaling
        # need them all (N x C floats; infer.py keeps the probabilities of every image anyway).
        self.log_probs = CatMetric(nan_strategy="disable").to(device)
        self.targets = CatMetric(nan_strategy="disable").to(device)

    def update(self, scores: torch.Tensor, targets: torch.Tensor, loss: Optional[torch.Tensor] = None) -> None:
        """`loss` is the batch mean; it is weighted by the batch size."""
        self.scores.update(scores.detach().float(), targets)
        self.log_probs.update(to_log_probs(scores))
        self.targets.update(targets.float())
        if loss is not None:
            self.loss.update(loss.detach().float(), weight=targets.numel())

    def compute(self, ranking: bool = True) -> dict:
        """{"loss", "top1", ["top5"], "precision", "recall", "f1", "auroc", "ece", "count"} as floats,
        plus "confusion". auroc: macro mean of the one-vs-rest AUROC of each class (a class with no
        images counts 0); ece: expected calibration error over 15 confidence bins. ranking=False leaves
        out auroc and ece, which go over every image so far (the viewer's live panel, refreshed per
        batch, would take ever longer); the others come from running counts."""
        values = self.scores.compute()
        confusion = values.pop("confusion").cpu()
        result = {name: float(value) for name, value in values.items()}
        result["count"] = int(confusion.sum())
        if result["count"] and ranking:
            from torchmetrics.functional.classification import multiclass_auroc

            log_probs, targets = self.outputs()
            result["auroc"] = float(multiclass_auroc(log_probs.softmax(1), targets, self.num_classes, average="macro"))
            result["ece"] = calibration_error(log_probs, targets)
        # Every rank must join the loss sync, even one whose shard was empty (more ranks than samples).
        if self.loss.update_called or (dist.is_available() and dist.is_initialized()):
            loss = float(self.loss.compute())
            if not math.isnan(loss):  # nan: no rank passed a loss
                result["loss"] = loss
        result["confusion"] = confusion
        return result

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities (N, C), targets (N,)) of every image so far, all ranks, on the CPU."""
        return self.log_probs.compute().reshape(-1, self.num_classes).cpu(), self.targets.compute().reshape(-1).long().cpu()

    def reset(self) -> None:
        self.scores.reset()
        self.loss.reset()
        self.log_probs.reset()
        self.targets.reset()


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
    """'loss 0.1234  top1 98.10%  f1 0.9790  auroc 0.9990  ece 0.0123' style one-liner (and how many
    images were unreadable)."""
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
    from utils.visualize import new_figure

    size = min(24, 3 + 0.45 * len(class_names))
    fig = new_figure(figsize=(2 * size + 2, size))  # no pyplot: works headless and in threads
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


CURVE_LEGEND_MAX = 20  # classes named in a curve plot's legend; more make it unreadable


def plot_curves(log_probs: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str], folder: str | os.PathLike,
                suffix: str = "", title: str = "", temperature: float = 1.0) -> list[Path]:
    """roc{suffix}.png, pr{suffix}.png (one-vs-rest per class, AUC / average precision in the
    legend) and reliability{suffix}.png (before and after temperature scaling) in `folder`."""
    from torchmetrics.functional.classification import (
        multiclass_auroc,
        multiclass_average_precision,
        multiclass_precision_recall_curve,
        multiclass_roc,
    )

    folder = Path(folder)
    num_classes = len(class_names)
    probs = (log_probs / temperature).softmax(1)
    fpr, tpr, _ = multiclass_roc(probs, targets, num_classes)
    aurocs = multiclass_auroc(probs, targets, num_classes, average=None)
    precision, recall, _ = multiclass_precision_recall_curve(probs, targets, num_classes)
    average_precision = multiclass_average_precision(probs, targets, num_classes, average=None)
    paths = [folder / f"roc{suffix}.png", folder / f"pr{suffix}.png", folder / f"reliability{suffix}.png"]
    _plot_per_class(paths[0], [(f, t) for f, t in zip(fpr, tpr)], aurocs, class_names,
                    ("false positive rate", "true positive rate", "AUC"), f"{title} ROC (one-vs-rest)".strip())
    _plot_per_class(paths[1], [(r, p) for r, p in zip(recall, precision)], average_precision, class_names,
                    ("recall", "precision", "AP"), f"{title} precision-recall (one-vs-rest)".strip())
    plot_reliability(log_probs, targets, paths[2], temperature, title)
    return paths


def _plot_per_class(path: Path, curves: list, areas: torch.Tensor, class_names: Sequence[str],
                    labels: tuple[str, str, str], title: str) -> None:
    from utils.visualize import new_figure

    fig = new_figure(figsize=(7, 6))
    axis = fig.subplots()
    for (x, y), area, name in zip(curves, areas.tolist(), class_names):
        axis.plot(x.numpy(), y.numpy(), linewidth=1, label=f"{name} ({labels[2]} {area:.3f})")
    axis.set_xlabel(labels[0])
    axis.set_ylabel(labels[1])
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_title(f"{title}, macro {labels[2]} {float(areas.mean()):.4f}")
    if len(class_names) <= CURVE_LEGEND_MAX:
        axis.legend(fontsize=8, loc="lower right" if labels[0].startswith("false") else "lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) of each of `bins` equal-width confidence bins (empty: count 0)."""
    confidence, predicted = probs.max(1)
    correct = (predicted == targets).double()
    index = (confidence * bins).long().clamp(max=bins - 1)  # [k/bins, (k+1)/bins); 1.0 in the last bin
    rows = []
    for k in range(bins):
        members = index == k
        count = int(members.sum())
        rows.append((float(confidence[members].mean()) if count else 0.0,
                     float(correct[members].mean()) if count else 0.0, count))
    return rows


def plot_reliability(log_probs: torch.Tensor, targets: torch.Tensor, path: str | os.PathLike,
                     temperature: float = 1.0, title: str = "") -> None:
    """Accuracy against confidence per bin: a calibrated model stays on the diagonal."""
    from utils.visualize import new_figure

    fig = new_figure(figsize=(6, 6))
    axis = fig.subplots()
    axis.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfectly calibrated")
    versions = [(1.0, "raw")] + ([(temperature, f"temperature {temperature:.3g}")] if temperature != 1.0 else [])
    centres = [(k + 0.5) / ECE_BINS for k in range(ECE_BINS)]
    for offset, (value, name) in zip((-0.25, 0.25), versions):
        rows = reliability_bins((log_probs / value).softmax(1), targets)
        ece = calibration_error(log_probs, targets, value)
        width = 1 / ECE_BINS / len(versions)
        axis.bar([c + offset * width * (len(versions) - 1) * 2 for c in centres],
                 [accuracy if count else 0 for _, accuracy, count in rows], width=width, alpha=0.7,
                 label=f"{name}: ECE {ece:.4f}")
    axis.set_xlabel("confidence (top probability)")
    axis.set_ylabel("accuracy")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_title(f"{title} reliability ({ECE_BINS} bins)".strip())
    axis.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
