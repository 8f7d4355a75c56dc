"""The metrics of a labelled tree and their files (per_class.csv, confusion_matrix.png, roc.png,
pr.png, reliability.png), computed by a helper process that infer.py starts first thing.

Why a second process: torchmetrics (with SciPy) and matplotlib take about 1.6 s to import on a
small CPU, a fixed cost as large as predicting a thousand small images. infer.py spends its first
3 s importing torch and loading the model on one core; the helper imports what the reports need
on another core meanwhile, waits while the model predicts, then computes the metrics and draws
the plots while infer.py writes its other files (bench/RESULTS.md has the numbers).

    helper = ReportHelper.start()       # before torch is imported here
    ...                                 # load the model, predict
    helper.submit(results, run_dir, title)
    ...                                 # predictions.txt, predictions.csv
    metrics = helper.result()           # the metrics dict (None without labels); the files are written
    helper.close()                      # when nothing was submitted: the helper ends

Whatever goes wrong with the helper (it could not start, it crashed, it took longer than
HELPER_TIMEOUT_S), `result` computes the same things in this process: the helper only saves time.
Both run `labelled_reports`, so the numbers and files are the same either way.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from inference.predictor import Predictions

HELPER_TIMEOUT_S = 600  # the helper's whole job (imports included); after it, this process does it


def labelled_reports(results: Predictions, run_dir: Path, title: str) -> Optional[dict]:
    """Metrics over the evaluated files (Predictions.metrics), per_class.csv and the four plots in
    `run_dir`; None (and no files) without labels."""
    metrics = results.metrics()
    if metrics is None:
        return None
    from utils.metrics import per_class_rows, plot_confusion_matrix, plot_curves, write_per_class_csv

    write_per_class_csv(per_class_rows(metrics["confusion"], results.class_names), run_dir / "per_class.csv")
    plot_confusion_matrix(metrics["confusion"], results.class_names, run_dir / "confusion_matrix.png",
                          title=f"{title} confusion matrix")
    log_probs, targets = results.evaluated_outputs()  # calibrated: undo T for the reliability diagram's "raw"
    plot_curves(log_probs * results.temperature, targets, results.class_names, run_dir, title=title,
                temperature=results.temperature)  # roc.png, pr.png, reliability.png
    return metrics


class ReportHelper:
    """The helper process (this file run as a script) and the job sent to it."""

    def __init__(self, process: Optional[subprocess.Popen]):
        self.process = process
        self.job: Optional[tuple[Predictions, Path, str]] = None

    @classmethod
    def start(cls) -> ReportHelper:
        try:
            process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)
        except OSError:  # no process to spare: the reports are made here instead
            process = None
        return cls(process)

    def submit(self, results: Predictions, run_dir: Path, title: str) -> None:
        """Send the job; the helper works on it while this process goes on."""
        self.job = (results, run_dir, title)
        if self.process is None:
            return
        import torch

        buffer = io.BytesIO()
        torch.save({"probs": results.probs, "readable": results.readable, "labels": results.labels,
                    "class_names": results.class_names, "temperature": results.temperature,
                    "min_confidence": results.min_confidence, "run_dir": str(run_dir), "title": title}, buffer)
        stdin, self.process.stdin = self.process.stdin, None  # communicate() must not touch it again
        try:
            stdin.write(buffer.getvalue())  # waits, at most, for the helper to finish its imports
            stdin.close()  # end of the job: the helper reads up to here
        except OSError:  # the helper is gone (its stdin is closed): result() does the work here
            pass

    def result(self) -> Optional[dict]:
        """The metrics of the submitted job; made here if the helper did not deliver them."""
        assert self.job is not None, "submit a job first"
        metrics = self._from_helper()
        if metrics is False:
            return labelled_reports(*self.job)
        return metrics

    def _from_helper(self) -> Optional[dict] | bool:
        if self.process is None:
            return False
        import torch

        try:
            out, err = self.process.communicate(timeout=HELPER_TIMEOUT_S)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            self.close()
            return False
        if self.process.returncode != 0 or not out:  # whatever it printed, this process now does the work
            return False
        sys.stderr.write(err.decode(errors="replace"))  # library warnings, as they would appear here
        try:
            return torch.load(io.BytesIO(out), weights_only=True)["metrics"]
        except Exception:  # a damaged answer: do the work here
            return False

    def close(self) -> None:
        """End the helper if it is still running (nothing submitted, or given up on)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr) if self.process else ():
            if pipe is not None:
                pipe.close()


def _serve() -> None:
    """The helper's side: import what the reports need, read one job from stdin, do it, answer."""
    import torch

    import utils.metrics  # noqa: F401
    from inference.predictor import Predictions

    utils.metrics.ClassificationMetrics(2)  # imports torchmetrics (and SciPy) now, while nobody waits
    import matplotlib.figure  # noqa: F401

    data = sys.stdin.buffer.read()
    if not data:  # infer.py found no labels, or ended
        return
    job = torch.load(io.BytesIO(data), weights_only=True)
    results = Predictions([""] * len(job["readable"]), job["probs"],
                          ["" if readable else "unreadable" for readable in job["readable"].tolist()],
                          job["class_names"], job["labels"], job["temperature"], job["min_confidence"])
    metrics = labelled_reports(results, Path(job["run_dir"]), job["title"])
    buffer = io.BytesIO()
    torch.save({"metrics": metrics}, buffer)
    sys.stdout.buffer.write(buffer.getvalue())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository's modules
    import warnings

    from utils.cli import exit_without_teardown, one_line_warning

    warnings.formatwarning = one_line_warning
    try:
        _serve()
        code = 0
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: infer.py reports it
        code = 130
    exit_without_teardown(code)
