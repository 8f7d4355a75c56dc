"""What a viewer run produces, without Qt: per-image results, live metrics, the recorded files.

One labelling rule and one file format with infer.py: an image's true class comes from
inference.inputs.find_labels (the chosen folder laid out as <class>/<images>, every first-level
folder a class of the checkpoint), and Record writes predictions.csv with infer.py's own writer
(inference.results.write_csv), and predictions.json with its metrics with infer.py's
write_json_report. The metrics are utils.metrics.ClassificationMetrics, the code
training and infer.py use.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from inference.inputs import ImageInputs, find_labels
from inference.predictor import (
    PredictionBatch,
    Predictions,
    below_min_confidence,
    coverage_counts,
    coverage_report,
    topk,
)
from inference.results import write_csv, write_json_report
from ui_classification.strings import Text
from utils.checkpoint import timestamp
from utils.files import unique_path
from utils.metrics import ClassificationMetrics, per_class_rows, write_per_class_csv

PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_JSON = "predictions.json"
PER_CLASS_CSV = "per_class.csv"
LOG_FILE = "viewer_log.txt"
TOP_K = 5


@dataclass
class ImagePrediction:
    """One classified image as the window shows it (a row of inference.predictor.Predictions).
    `error` is set (and `probabilities` NaN) when it could not be read."""

    path: str
    probabilities: torch.Tensor  # (C,)
    top: list[tuple[str, float]]  # the k most probable (class name, probability)
    true_index: Optional[int]  # None when the folder is not a labelled tree
    error: str = ""
    saved_path: str = ""  # the annotated copy, when a save folder was set
    unknown: bool = False  # the top probability is below --min_confidence: the answer is "unknown"

    @property
    def predicted_index(self) -> int:
        return int(self.probabilities.argmax())

    @property
    def probability(self) -> float:
        return float(self.probabilities.max())

    @property
    def correct(self) -> Optional[bool]:
        """None without a true class, or when the answer is "unknown" (no answer, so no mistake: infer.py's rule)."""
        return None if self.true_index is None or self.unknown else self.true_index == self.predicted_index


def folder_labels(folder: str, paths: Sequence[str], class_names: Sequence[str]) -> tuple[Optional[dict], Optional[str]]:
    """({path: true class index}, None) for a labelled tree, else (None, why not or None): infer.py's rule."""
    labels, why = find_labels(ImageInputs(list(paths), folder=folder), class_names)
    return (dict(zip(paths, labels.indices)) if labels else None), why


def predictions_from_batch(batch: PredictionBatch, class_names: Sequence[str], labels: Optional[dict],
                           k: int = TOP_K, min_confidence: Optional[float] = None) -> list[ImagePrediction]:
    tops = topk(torch.nan_to_num(batch.probs, nan=0.0), class_names, k)
    unknown = below_min_confidence(batch.probs, min_confidence).tolist()
    return [
        ImagePrediction(path, probs, top, labels.get(path) if labels else None, error, unknown=unsure)
        for path, probs, top, error, unsure in zip(batch.paths, batch.probs, tops, batch.errors, unknown)
    ]


def as_predictions(items: Sequence[ImagePrediction], class_names: Sequence[str], labelled: bool,
                   min_confidence: Optional[float] = None) -> Predictions:
    """The run as the column-wise Predictions infer.py writes its files from."""
    probs = torch.stack([item.probabilities for item in items]) if items else torch.empty(0, len(class_names))
    labels = torch.tensor([item.true_index for item in items], dtype=torch.long) if labelled and items else None
    return Predictions([item.path for item in items], probs, [item.error for item in items], list(class_names), labels,
                       min_confidence=min_confidence)


class LiveMetrics:
    """Counts and split-wide metrics of one run, updated batch by batch."""

    def __init__(self, class_names: Sequence[str], min_confidence: Optional[float] = None):
        self.class_names = list(class_names)
        self.min_confidence = min_confidence  # below it the answer is "unknown" (inference.predictor's rule)
        self.unknown = 0  # readable images answered "unknown", labelled or not
        self.coverage = (0, 0, 0)  # over the labelled images: (count, answered, answered right)
        self.metrics = ClassificationMetrics(len(class_names))
        self.total = 0  # images classified, readable or not
        self.skipped = 0
        self.labelled = 0
        self.values: Optional[dict] = None  # ClassificationMetrics.compute() over the labelled images, auroc/ece aside
        self.started = time.perf_counter()
        self.elapsed = 0.0

    def add(self, predictions: Sequence[ImagePrediction]) -> None:
        readable = [p for p in predictions if not p.error]
        labelled = [p for p in readable if p.true_index is not None]
        self.total += len(predictions)
        self.skipped += len(predictions) - len(readable)
        self.labelled += len(labelled)
        self.unknown += sum(p.unknown for p in readable)
        if labelled:
            probs = torch.stack([p.probabilities for p in labelled])
            targets = torch.tensor([p.true_index for p in labelled])
            self.metrics.update(probs, targets)
            self.values = self.metrics.compute(ranking=False)  # per batch in the GUI thread: no pass over every image
            counts = coverage_counts(probs, targets, self.min_confidence)
            self.coverage = tuple(total + new for total, new in zip(self.coverage, counts))
        self.elapsed = time.perf_counter() - self.started

    @property
    def images_per_second(self) -> float:
        return self.total / self.elapsed if self.elapsed > 0 else 0.0

    def per_class(self) -> list[dict]:
        """utils.metrics.per_class_rows: precision, recall, F1 and support per class, as in training."""
        return per_class_rows(self.values["confusion"], self.class_names) if self.values else []

    def summary(self, text: Text) -> str:
        """The metrics for the log, in the window's language (the names of the panel)."""
        if self.values is None:
            return text("no_labels")
        return text("summary", accuracy=f"{self.values['top1']:.2%}", precision=f"{self.values['precision']:.4f}",
                    recall=f"{self.values['recall']:.4f}", f1=f"{self.values['f1']:.4f}")

    def panel(self, text: Text) -> str:
        """The summary above the per-class table (that one is a table widget in the window: see per_class)."""
        lines = [text("seen", total=self.total - self.skipped, labelled=self.labelled, skipped=self.skipped)]
        if self.values is None:
            lines.append(text("no_labels"))
        else:
            lines += [
                text("accuracy", value=f"{self.values['top1']:.2%}"),
                text("precision", value=f"{self.values['precision']:.4f}"),
                text("recall", value=f"{self.values['recall']:.4f}"),
                text("f1", value=f"{self.values['f1']:.4f}"),
            ]
        if self.min_confidence is not None:
            lines.append(self._unknown_line(text))
        lines.append(text("speed", value=self.images_per_second))
        return "\n".join(lines)

    def coverage_summary(self) -> dict:
        """infer.py's unknown, coverage and covered_accuracy over the labelled images so far."""
        return coverage_report(self.min_confidence, *self.coverage)

    def _unknown_line(self, text: Text) -> str:
        readable = self.total - self.skipped
        line = text("unknown_count", count=self.unknown, total=readable, threshold=f"{self.min_confidence:.2%}")
        report = self.coverage_summary()
        if report["coverage"] is not None:
            accuracy = report["covered_accuracy"]
            line += "\n" + text("coverage", coverage=f"{report['coverage']:.2%}",
                                 accuracy="-" if accuracy is None else f"{accuracy:.2%}")
        return line


def run_description(checkpoint: str, model: str, device: str, temperature: float, folder: Optional[str]) -> dict:
    """The head of predictions.json, with infer.py's keys (its `run` in write_outputs)."""
    return {"checkpoint": checkpoint, "model": model, "inputs": [folder] if folder else [], "device": device,
            "created": timestamp(), "topk": TOP_K, "temperature": temperature, "min_confidence": None}


def export_records(folder: str, items: Sequence[ImagePrediction], class_names: Sequence[str], labelled: bool,
                   log_lines: Sequence[str], min_confidence: Optional[float] = None,
                   run: Optional[dict] = None) -> list[str]:
    """infer.py's predictions.csv and predictions.json (every image of the run so far; the JSON holds
    the metrics, computed by Predictions.metrics as infer.py computes them), per_class.csv for a
    labelled folder, and the log (`unknown` below `min_confidence`, as infer.py), into `folder`, never over existing files; returns the paths."""
    run = {**(run or run_description("", "", "", 1.0, None)), "min_confidence": min_confidence}
    results = as_predictions(items, class_names, labelled, min_confidence)
    results.min_confidence = min_confidence
    results.temperature = run["temperature"]  # ece is reported for the uncalibrated probabilities, as infer.py does
    metrics = results.metrics()  # None unless some image has a true class
    csv_path = unique_path(folder, PREDICTIONS_CSV)
    write_csv(results, csv_path, TOP_K)
    json_path = unique_path(folder, PREDICTIONS_JSON)
    write_json_report(results, json_path, TOP_K, run, metrics)
    files = [csv_path, json_path]
    if metrics is not None:
        files.append(unique_path(folder, PER_CLASS_CSV))
        write_per_class_csv(per_class_rows(metrics["confusion"], results.class_names), files[-1])
    log_path = unique_path(folder, LOG_FILE)
    Path(log_path).write_text("\n".join(log_lines) + "\n", encoding="utf-8")
    return [*files, log_path]
