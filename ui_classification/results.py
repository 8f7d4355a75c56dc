"""What a viewer run produces, without Qt: per-image predictions, live metrics, the exported files.

The metrics are `utils.metrics.ClassificationMetrics`, the code training and infer.py use, fed
only with images whose parent folder is named after one of the checkpoint's classes.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from inference.predictor import PredictionBatch, topk
from ui_classification.strings import Text
from utils.files import unique_path
from utils.metrics import ClassificationMetrics, format_metrics

PREDICTIONS_CSV = "predictions.csv"
LOG_FILE = "viewer_log.txt"
CSV_FIELDS = ("path", "prediction", "probability", "true_class")


@dataclass
class ImagePrediction:
    """One classified image. `error` is set (and `probabilities` NaN) when it could not be read."""

    path: str
    probabilities: torch.Tensor  # (C,)
    top: list[tuple[str, float]]  # the k most probable (class name, probability)
    true_index: Optional[int]  # None when the parent folder is not a class name
    error: str = ""
    saved_path: str = ""  # the annotated copy, when a save folder was set

    @property
    def predicted_index(self) -> int:
        return int(self.probabilities.argmax())

    @property
    def probability(self) -> float:
        return float(self.probabilities.max())

    @property
    def correct(self) -> Optional[bool]:
        return None if self.true_index is None else self.true_index == self.predicted_index


def true_class_index(path: str, class_names: Sequence[str]) -> Optional[int]:
    """The class an image belongs to by its parent folder's name, if that is a class."""
    parent = Path(path).parent.name
    return class_names.index(parent) if parent in class_names else None


def predictions_from_batch(batch: PredictionBatch, class_names: Sequence[str], k: int = 5) -> list[ImagePrediction]:
    tops = topk(torch.nan_to_num(batch.probs, nan=0.0), class_names, k)
    return [
        ImagePrediction(path, probs, top, true_class_index(path, class_names), error)
        for path, probs, top, error in zip(batch.paths, batch.probs, tops, batch.errors)
    ]


class LiveMetrics:
    """Counts and split-wide metrics of one run, updated batch by batch."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self.metrics = ClassificationMetrics(len(class_names))
        self.total = 0  # images classified, readable or not
        self.skipped = 0
        self.labelled = 0
        self.values: Optional[dict] = None  # ClassificationMetrics.compute() over the labelled images
        self.started = time.perf_counter()
        self.elapsed = 0.0

    def add(self, predictions: Sequence[ImagePrediction]) -> None:
        readable = [p for p in predictions if not p.error]
        labelled = [p for p in readable if p.true_index is not None]
        self.total += len(predictions)
        self.skipped += len(predictions) - len(readable)
        self.labelled += len(labelled)
        if labelled:
            probs = torch.stack([p.probabilities for p in labelled])
            targets = torch.tensor([p.true_index for p in labelled])
            self.metrics.update(probs, targets)
            self.values = self.metrics.compute()
        self.elapsed = time.perf_counter() - self.started

    @property
    def images_per_second(self) -> float:
        return self.total / self.elapsed if self.elapsed > 0 else 0.0

    def per_class(self) -> list[tuple[str, int, int, int]]:
        """(class, true count, predicted count, correct) from the confusion matrix."""
        if self.values is None:
            return []
        confusion = self.values["confusion"]
        true, predicted, correct = confusion.sum(1).tolist(), confusion.sum(0).tolist(), confusion.diag().tolist()
        return list(zip(self.class_names, true, predicted, correct))

    def summary(self) -> str:
        """The metrics in the one-line format train.py and infer.py print."""
        return format_metrics(self.values) if self.values else "no image with a true class"

    def panel(self, text: Text) -> str:
        lines = [text("seen", total=self.total, labelled=self.labelled, skipped=self.skipped)]
        if self.values is None:
            lines.append(text("no_labels"))
        else:
            lines += [
                text("accuracy", value=f"{self.values['top1']:.2%}"),
                text("precision", value=f"{self.values['precision']:.4f}"),
                text("recall", value=f"{self.values['recall']:.4f}"),
                text("f1", value=f"{self.values['f1']:.4f}"),
            ]
        lines.append(text("speed", value=self.images_per_second))
        rows = self.per_class()
        if rows:
            header = [text(key) for key in ("column_class", "column_true", "column_predicted", "column_correct")]
            width = max(len(name) for name in [header[0]] + [name for name, *_ in rows])
            columns = [max(6, len(title)) for title in header[1:]]
            lines += ["", f"{header[0]:<{width}} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], columns))]
            lines += [f"{row[0]:<{width}} " + " ".join(f"{n:>{w}}" for n, w in zip(row[1:], columns)) for row in rows]
        return "\n".join(lines)


def write_predictions_csv(predictions: Sequence[ImagePrediction], class_names: Sequence[str],
                          path: str | os.PathLike) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_FIELDS)
        for item in predictions:
            truth = "" if item.true_index is None else class_names[item.true_index]
            writer.writerow([item.path, class_names[item.predicted_index], f"{item.probability:.6f}", truth])


def export_records(folder: str | os.PathLike, predictions: Sequence[ImagePrediction], class_names: Sequence[str],
                   log_lines: Sequence[str]) -> list[str]:
    """Write predictions.csv and the log into `folder` (never over existing files); returns the paths."""
    csv_path = unique_path(folder, PREDICTIONS_CSV)
    write_predictions_csv(predictions, class_names, csv_path)
    log_path = unique_path(folder, LOG_FILE)
    Path(log_path).write_text("\n".join(log_lines) + "\n", encoding="utf-8")
    return [csv_path, log_path]
