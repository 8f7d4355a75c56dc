"""The run folder: console + train.log, history.csv, curves, args.json, optional TensorBoard.

    logs/<YYYYmmdd-HHMMSS>_<model>/
        args.json  train.log  history.csv  dataset_report.txt  model_summary.txt
        best.pth  last.pth  epoch_<N>.pth  per_class.csv  test_metrics.json
        plots/loss.png  plots/accuracy.png  plots/lr.png  plots/confusion_matrix.png
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure

HISTORY_FIELDS = [
    "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "epoch_time", "images_per_s",
]


def new_run_dir(log_dir: str | os.PathLike, model_name: str, subdirs: Sequence[str] = ("plots",)) -> Path:
    """A fresh logs/<timestamp>_<model>/ folder (a suffix keeps two runs in one second apart)
    with `subdirs` inside; an existing folder is never reused, so no earlier run is overwritten."""
    base = Path(log_dir) / f"{datetime.now():%Y%m%d-%H%M%S}_{model_name}"
    run_dir, n = base, 1
    while True:
        try:
            run_dir.mkdir(parents=True)  # atomic claim: two processes cannot both get one name
            break
        except FileExistsError:
            n += 1
            run_dir = base.with_name(f"{base.name}_{n}")
    for name in subdirs:
        (run_dir / name).mkdir()
    return run_dir


def newest_run_checkpoint(log_dir: str | os.PathLike) -> Optional[Path]:
    """The last.pth of the most recently modified run under `log_dir` (for --resume auto)."""
    candidates = list(Path(log_dir).glob("*/last.pth"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def setup_logging(run_dir: Optional[Path], quiet: bool = False) -> logging.Logger:
    """Console (stdout) and run_dir/train.log get the same lines."""
    logger = logging.getLogger("pytorch_classification")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if not quiet:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    if run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(file_handler)
    return logger


def write_json(data: dict, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, ensure_ascii=False, default=str)


class History:
    """history.csv, one row per finished epoch.

    The rows also travel inside last.pth, and a resumed run starts from the checkpoint's rows:
    after a kill at any moment the file holds exactly the epochs the checkpoint has finished,
    no duplicate and no gap. The file is rewritten whole (it is small) and atomically.
    With run_dir None the rows stay in memory and nothing is written or plotted (the ranks
    other than 0 under torchrun).
    """

    def __init__(self, run_dir: Optional[Path], rows: Optional[list[dict]] = None):
        self.path = run_dir / "history.csv" if run_dir is not None else None
        self.rows: list[dict] = list(rows or [])
        self._write()

    def append(self, row: dict) -> None:
        row = {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
        self.rows = [r for r in self.rows if int(r["epoch"]) != int(row["epoch"])] + [row]
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        temp = self.path.with_suffix(".csv.tmp")
        with open(temp, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(temp, self.path)

    def column(self, name: str) -> list[float]:
        return [float(row[name]) if row.get(name) not in (None, "") else float("nan") for row in self.rows]

    def plot(self, plot_dir: Path) -> None:
        """loss.png, accuracy.png and lr.png from the rows so far."""
        if not self.rows or self.path is None:
            return
        epochs = self.column("epoch")
        for file_name, title, series in (
            ("loss.png", "Loss", [("train", "train_loss"), ("val", "val_loss")]),
            ("accuracy.png", "Accuracy", [("train", "train_acc"), ("val", "val_acc"), ("val F1", "val_f1")]),
            ("lr.png", "Learning rate (at epoch end)", [("lr", "lr")]),
        ):
            fig = Figure(figsize=(6, 4))  # no pyplot: no GUI backend needed
            axis = fig.subplots()
            for label, column in series:
                axis.plot(epochs, self.column(column), marker="o", markersize=3, label=label)
            axis.set_title(title)
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
            axis.legend()
            fig.tight_layout()
            fig.savefig(plot_dir / file_name, dpi=100)


class TensorBoard:
    """Optional TensorBoard scalars (`--tensorboard`); needs the tensorboard package."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from utils.errors import UsageError

            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict, epoch: int) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
