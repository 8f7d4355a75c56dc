"""The files a prediction run writes (infer.py; the UI can save the same ones).

    predictions.txt    the original template's format, one block per image:
                           Image: <path>
                           Predicted class: <name>
                           Probability: 99.13%
                           --------------------------------------------------
                       (an unreadable image gets "Predicted class: (unreadable)" and "Error: <why>";
                       one below --min_confidence "Predicted class: unknown" and "Best guess: <name>")
    predictions.csv    path, status (ok, unknown or unreadable), [true_class, correct,] top1_class,
                       top1_probability, ..., error
    predictions.json   the run (checkpoint, model, classes, inputs), metrics, and every prediction
                       ("class": "unknown" and "best_guess" below --min_confidence)
    misclassified.csv  labelled trees only: the wrong answers, most confident first
    per_class.csv, confusion_matrix.png   labelled trees only (utils.metrics, as in training)
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

import torch

from inference.predictor import UNKNOWN, Predictions
from utils.logger import write_json

TXT_RULE = "-" * 50
UNREADABLE = "(unreadable)"
_DIGITS = 6  # probabilities in CSV/JSON: 6 decimals


def write_txt(results: Predictions, path: str | os.PathLike) -> None:
    confidence, predicted = results.top1()
    answers = results.answers()
    with open(path, "w", encoding="utf-8") as file:
        for i, image in enumerate(results.paths):
            file.write(f"Image: {image}\n")
            if results.errors[i]:
                file.write(f"Predicted class: {UNREADABLE}\nError: {results.errors[i]}\n")
            else:
                file.write(f"Predicted class: {answers[i]}\nProbability: {float(confidence[i]):.2%}\n")
                if answers[i] == UNKNOWN:
                    file.write(f"Best guess: {results.class_names[int(predicted[i])]} "
                               f"(below --min_confidence {results.min_confidence:.2%})\n")
            file.write(TXT_RULE + "\n")


def csv_fields(results: Predictions, k: int) -> list[str]:
    truth = ["true_class", "correct"] if results.labels is not None else []
    ranks = [f"top{r}_{part}" for r in range(1, min(k, len(results.class_names)) + 1) for part in ("class", "probability")]
    cam = ["cam_x", "cam_y"] if results.cam_points is not None else []
    return ["path", "status", *truth, *ranks, *cam, "error"]


def write_csv(results: Predictions, path: str | os.PathLike, k: int) -> None:
    """One row per image in input order; probabilities are fractions (0.991300), not percents."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=csv_fields(results, k))
        writer.writeheader()
        for record in prediction_records(results, k):
            status = "unreadable" if record["error"] else UNKNOWN if record["class"] == UNKNOWN else "ok"
            row = {"path": record["path"], "status": status, "error": record["error"]}
            if results.labels is not None:
                row["true_class"] = record["true_class"]
                row["correct"] = "" if record["error"] or record["correct"] is None else int(record["correct"])
            for rank, pair in enumerate(record["topk"], start=1):
                row[f"top{rank}_class"] = pair["class"]
                row[f"top{rank}_probability"] = f"{pair['probability']:.{_DIGITS}f}"
            for key in ("cam_x", "cam_y"):
                if record.get(key) is not None:
                    row[key] = f"{record[key]:.1f}"
            writer.writerow(row)


def prediction_records(results: Predictions, k: int) -> list[dict]:
    """Plain dicts, one per image: path, class, probability, topk, error[, true_class, correct].

    class is UNKNOWN below --min_confidence (then best_guess names the top class, and correct is
    None: no answer was given); None for an unreadable file."""
    records = []
    answers = results.answers()
    for i, pairs in enumerate(results.topk(k)):
        record: dict = {
            "path": results.paths[i],
            "class": answers[i],
            "probability": round(pairs[0][1], _DIGITS) if pairs else None,
            "topk": [{"class": name, "probability": round(p, _DIGITS)} for name, p in pairs],
            "error": results.errors[i],
        }
        if answers[i] == UNKNOWN:
            record["best_guess"] = pairs[0][0]
        if results.cam_points is not None:  # --cam: the heat map's peak for the predicted class
            x, y = results.cam_points[i].tolist()
            record["cam_x"], record["cam_y"] = (None, None) if x != x else (round(x, 1), round(y, 1))
        if results.labels is not None:
            record["true_class"] = results.class_names[int(results.labels[i])]
            record["correct"] = None if answers[i] == UNKNOWN else answers[i] == record["true_class"]
        records.append(record)
    return records


def metrics_report(results: Predictions, metrics: Optional[dict]) -> Optional[dict]:
    """The metrics as plain values: scores, per-class rows and the confusion matrix (rows = truth)."""
    if metrics is None:
        return None
    confusion: torch.Tensor = metrics["confusion"]
    scores = {name: value for name, value in metrics.items() if name != "confusion"}
    from utils.metrics import per_class_rows  # only with metrics: torchmetrics takes seconds to import

    return {**scores, "per_class": per_class_rows(confusion, results.class_names),
            "confusion_matrix": confusion.tolist()}


def write_json_report(results: Predictions, path: str | os.PathLike, k: int, run: dict,
                      metrics: Optional[dict]) -> None:
    """`run`: checkpoint, model, inputs and such, written first so the file reads top-down."""
    write_json({
        **run,
        "class_names": results.class_names,
        "count": len(results),
        "readable": int(results.readable.sum()),
        "unreadable": [{"path": p, "error": e} for p, e in results.unreadable()],
        "metrics": metrics_report(results, metrics),
        "predictions": prediction_records(results, k),
    }, path)


def write_misclassified(results: Predictions, path: str | os.PathLike) -> int:
    """Wrong answers, most confident first: what to look at (or relabel) first. Returns the count."""
    confidence, predicted = results.top1()
    mistakes = results.mistakes()
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "true_class", "predicted_class", "probability", "true_class_probability"])
        for i in mistakes:
            truth = int(results.labels[i])  # type: ignore[index]
            writer.writerow([results.paths[i], results.class_names[truth], results.class_names[int(predicted[i])],
                             f"{float(confidence[i]):.{_DIGITS}f}", f"{float(results.probs[i, truth]):.{_DIGITS}f}"])
    return len(mistakes)


def output_listing(run_dir: Path) -> str:
    """The files of a run folder, one per line, for the console."""
    return "\n".join(f"  {entry.name}" for entry in sorted(run_dir.iterdir()))
