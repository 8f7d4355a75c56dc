"""utils.checkpoint.CheckpointSaver (which files an epoch writes) and resuming runs that started
from ImageNet weights, whose preprocessing comes from the weights' recipe, not from the flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import make_class_tree

import models.pretrained as pretrained
import train
from models.registry import create_model
from utils.checkpoint import CheckpointSaver, load_checkpoint, save_checkpoint

RECORD = {"model": "tiny", "class_names": ["a", "b"], "preprocess": {"input_size": [8, 8]}, "args": {}}


def _metrics(top1: float, loss: float) -> dict:
    return {"top1": top1, "loss": loss, "f1": top1, "precision": top1, "recall": top1}


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_saver_writes_last_every_epoch_best_on_improvement_and_epoch_n_by_freq(tmp_path):
    model = nn.Linear(2, 2)
    saver = CheckpointSaver(tmp_path, RECORD, "top1", freq=2)
    state = {"optimizer": {"marker": 1}}
    saver.save_start(model, state)
    assert _files(tmp_path) == ["last.pth"] and load_checkpoint(tmp_path / "last.pth")["epoch"] == 0
    scripted = [(0.5, 1.0), (0.4, 0.5), (0.5, 0.9), (0.7, 2.0)]  # best: epoch 1, tie won by lower loss (3), then 4
    improved = [saver.save_epoch(model, epoch, _metrics(*m), lambda: state) for epoch, m in enumerate(scripted, 1)]
    assert improved == [True, False, True, True]
    assert _files(tmp_path) == ["best.pth", "epoch_2.pth", "epoch_4.pth", "last.pth"]
    best, last = load_checkpoint(tmp_path / "best.pth"), load_checkpoint(tmp_path / "last.pth")
    assert best["epoch"] == 4 and "optimizer" not in best  # best.pth: no training state
    assert last["epoch"] == 4 and last["optimizer"] == {"marker": 1}
    assert last["best_metric"] == {"epoch": 4, "top1": 0.7, "loss": 2.0}
    assert best["format"] == "pytorch-classification/1" and best["class_names"] == ["a", "b"]
    assert torch.equal(best["state_dict"]["weight"], model.weight)


def test_loss_as_best_metric_prefers_lower_and_other_ranks_write_nothing(tmp_path):
    saver = CheckpointSaver(None, RECORD, "loss")  # a torchrun rank other than 0
    model = nn.Linear(2, 2)
    assert [saver.save_epoch(model, e, _metrics(0.5, loss), dict) for e, loss in enumerate([1.0, 1.2, 0.3], 1)] \
        == [True, False, True]
    assert saver.best == {"epoch": 3, "loss": 0.3}
    assert list(tmp_path.iterdir()) == []


def test_unknown_best_metric_is_refused():
    with pytest.raises(ValueError):
        CheckpointSaver(None, RECORD, "accuracy")


# ---- resuming a run that started from ImageNet weights ------------------------------------------


@pytest.fixture
def local_imagenet_weights(tmp_path, monkeypatch):
    """--pretrained with no network: torchvision's catalogue entry as it is, and the download
    replaced by a locally made file of the right architecture (random weights)."""
    made = {}

    def fetch_locally(url, weights_dir, hash_prefix=None, mirror=None, progress=True, timeout=0.0):
        name = url.rsplit("/", 1)[1].split("-")[0]  # "inception_v3_google-0cc3c7bd.pth" -> inception_v3_google
        model_name = "inception_v3" if name.startswith("inception_v3") else name
        path = tmp_path / f"{name}.pth"
        if not path.exists():
            size = (299, 299) if model_name == "inception_v3" else (224, 224)
            save_checkpoint(create_model(model_name, 1000, size, **pretrained.weights_build_kwargs(model_name))
                            .state_dict(), path)
        made[model_name] = path
        return path, "0" * 64

    monkeypatch.setattr(pretrained, "fetch_weights", fetch_locally)
    return made


@pytest.mark.slow
@pytest.mark.parametrize("model_name, input_size", [("inception_v3", [299, 299]), ("resnet18", [224, 224])])
def test_resume_of_a_pretrained_run_keeps_the_weights_recipe(tmp_path, local_imagenet_weights, model_name, input_size):
    """The recipe's input size (299 for Inception-v3, which refuses less in training) must be in
    force before the size check when resuming, although no --input_shape was ever given."""
    data = make_class_tree(tmp_path / "data", {"a": 3, "b": 3}, size=48)
    common = ["--dataset_path", str(data), "--model", model_name, "--log_dir", str(tmp_path / "logs"),
              "--batch_size", "3", "--workers", "0", "--quiet"]
    train.main([*common, "--pretrained", "--epochs", "1"])
    (run_dir,) = [p.parent for p in (tmp_path / "logs").glob("*/last.pth")]
    first = load_checkpoint(run_dir / "last.pth")
    assert first["preprocess"]["input_size"] == input_size and first["args"]["input_shape"] is None
    assert first["pretrained"]["weights"] and first["pretrained"]["recipe"]["input_size"] == input_size

    train.main(["--resume", "auto", "--log_dir", str(tmp_path / "logs"), "--epochs", "2", "--workers", "0", "--quiet"])
    resumed = load_checkpoint(run_dir / "last.pth")
    assert resumed["epoch"] == 2 and resumed["preprocess"] == first["preprocess"]
    assert resumed["pretrained"] == first["pretrained"] and resumed["model_kwargs"] == first["model_kwargs"]
    assert [row["epoch"] for row in resumed["history"]] == [1, 2]
