"""The run folder: console + train.log, history.csv, curves, args.json, optional TensorBoard.

    logs/<YYYYmmdd-HHMMSS>_<model>/
        args.json  train.log  history.csv  dataset_report.txt  model_summary.txt
        best.pth  last.pth  epoch_<N>.pth  per_class.csv  test_metrics.json
        plots/loss.png  plots/accuracy.png  plots/lr.png  plots/confusion_matrix.png
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Optional

from utils.cli import discard_stdout
from utils.errors import UsageError
from utils.files import check_output_dir

HISTORY_FIELDS = [
    "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "epoch_time", "images_per_s",
    "note",  # empty, or why the run ended after this epoch ("stopped early: ...", --patience)
]


PLOT_INTERVAL_S = 30.0  # the curves are redrawn at most this often during training (and once at the end);
# a drawing costs about 0.4 s on 2 cores: every 10 s took 4% of a 35-second run (bench/RESULTS.md)
MAX_RUNS_PER_SECOND = 1000  # name suffixes new_run_dir tries before it gives up (a bounded loop)


def new_run_dir(log_dir: str | os.PathLike, model_name: str, subdirs: Sequence[str] = ("plots",),
                flag: str = "--log_dir") -> Path:
    """A fresh logs/<timestamp>_<model>/ folder (a suffix keeps two runs in one second apart)
    with `subdirs` inside; an existing folder is never reused, so no earlier run is overwritten.
    A `log_dir` that cannot be created or written to is a UsageError naming `flag`."""
    check_output_dir(log_dir, flag)
    base = Path(log_dir) / f"{datetime.now():%Y%m%d-%H%M%S}_{model_name}"
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for number in range(1, MAX_RUNS_PER_SECOND + 1):
            run_dir = base if number == 1 else base.with_name(f"{base.name}_{number}")
            try:
                run_dir.mkdir()  # atomic claim: two processes cannot both get one name
            except FileExistsError:
                continue
            for name in subdirs:
                (run_dir / name).mkdir()
            return run_dir
    except OSError as error:
        raise UsageError(f"{flag} {log_dir}: cannot create a run folder there: {error.strerror or error}") from None
    raise UsageError(f"{flag} {log_dir}: {base.name} and {MAX_RUNS_PER_SECOND - 1} numbered variants "
                     "exist already; clean up the folder or choose another one")


def newest_run_checkpoint(log_dir: str | os.PathLike) -> Optional[Path]:
    """The last.pth of the most recently modified run under `log_dir` (for --resume auto)."""
    candidates = list(Path(log_dir).glob("*/last.pth"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


# What a new run writes before its first epoch ends (relative paths, fnmatch patterns; checkpoint temp
# files are recognised by utils.checkpoint): all that discard_unfinished_run may delete.
_EARLY_RUN_FILES = ("args.json", "train.log", "dataset_report.txt", "model_summary.txt", "history.csv",
                    "history.csv.tmp", "last.pth", "plots", "plots/*.png", "tensorboard", "tensorboard/events.out.tfevents.*")


def discard_unfinished_run(run_dir: Path, reason: str, interrupted: bool = False) -> str:
    """Remove the folder of a new run that stopped before its first epoch ended; return a line saying what was done.

    Such a folder holds no trained model, only the files the run wrote while starting. It is kept when
    an epoch finished (best.pth), or when Ctrl-C stopped it with a resumable last.pth (the message
    printed on Ctrl-C says how to resume). A folder that also holds anything else is left as it is,
    marked with FAILED.txt giving `reason`: nothing the run did not write is ever deleted.
    """
    if (run_dir / "best.pth").exists() or (interrupted and (run_dir / "last.pth").exists()):
        return ""
    close_log_files()  # train.log must be closed before it can be deleted (Windows)
    entries = sorted(run_dir.rglob("*"), key=lambda entry: len(entry.parts), reverse=True)  # contents first
    ours = [entry for entry in entries if _written_early(entry, run_dir)]
    try:
        if len(ours) == len(entries):
            for entry in ours:
                if entry.is_dir() and not entry.is_symlink():
                    entry.rmdir()
                else:
                    entry.unlink()
            run_dir.rmdir()
            return f"Removed the run folder {run_dir}: the run stopped before its first epoch ended"
        why_kept = "it holds files the run did not write"
    except OSError as error:
        why_kept = f"it could not be removed: {error.strerror or error}"
    with contextlib.suppress(OSError):
        (run_dir / "FAILED.txt").write_text(f"This run stopped before its first epoch ended: {reason}\n",
                                            encoding="utf-8")
    return f"The run stopped before its first epoch ended; {run_dir} is kept ({why_kept}), marked by FAILED.txt"


class _Console(logging.StreamHandler):
    """stdout. When its reader goes away (`train.py | head`, a `tee` that was killed) the run goes on:
    this handler steps aside, train.log keeps every line, and stdout writes go nowhere."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], BrokenPipeError):
            super().handleError(record)
            return
        logger = logging.getLogger("pytorch_classification")
        logger.removeHandler(self)
        discard_stdout()
        logger.info("stdout was closed (its reader went away): the run goes on, writing train.log only")


