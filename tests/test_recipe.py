"""The training recipe of issue 17: EMA, MixUp/CutMix, random erasing, AutoAugment/AugMix, early
stopping, class-balanced sampling and focal loss. Tiny data, CPU, 32 px."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import REPO, make_class_tree, run_script

import train
from utils.checkpoint import CheckpointSaver
from utils.distributed import BalancedSampler, begin_epoch
from utils.ema import ModelEma
from utils.engine import StepSettings, train_one_epoch
from utils.errors import UsageError
from utils.losses import FocalLoss
from utils.optim import create_scheduler
from utils.transforms import Preprocess, build_batch_mix, build_train_transform

FAST = ["--model", "mobilenet_v3_small", "--input_shape", "32", "--batch_size", "8", "--workers", "0"]
CHI_SQUARE_2_DOF_P001 = 13.82  # chi-square with 2 degrees of freedom exceeds this with probability 0.001


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _only_run(log_dir: Path) -> Path:
    (run_dir,) = [p for p in log_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return run_dir


# ---- EMA ------------------------------------------------------------------------------------

def test_ema_equals_a_hand_computed_average_after_each_optimizer_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(2, 3, 8, 8))  # materialise the lazy layer
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(12) % 3), batch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = create_scheduler(optimizer, "constant", 1, 3)
    snapshots = []  # the trained weights after every optimizer step
    optimizer.register_step_post_hook(lambda *_: snapshots.append(
        {k: v.detach().clone() for k, v in model.state_dict().items()}))
    expected = {k: v.clone().float() for k, v in model.state_dict().items()}
    ema = ModelEma(model, decay=0.15)  # below the warm-up's 0.18 and 0.25 at steps 2 and 3: the cap is used

    train_one_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, scheduler,
                    StepSettings(torch.device("cpu"), Preprocess(input_size=[8, 8])), accum_steps=2,
                    show_progress=False, ema=ema)

    assert len(snapshots) == 3 and ema.updates == 3  # 6 batches, 2 per optimizer step: one update per step
    for step, weights in enumerate(snapshots):
        decay = min(0.15, (1 + step) / (10 + step))  # 0.1, then 0.15, 0.15
        for name, value in weights.items():
            if value.is_floating_point():
                expected[name] = decay * expected[name] + (1 - decay) * value
            else:
                expected[name] = value.clone()
    for name, averaged in ema.module.state_dict().items():
        assert torch.allclose(averaged.float(), expected[name].float(), atol=1e-6), name
    assert not torch.equal(ema.module[0].weight, model[0].weight)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_ema_state_round_trips():
    model = nn.Linear(3, 2)
    ema = ModelEma(model, 0.9)
    with torch.no_grad():
        model.weight.add_(1)
    ema.update(model)
    again = ModelEma(nn.Linear(3, 2), 0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 1 and torch.equal(again.module.weight, ema.module.weight)


# ---- MixUp / CutMix, random erasing, policies ------------------------------------------------

@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_mixed_targets_are_distributions_over_the_two_labels(mixup, cutmix):
    torch.manual_seed(0)
    mix = build_batch_mix(mixup, cutmix, num_classes=5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    for _ in range(10):
        images, targets = mix(torch.randn(8, 3, 16, 16), labels)
        assert images.shape == (8, 3, 16, 16) and targets.shape == (8, 5)
        assert torch.allclose(targets.sum(1), torch.ones(8)) and (targets >= 0).all()
        own, rolled = targets.gather(1, labels[:, None]), targets.gather(1, labels.roll(1)[:, None])
        assert torch.allclose(own + rolled, torch.ones(8, 1))  # only the image's and its partner's labels
    assert build_batch_mix(0.0, 0.0, 5) is None


def test_soft_targets_train_and_accuracy_counts_the_dominant_label():
    """With a 'mix' that keeps 70% of each image's own label, the dominant label is the true one:
    a model predicting the true labels scores 100%, not 0% as a comparison with soft rows would."""
    labels = torch.tensor([0, 1, 2, 0])

    def keep_most(images, targets):
        return images, 0.7 * F.one_hot(targets, 3).float() + 0.3 * F.one_hot(targets.roll(1), 3).float()

    class Oracle(nn.Module):  # predicts the label written into the first pixel
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return F.one_hot(x[:, 0, 0, 0].round().long(), 3).float() * 10 * self.scale

    images = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    model = Oracle()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    plain = Preprocess(input_size=[4, 4], mean=[0, 0, 0], std=[1 / 255] * 3)  # leaves pixel values as they are
    stats = train_one_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, create_scheduler(optimizer, "constant", 1, 1),
                            StepSettings(torch.device("cpu"), plain, batch_mix=keep_most), show_progress=False)
    assert stats["acc"] == 1.0 and stats["loss"] > 0.5  # soft targets: the loss cannot reach 0


@pytest.mark.parametrize("augment", ["autoaugment", "augmix"])
def test_new_policies_and_random_erasing_keep_uint8_images_of_the_input_size(augment):
    torch.manual_seed(0)
    transform = build_train_transform(Preprocess(input_size=[32, 32]), augment, random_erase=1.0)
    image = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8)
    out = transform(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    erased = build_train_transform(Preprocess(input_size=[32, 32]), "none", random_erase=0.0)(image)
    assert erased.shape == (3, 32, 32)


def test_random_erasing_paints_a_rectangle_in_the_mean_colour():
    torch.manual_seed(0)
    pre = Preprocess(input_size=[32, 32])
    image = torch.full((3, 32, 32), 7, dtype=torch.uint8)
    out = build_train_transform(pre, "basic", hflip=0.0, crop_scale=1.0, random_erase=1.0)(image)
    mean_colour = torch.tensor([round(m * 255) for m in pre.mean], dtype=torch.uint8)[:, None]
    painted = (out.flatten(1) == mean_colour).all(0)
    assert 0 < painted.sum() < 32 * 32


# ---- focal loss -----------------------------------------------------------------------------

def test_focal_loss_is_cross_entropy_at_gamma_0_and_discounts_easy_examples():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    soft = torch.softmax(torch.randn(6, 4), 1)
    assert torch.allclose(FocalLoss(0.0)(logits, labels), F.cross_entropy(logits, labels))
    assert torch.allclose(FocalLoss(0.0)(logits, soft), F.cross_entropy(logits, soft))
    assert torch.allclose(FocalLoss(0.0, label_smoothing=0.1)(logits, labels),
                          F.cross_entropy(logits, labels, label_smoothing=0.1))
    easy = torch.tensor([[5.0, 0, 0, 0]])
    ratio_easy = FocalLoss(2.0)(easy, torch.tensor([0])) / F.cross_entropy(easy, torch.tensor([0]))
    ratio_hard = FocalLoss(2.0)(-easy, torch.tensor([0])) / F.cross_entropy(-easy, torch.tensor([0]))
    assert ratio_easy < 1e-3 and ratio_hard > 0.9


# ---- early stopping -------------------------------------------------------------------------

def _metrics(top1: float, loss: float) -> dict:
    return {"top1": top1, "loss": loss, "f1": top1, "precision": top1, "recall": top1}


@pytest.mark.parametrize("patience, stops_after", [(1, 3), (2, 4), (3, 5), (4, None)])
def test_early_stopping_stops_at_the_right_epoch_on_a_scripted_sequence(patience, stops_after):
    """top1 by epoch: best at 1, better at 2, a tie with a higher loss at 3 (no gain), lower at 4
    and 5, better again at 6: patience N stops N epochs after epoch 2, patience 4 never."""
    scripted = [(0.5, 1.0), (0.6, 0.9), (0.6, 0.95), (0.55, 0.8), (0.58, 0.7), (0.7, 0.6), (0.65, 0.5)]
    args = train.get_args_parser().parse_args(["--patience", str(patience)])
    saver = CheckpointSaver(None, {}, "top1")
    stopped = None
    for epoch, values in enumerate(scripted, start=1):  # as train.train_epoch decides
        metrics = _metrics(*values)
        best = {"epoch": epoch} if saver.improves(metrics) else saver.best
        note = train.early_stop_note(args, best, epoch)
        saver.save_epoch(nn.Linear(1, 1), epoch, metrics, dict)
        if note:
            stopped = epoch
            assert f"after epoch {epoch}" in note and f"epoch {saver.best['epoch']}" in note
            break
    assert stopped == stops_after


def test_a_run_stops_early_says_so_and_a_resume_keeps_the_counter(tmp_path, monkeypatch):
    """train.py on a scripted validation sequence (evaluate's real numbers, top1 replaced):
    with --patience 2 it stops after epoch 4 (best epoch 2); the log, history.csv and
    test_metrics.json say so, and resuming it with more epochs trains nothing."""
    root = make_class_tree(tmp_path / "ds", {"a": 8, "b": 8}, size=32, splits=("train", "val", "test"))
    scripted = iter([0.5, 0.7, 0.6, 0.6])
    real_evaluate = train.evaluate

    def scripted_evaluate(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        description = args[5] if len(args) > 5 else kwargs.get("description", "val")
        if description == "val":
            result["top1"] = next(scripted, result["top1"])
        return result

    monkeypatch.setattr(train, "evaluate", scripted_evaluate)
    logs = tmp_path / "logs"
    train.main(["--dataset_path", str(root), *FAST, "--epochs", "10", "--patience", "2", "--log_dir", str(logs),
                "--quiet"])
    run_dir = _only_run(logs)
    rows = _history(run_dir)
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4"]
    assert [row["note"] for row in rows[:3]] == ["", "", ""]
    assert rows[3]["note"].startswith("stopped early after epoch 4") and "its best, epoch 2" in rows[3]["note"]
    log_text = (run_dir / "train.log").read_text(encoding="utf-8")
    assert "Early stopping (--patience 2): stopped early after epoch 4" in log_text
    test_metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert test_metrics["epoch"] == 2 and test_metrics["early_stop"].startswith("stopped early after epoch 4")

    monkeypatch.setattr(train, "evaluate", real_evaluate)
    train.main(["--resume", "auto", "--log_dir", str(logs), "--epochs", "12"])  # --quiet, as the run was
    assert "stopped early after epoch 4" in (run_dir / "train.log").read_text(encoding="utf-8").split(
        "Resumed from")[-1].split("nothing left to train")[0]
    assert len(_history(run_dir)) == 4


# ---- class-balanced sampling ----------------------------------------------------------------

def _chi_square(counts: Counter, classes: int) -> float:
    total = sum(counts.values())
    return sum((counts[c] - total / classes) ** 2 / (total / classes) for c in range(classes))


def test_balanced_sampler_draws_the_classes_evenly():
    labels = [0] * 200 + [1] * 50 + [2] * 10  # 20:5:1
    sampler = BalancedSampler(labels, seed=3, rank=0, world_size=1)
    counts = Counter()
    for epoch in range(1, 6):
        sampler.set_epoch(epoch)
        draws = list(sampler)
        assert len(draws) == len(sampler) == len(labels)
        counts.update(labels[i] for i in draws)
    assert _chi_square(counts, 3) < CHI_SQUARE_2_DOF_P001, counts
    plain = Counter(labels * 5)
    assert _chi_square(plain, 3) > 50 * CHI_SQUARE_2_DOF_P001  # the bound does tell balanced from not


def test_balanced_sampler_under_torchrun_gives_each_rank_its_share_and_replays_by_epoch():
    labels = [0] * 30 + [1] * 7  # 37 images: padded to 38 draws, 19 per rank
    ranks = [BalancedSampler(labels, seed=0, rank=r, world_size=2) for r in range(2)]
    whole = BalancedSampler(labels, seed=0, rank=0, world_size=1)
    whole.total = 38
    for sampler in [*ranks, whole]:
        sampler.set_epoch(4)
    shares = [list(s) for s in ranks]
    assert [len(s) for s in shares] == [len(r) for r in ranks] == [19, 19]
    assert shares[0] == list(whole)[0::2] and shares[1] == list(whole)[1::2]  # one sequence, dealt out
    loader = torch.utils.data.DataLoader(list(range(37)), sampler=ranks[0], batch_size=37)
    begin_epoch(loader, seed=0, epoch=5)
    fifth = next(iter(loader)).tolist()
    begin_epoch(loader, seed=0, epoch=4)
    assert next(iter(loader)).tolist() == shares[0] != fifth  # begin_epoch sets the epoch: exact replay


# ---- flags and the whole run ----------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [(["--ema", "1.5"], "--ema"), (["--mixup", "-1"], "--mixup"),
                                           (["--random_erase", "2"], "--random_erase"), (["--patience", "-1"], "--patience")])
def test_bad_recipe_flags_name_the_flag(flags, needle):
    with pytest.raises(UsageError, match=needle):
        train.check_args(train.get_args_parser().parse_args(flags))


# Run train.py and kill it (SIGKILL) right after last.pth of epoch 2 is on disk: a deterministic
# break point, where a timed kill could land anywhere.
KILL_AFTER_EPOCH_2 = """
import os, runpy, signal, sys
import torch

real_save, real_replace, epoch_2_saved = torch.save, os.replace, []

def save(obj, file, *args, **kwargs):
    real_save(obj, file, *args, **kwargs)
    if isinstance(obj, dict) and "optimizer" in obj and obj.get("epoch") == 2:
        epoch_2_saved.append(True)

def replace_then_die(source, target):  # save_checkpoint's rename: last.pth of epoch 2 is in place
    real_replace(source, target)
    if epoch_2_saved and str(target).endswith("last.pth"):
        os.kill(os.getpid(), signal.SIGKILL)

torch.save, os.replace = save, replace_then_die
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_resume_is_exact_with_the_whole_recipe_on(tmp_path):
    root = make_class_tree(tmp_path / "ds", {"a": 8, "b": 4}, size=32)
    common = ["--dataset_path", str(root), *FAST, "--batch_size", "4", "--epochs", "3", "--deterministic", "--seed", "5",
              "--ema", "0.9", "--patience", "3", "--mixup", "0.2", "--cutmix", "1.0", "--random_erase", "0.5",
              "--augment", "augmix", "--sampler", "balanced", "--loss", "focal"]
    straight = run_script("train.py", *common, "--log_dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    assert "val (EMA)" in straight.stdout and "EMA weights" in straight.stdout

    broken_logs = tmp_path / "broken"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_EPOCH_2, *common, "--log_dir", str(broken_logs)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = _only_run(broken_logs)
    assert torch.load(run_dir / "last.pth", weights_only=True)["epoch"] == 2
    resumed = run_script("train.py", "--resume", "auto", "--log_dir", str(broken_logs))
    assert resumed.returncode == 0, resumed.stderr

    reference = torch.load(_only_run(tmp_path / "straight") / "last.pth", weights_only=True)
    continued = torch.load(run_dir / "last.pth", weights_only=True)
    for key in ("state_dict", "ema"):
        states = (reference[key], continued[key]) if key == "state_dict" else (
            reference[key]["state_dict"], continued[key]["state_dict"])
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), key
    assert continued["ema"]["updates"] == reference["ema"]["updates"] > 0
    assert reference["best_metric"] == continued["best_metric"]
    rows, reference_rows = _history(run_dir), _history(_only_run(tmp_path / "straight"))
    for key in ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "note"):
        assert [r[key] for r in rows] == [r[key] for r in reference_rows], key


def test_saver_keeps_the_validated_weights_in_best_and_the_trained_ones_in_last(tmp_path):
    trained, averaged = nn.Linear(2, 2), nn.Linear(2, 2)
    saver = CheckpointSaver(tmp_path, {"model": "tiny", "class_names": ["a", "b"], "preprocess": {}, "args": {}})
    saver.save_epoch(trained, 1, _metrics(0.5, 1.0), lambda: {"ema": {"state_dict": averaged.state_dict()}},
                     evaluated=averaged)
    saver.close()  # the files are written in the background: wait for them
    best, last = (torch.load(tmp_path / name, weights_only=True) for name in ("best.pth", "last.pth"))
    assert torch.equal(best["state_dict"]["weight"], averaged.weight)
    assert torch.equal(last["state_dict"]["weight"], trained.weight)
    assert torch.equal(last["ema"]["state_dict"]["weight"], averaged.weight)
