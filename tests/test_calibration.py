"""AUROC, ECE, curves, temperature scaling and the unknown answer on small fixed examples,
checked against hand computations."""

from __future__ import annotations

import pytest
import torch

from utils.metrics import ClassificationMetrics, calibration_error, plot_curves, reliability_bins

# 4 images, 2 classes; probabilities of class 1 and the truth.
P1 = [0.9, 0.6, 0.4, 0.2]
TRUTH = [1, 0, 1, 0]


def two_class_probs() -> torch.Tensor:
    p1 = torch.tensor(P1)
    return torch.stack([1 - p1, p1], dim=1)


def test_auroc_and_ece_equal_a_hand_computation():
    metrics = ClassificationMetrics(2)
    metrics.update(two_class_probs(), torch.tensor(TRUTH))
    result = metrics.compute()
    # Class 1 scores: positives {0.9, 0.4}, negatives {0.6, 0.2}: pairs ranked right 3 of 4 -> 0.75.
    # Class 0 scores are 1 - those, with the roles swapped: the same 0.75. Macro mean 0.75.
    assert abs(result["auroc"] - 0.75) < 1e-6
    # Top confidences 0.9 (right), 0.6 (class 1, wrong), 0.6 (class 0, wrong), 0.8 (right), each in
    # its own 15-bin bin or sharing one: |0.9-1| + 2 * |0.6-0| + |0.8-1|, over 4 images = 0.375.
    assert abs(result["ece"] - 0.375) < 1e-6
    assert result["count"] == 4


def test_logits_and_probabilities_give_the_same_numbers():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [1.0, 1.5, -2.0], [0.0, 0.3, 0.2]])
    targets = torch.tensor([0, 2, 0, 1])
    from_logits, from_probs = ClassificationMetrics(3), ClassificationMetrics(3)
    from_logits.update(logits, targets)
    from_probs.update(logits.softmax(1), targets)
    a, b = from_logits.compute(), from_probs.compute()
    for name in ("top1", "auroc", "ece"):
        assert abs(a[name] - b[name]) < 1e-5, name


def test_reliability_bins_count_by_hand():
    rows = reliability_bins(two_class_probs(), torch.tensor(TRUTH))
    counts = {k: row[2] for k, row in enumerate(rows) if row[2]}
    assert counts == {9: 2, 12: 1, 13: 1}  # 0.6 -> bin 9 (0.6*15 = 9), 0.8 -> 12, 0.9 -> 13
    assert rows[9][1] == 0.0 and rows[13][1] == 1.0
    assert abs(calibration_error(two_class_probs().log(), torch.tensor(TRUTH)) - 0.375) < 1e-6


def test_curves_are_drawn(tmp_path):
    paths = plot_curves(two_class_probs().log(), torch.tensor(TRUTH), ["a", "b"], tmp_path, "_test", "test", 1.5)
    assert [p.name for p in paths] == ["roc_test.png", "pr_test.png", "reliability_test.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def overconfident_logits(count: int = 4000, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z), so softmax(z) is perfectly calibrated; the model says
    softmax(4 z): the same answers, far too sure. The right temperature is 4."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(count, classes, generator=generator)
    targets = torch.multinomial(z.softmax(1), 1, generator=generator).squeeze(1)
    return z * 4, targets


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model():
    from utils.calibration import fit_temperature

    with torch.inference_mode():  # as evaluate() hands them over
        logits, targets = overconfident_logits()
    temperature = fit_temperature(logits.log_softmax(1), targets)
    before, after = calibration_error(logits.log_softmax(1), targets), calibration_error(logits, targets, temperature)
    assert 3.5 < temperature < 4.5  # over-confident: the fit softens the probabilities
    assert before > 0.15 and after < 0.03
    assert torch.equal((logits / temperature).argmax(1), logits.argmax(1))  # the answers stay the same


def test_suggested_min_confidence_by_hand():
    from utils.calibration import suggested_min_confidence

    # top probabilities 0.95 0.9 0.8 0.7 0.6; right, right, wrong, right, right
    confidence = torch.tensor([0.95, 0.9, 0.8, 0.7, 0.6])
    probs = torch.stack([confidence, 1 - confidence], dim=1)
    targets = torch.tensor([0, 0, 1, 0, 0])
    # kept precision at each threshold: 1, 1, 2/3, 3/4, 4/5 -> 99% holds down to 0.9; 78% holds at
    # 0.6 though not at 0.7: the lowest threshold that holds wins
    assert suggested_min_confidence(probs, targets) == pytest.approx(0.9)
    assert suggested_min_confidence(probs, targets, precision=0.78) == pytest.approx(0.6)
    assert suggested_min_confidence(probs, torch.tensor([1, 0, 0, 0, 0])) is None  # the surest is wrong


def test_saver_writes_the_temperature_into_best_and_same_epoch_last(tmp_path):
    from utils.checkpoint import CheckpointSaver, load_checkpoint
    from utils.transforms import Preprocess

    model = torch.nn.Linear(2, 2)
    record = {"model": "resnet18", "class_names": ["a", "b"], "preprocess": Preprocess(input_size=[32, 32]).to_dict()}
    saver = CheckpointSaver(tmp_path, record)
    saver.save_epoch(model, 1, {"top1": 0.9, "loss": 0.1}, lambda: {"optimizer": {}})
    saver.flush()  # written in a background thread (add_fields flushes by itself)
    assert "temperature" not in load_checkpoint(tmp_path / "best.pth")
    assert saver.add_fields({"temperature": 1.7, "suggested_min_confidence": 0.8}) == ["best.pth", "last.pth"]
    best = load_checkpoint(tmp_path / "best.pth")
    assert best["temperature"] == 1.7 and best["suggested_min_confidence"] == 0.8 and best["epoch"] == 1
    saver.save_epoch(model, 2, {"top1": 0.5, "loss": 0.9}, lambda: {"optimizer": {}})  # worse: best stays epoch 1
    assert saver.add_fields({"temperature": 2.0}) == ["best.pth"]  # last.pth now holds other weights
    saver.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "last.pth"]  # no temp files left