def setup_logging(run_dir: Optional[Path], quiet: bool = False) -> logging.Logger:
    """Console (stdout) and run_dir/train.log get the same lines."""
    logger = logging.getLogger("pytorch_classification")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if not quiet:
        console = _Console(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    if run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(file_handler)
    return logger


def _written_early(entry: Path, run_dir: Path) -> bool:
    from utils.checkpoint import is_checkpoint_temp_file  # torch: only needed here

    relative = entry.relative_to(run_dir).as_posix()
    return ((entry.parent == run_dir and is_checkpoint_temp_file(entry))
            or any(fnmatch.fnmatchcase(relative, pattern) for pattern in _EARLY_RUN_FILES))


def close_log_files() -> None:
    """Close train.log (setup_logging's file); console output goes on."""
    logger = logging.getLogger("pytorch_classification")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()


def write_json(data: dict, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, ensure_ascii=False, default=str)


class History:
    """history.csv, one row per finished epoch.

    The rows also travel inside last.pth, and a resumed run starts from the checkpoint's rows:
    `append` only adds a row in memory (the checkpoint saved next carries it), and `write`, called
    once that checkpoint is saved, puts it in the file. So after a kill at any moment the file
    never holds an epoch that last.pth has not finished, and after a resume no duplicate or gap.
    The file is rewritten whole (it is small) and atomically. With run_dir None the rows stay in
    memory and nothing is written or plotted (the ranks other than 0 under torchrun).
    """

    def __init__(self, run_dir: Optional[Path], rows: Optional[list[dict]] = None,
                 plot_interval_s: float = PLOT_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.path = run_dir / "history.csv" if run_dir is not None else None
        self.rows: list[dict] = list(rows or [])
        self._plot_interval_s, self._clock = plot_interval_s, clock
        self._changes = 0  # rows appended so far; the plots show _plotted_changes of them
        self._plotted_changes, self._plotted_at = 0, clock()  # the first drawing comes an interval after the start
        self.write()

    def add_epoch(self, epoch: int, train_stats: dict, val: dict, note: str = "") -> dict:
        """The row of a finished epoch, from train_one_epoch's and evaluate's results; appended and returned."""
        row = {"epoch": epoch, "lr": train_stats["lr"], "train_loss": train_stats["loss"],
               "train_acc": train_stats["acc"], "val_loss": val["loss"], "val_acc": val["top1"],
               "val_f1": val["f1"], "epoch_time": train_stats["time"], "images_per_s": train_stats["images_per_s"],
               "note": note}
        self.append(row)
        return row

    def append(self, row: dict) -> None:
        """Add (or replace) an epoch's row in memory; `write` puts it in history.csv."""
        row = {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
        self.rows = [r for r in self.rows if int(r["epoch"]) != int(row["epoch"])] + [row]
        self._changes += 1

    def write(self, rows: Optional[list[dict]] = None) -> None:
        """Rewrite history.csv with `rows` (default: all rows so far). train.py hands the checkpoint
        writer a copy of the rows taken when it saved last.pth, written once that file is on disk."""
        if self.path is None:
            return
        temp = self.path.with_suffix(".csv.tmp")
        with open(temp, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows if rows is None else rows)
        os.replace(temp, self.path)

    def column(self, name: str) -> list[float]:
        return [float(row[name]) if row.get(name) not in (None, "") else float("nan") for row in self.rows]

    def plot_if_due(self, plot_dir: Path, final: bool = False) -> bool:
        """Redraw the curves unless they were drawn less than `plot_interval_s` ago, or the run
        started less than that ago (importing matplotlib and drawing three PNGs costs seconds on a
        small CPU, as much as many training steps); `final`: redraw whenever a row came since the
        last drawing. Returns whether it drew."""
        if self._plotted_changes == self._changes:
            return False
        if not final and self._clock() - self._plotted_at < self._plot_interval_s:
            return False
        self.plot(plot_dir)
        self._plotted_changes, self._plotted_at = self._changes, self._clock()
        return True

    def plot(self, plot_dir: Path) -> None:
        """loss.png, accuracy.png and lr.png from the rows so far."""
        if not self.rows or self.path is None:
            return
        # imported when first drawn: a bad flag, or infer.py writing only files, never pays for matplotlib
        from utils.visualize import new_figure

        epochs = self.column("epoch")
        for file_name, title, series in (
            ("loss.png", "Loss", [("train", "train_loss"), ("val", "val_loss")]),
            ("accuracy.png", "Accuracy", [("train", "train_acc"), ("val", "val_acc"), ("val F1", "val_f1")]),
            ("lr.png", "Learning rate (at epoch end)", [("lr", "lr")]),
        ):
            fig = new_figure(figsize=(6, 4))  # no pyplot: no GUI backend needed
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
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict, epoch: int) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
