"""Schedules, optimiser groups, metrics and checkpoints, each checked against known numbers."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler

from train import inverse_frequency_weights
from utils.checkpoint import (
    capture_rng_state,
    is_better,
    load_checkpoint,
    load_model_weights,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
    strip_wrapper_prefixes,
)
from utils.data import create_dataloader
from utils.errors import UsageError
from utils.logger import discard_unfinished_run
from utils.metrics import ClassificationMetrics, per_class_rows
from utils.optim import create_optimizer, create_scheduler, parameter_groups


def _lrs(schedule: str, epochs: int, iters: int, **kwargs) -> list[float]:
    """The lr used at each optimizer step over the whole run."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = create_scheduler(optimizer, schedule, epochs, iters, **kwargs)
    seen = []
    for _ in range(epochs * iters):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_cosine_is_sized_in_iterations():
    lrs = _lrs("cos", epochs=2, iters=5)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))  # half way through
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))


def test_warmup_is_linear_then_cosine():
    lrs = _lrs("warmup", epochs=4, iters=5, warmup_epochs=1)
    assert lrs[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    assert lrs[5] == pytest.approx(1.0)
    assert lrs[5 + 7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))


def test_step_and_multistep_decay_at_epoch_boundaries():
    lrs = _lrs("step", epochs=4, iters=3, step_size=2, gamma=0.1)
    assert lrs[5] == pytest.approx(1.0) and lrs[6] == pytest.approx(0.1)
    lrs = _lrs("multistep", epochs=4, iters=3, milestones=[1, 3], gamma=0.5)
    assert [lrs[2], lrs[3], lrs[8], lrs[9]] == pytest.approx([1.0, 0.5, 0.5, 0.25])
    with pytest.raises(UsageError, match="--milestones"):
        _lrs("multistep", epochs=1, iters=1)


def test_no_weight_decay_on_norm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(model, 0.1)
    assert {p.ndim for p in decay["params"]} == {4, 2} and decay["weight_decay"] == 0.1
    assert {p.ndim for p in no_decay["params"]} == {1} and no_decay["weight_decay"] == 0.0
    assert isinstance(create_optimizer(model, "sgd", 0.1), torch.optim.SGD)
    assert isinstance(create_optimizer(model, "adamw", 0.1), torch.optim.AdamW)


def test_metrics_equal_a_hand_computation_over_the_whole_split():
    metrics = ClassificationMetrics(num_classes=3)
    # two batches of different sizes: averaging per batch would give another accuracy
    metrics.update(torch.tensor([[3.0, 0, 0], [0, 3, 0], [0, 3, 0]]), torch.tensor([0, 1, 2]), torch.tensor(0.3))
    metrics.update(torch.tensor([[0.0, 0, 3]]), torch.tensor([2]), torch.tensor(0.7))
    result = metrics.compute()
    assert result["top1"] == pytest.approx(3 / 4)
    assert result["loss"] == pytest.approx((0.3 * 3 + 0.7) / 4)
    # per class (truth a, b, c): precision 1, 1/2, 1; recall 1, 1, 1/2
    assert result["precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert result["recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    f1 = [1.0, 2 * 0.5 / 1.5, 2 * 0.5 / 1.5]
    assert result["f1"] == pytest.approx(sum(f1) / 3)
    assert result["confusion"].tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    rows = per_class_rows(result["confusion"], ["a", "b", "c"])
    assert [r["support"] for r in rows] == [1, 1, 2] and [r["f1"] for r in rows] == pytest.approx(f1)
    assert "top5" not in result
    counts_only = metrics.compute(ranking=False)  # the viewer's per-batch refresh: no pass over every image
    assert "auroc" in result and "ece" in result and "auroc" not in counts_only and "ece" not in counts_only
    assert {k: v for k, v in counts_only.items() if k != "confusion"} == \
        {k: v for k, v in result.items() if k not in ("confusion", "auroc", "ece")}


def test_top5_appears_above_five_classes_and_binary_works():
    metrics = ClassificationMetrics(num_classes=7)
    logits = torch.eye(7)[[1, 1]]  # predicts class 1 twice
    metrics.update(logits, torch.tensor([1, 6]))
    result = metrics.compute()
    assert result["top1"] == pytest.approx(0.5) and result["top5"] == pytest.approx(1.0)
    binary = ClassificationMetrics(num_classes=2)
    binary.update(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), torch.tensor([0, 1, 1]))
    assert binary.compute()["top1"] == pytest.approx(2 / 3)


def test_checkpoint_round_trip_is_weights_only_and_atomic(tmp_path):
    model = nn.Linear(3, 2)
    path = tmp_path / "ck.pth"
    save_checkpoint({"format": "x", "state_dict": model.state_dict(), "rng": capture_rng_state()}, path)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["weight"], model.weight)
    # a failed write keeps the previous file
    with pytest.raises((TypeError, AttributeError, __import__("pickle").PicklingError)):
        save_checkpoint({"state_dict": model.state_dict(), "bad": lambda: 0}, path)
    assert load_checkpoint(path)["format"] == "x" and list(tmp_path.iterdir()) == [path]


def test_rng_state_restores_exactly():
    state = capture_rng_state()
    first = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    restore_rng_state(state)
    second = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


