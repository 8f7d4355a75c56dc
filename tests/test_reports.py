"""inference/reports.py: the metrics and files of a labelled tree made by the helper process are
the ones this process would make, and a helper that is gone costs nothing but time.

Real processes, real files; the predictions are random numbers with a known answer key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.predictor import Predictions
from inference.reports import ReportHelper, labelled_reports

CLASSES = ["cat", "dog", "owl"]
FILES = ["confusion_matrix.png", "per_class.csv", "pr.png", "reliability.png", "roc.png"]


@pytest.fixture()
def results() -> Predictions:
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(40, 3, generator=generator).softmax(1)
    probs[7] = float("nan")  # an unreadable file: not counted
    errors = ["" if i != 7 else "unreadable image" for i in range(40)]
    labels = torch.randint(0, 3, (40,), generator=generator)
    return Predictions([f"img_{i}.jpg" for i in range(40)], probs, errors, CLASSES, labels,
                       temperature=1.5, min_confidence=0.4)


def made_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_the_helper_makes_the_metrics_and_files_this_process_would(results, tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    expected = labelled_reports(results, here, "pets")
    helper = ReportHelper.start()
    helper.submit(results, there, "pets")
    metrics = helper.result()
    assert helper.process.returncode == 0  # the helper did it, not the fallback
    assert made_files(here) == made_files(there) == FILES
    assert (here / "per_class.csv").read_text() == (there / "per_class.csv").read_text()
    assert torch.equal(metrics.pop("confusion"), expected.pop("confusion"))
    assert metrics == expected
    assert metrics["count"] == 39 and 0.0 < metrics["coverage"] < 1.0


def test_a_helper_that_is_gone_is_replaced_by_this_process(results, tmp_path):
    helper = ReportHelper.start()
    helper.process.kill()  # crashed, killed, out of memory: whatever ended it
    helper.process.wait()
    helper.submit(results, tmp_path, "pets")
    metrics = helper.result()
    assert metrics["count"] == 39
    assert made_files(tmp_path) == FILES


def test_nothing_to_report_without_labels(tmp_path):
    unlabelled = Predictions(["a.jpg"], torch.tensor([[0.2, 0.3, 0.5]]), [""], CLASSES)
    helper = ReportHelper.start()
    helper.submit(unlabelled, tmp_path, "pets")
    assert helper.result() is None
    assert made_files(tmp_path) == []


def test_close_ends_a_helper_that_got_no_job():
    helper = ReportHelper.start()
    helper.close()
    assert helper.process.poll() is not None