def test_bare_and_wrapped_state_dicts_are_read(tmp_path):
    model = nn.Linear(3, 2)
    torch.save({f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}, tmp_path / "bare.pth")
    loaded = load_checkpoint(tmp_path / "bare.pth")
    assert "format" not in loaded and set(loaded["state_dict"]) == {"weight", "bias"}
    assert list(strip_wrapper_prefixes({"module.a": torch.zeros(1)})) == ["a"]


def test_checkpoint_errors_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(UsageError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "text.pth")
    with pytest.raises(UsageError, match="does not fit"):
        load_model_weights(nn.Linear(3, 5), nn.Linear(3, 2).state_dict(), "other.pth")


def test_class_weights_and_best_metric_rules():
    weights = inverse_frequency_weights([30, 10])
    assert weights.tolist() == pytest.approx([40 / 60, 40 / 20])
    best = {"top1": 0.9, "loss": 0.5}
    assert is_better({"top1": 0.9, "loss": 0.4}, best, "top1")  # tie -> lower loss wins
    assert not is_better({"top1": 0.9, "loss": 0.6}, best, "top1")
    assert is_better({"loss": 0.3}, {"loss": 0.5}, "loss")


def test_checkpoints_follow_the_umask_like_every_other_file(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint({"state_dict": nn.Linear(2, 2).state_dict()}, tmp_path / "last.pth")
        (tmp_path / "args.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "last.pth").stat().st_mode & 0o777 == 0o640  # tempfile.mkstemp made it 0600
    assert (tmp_path / "args.json").stat().st_mode & 0o777 == 0o640


def test_only_the_savers_own_temp_files_are_removed(tmp_path):
    ours = [".last.pth.k3j_9xq2.tmp", ".best.pth.0a1b2c3d.tmp", ".epoch_4.pth.abcdefgh.tmp"]
    others = [".last.pth.notes.tmp", "last.pth.0a1b2c3d.tmp", ".history.csv.0a1b2c3d.tmp", "x.tmp", "last.pth"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(path.name for path in remove_stale_temp_files(tmp_path)) == sorted(ours)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(others)


def _early_run_folder(root: Path) -> Path:
    """What a new run has written when it fails before its first epoch ends."""
    run_dir = root / "20300101-000000_resnet18"
    (run_dir / "plots").mkdir(parents=True)
    for name in ("args.json", "train.log", "dataset_report.txt", "model_summary.txt", "history.csv", "last.pth",
                 ".last.pth.0a1b2c3d.tmp"):
        (run_dir / name).write_text("x")
    return run_dir


def test_a_run_that_failed_before_its_first_epoch_is_removed(tmp_path):
    run_dir = _early_run_folder(tmp_path)
    assert "Removed the run folder" in discard_unfinished_run(run_dir, "UsageError: bad --weights")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["foreign_file", "foreign_folder"])
def test_a_failed_run_folder_holding_other_files_is_only_marked(tmp_path, case):
    run_dir = _early_run_folder(tmp_path)
    foreign = run_dir / ("notes.txt" if case == "foreign_file" else "plots/mine/x.png")
    foreign.parent.mkdir(exist_ok=True)
    foreign.write_text("mine")
    note = discard_unfinished_run(run_dir, "UsageError: bad --weights")
    assert "is kept" in note and foreign.read_text() == "mine" and (run_dir / "train.log").exists()
    assert "bad --weights" in (run_dir / "FAILED.txt").read_text()


def test_runs_with_a_finished_epoch_or_resumable_after_ctrl_c_are_kept(tmp_path):
    run_dir = _early_run_folder(tmp_path)
    assert discard_unfinished_run(run_dir, "KeyboardInterrupt: ", interrupted=True) == ""
    (run_dir / "best.pth").write_text("x")
    assert discard_unfinished_run(run_dir, "RuntimeError: disk full") == ""
    assert (run_dir / "last.pth").exists() and not (run_dir / "FAILED.txt").exists()


@pytest.mark.parametrize("samples, world_size", [(9, 1), (17, 2), (18, 2), (27, 3)])
def test_no_training_batch_of_one_image_for_any_process(samples, world_size):
    """A process's share ending on one image (BatchNorm cannot train on it) leaves that image out;
    under torchrun the share is the DistributedSampler's, padded to the same size on every rank."""
    dataset = torch.utils.data.TensorDataset(torch.zeros(samples, 1), torch.zeros(samples))
    for rank in range(world_size):
        sampler = None if world_size == 1 else DistributedSampler(dataset, world_size, rank, seed=0)
        loader = create_dataloader(dataset, 4, True, 0, torch.device("cpu"), torch.Generator(), sampler=sampler)
        sizes = [len(targets) for _, targets in loader]
        assert sizes == [4, 4] and len(loader) == 2, (rank, sizes)
    evaluation = create_dataloader(dataset, 4, False, 0, torch.device("cpu"))  # eval mode: one image is fine
    assert sum(len(targets) for _, targets in evaluation) == samples


def test_plots_draw_cjk_class_names_with_an_installed_cjk_font(tmp_path):
    """Class folders named 猫 and 狗 are drawn in the plots, not as boxes with a warning per glyph."""
    import os
    import warnings

    from utils.metrics import plot_confusion_matrix
    from utils.visualize import _CJK_FONT_FILES

    if not any(os.path.isfile(path) for path in _CJK_FONT_FILES):
        pytest.skip("no CJK font installed (apt-get install fonts-noto-cjk)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion_matrix(torch.tensor([[3, 1], [0, 4]]), ["猫", "狗"], tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 0
    assert not [w for w in caught if "missing from font" in str(w.message)]
