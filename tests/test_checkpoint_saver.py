"""utils.checkpoint.CheckpointSaver (which files an epoch writes) and resuming runs that started
from ImageNet weights, whose preprocessing comes from the weights' recipe, not from the flags."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import make_class_tree

import models.pretrained as pretrained
import train
from models.registry import create_model
from utils.checkpoint import BackgroundWriter, CheckpointSaver, load_checkpoint, save_checkpoint
from utils.errors import UsageError
from utils.logger import History

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
    saver.flush()  # the files are written in a background thread
    assert _files(tmp_path) == ["last.pth"] and load_checkpoint(tmp_path / "last.pth")["epoch"] == 0
    scripted = [(0.5, 1.0), (0.4, 0.5), (0.5, 0.9), (0.7, 2.0)]  # best: epoch 1, tie won by lower loss (3), then 4
    improved = [saver.save_epoch(model, epoch, _metrics(*m), lambda: state) for epoch, m in enumerate(scripted, 1)]
    assert improved == [True, False, True, True]
    saver.close()
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


# ---- the background writer ------------------------------------------------------------------------


def test_saved_files_hold_the_weights_of_save_time_although_training_goes_on(tmp_path):
    """The checkpoint is copied before it is handed to the writer thread: changing the weights and
    the optimizer state right after save_epoch returns does not reach the files."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    weights_then = model.weight.detach().clone()
    moment_then = optimizer.state[model.weight]["exp_avg"].clone()
    with CheckpointSaver(tmp_path, RECORD) as saver:
        saver.save_epoch(model, 1, _metrics(0.5, 1.0), lambda: {"optimizer": optimizer.state_dict()})
        with torch.no_grad():
            model.weight.add_(1.0)  # what the next training steps do, in place
        optimizer.state[model.weight]["exp_avg"].add_(1.0)
    best, last = load_checkpoint(tmp_path / "best.pth"), load_checkpoint(tmp_path / "last.pth")
    assert torch.equal(best["state_dict"]["weight"], weights_then)
    assert torch.equal(last["state_dict"]["weight"], weights_then)
    assert torch.equal(last["optimizer"]["state"][0]["exp_avg"], moment_then)


def test_then_runs_after_last_pth_is_on_disk_and_history_follows_it(tmp_path):
    """train.py writes history.csv in `then`: by then last.pth of that epoch must be in place."""
    model, history, seen = nn.Linear(2, 2), History(tmp_path), []
    with CheckpointSaver(tmp_path, RECORD) as saver:
        for epoch in (1, 2):
            history.append({"epoch": epoch, "lr": 0.1})
            rows = list(history.rows)

            def then(rows=rows, epoch=epoch):
                seen.append((load_checkpoint(tmp_path / "last.pth")["epoch"], epoch))
                history.write(rows)

            saver.save_epoch(model, epoch, _metrics(0.5, 1.0), lambda: {"history": history.rows}, then=then)
        history.append({"epoch": 3, "lr": 0.1})  # an epoch not yet saved: never in the file
    assert seen == [(1, 1), (2, 2)]
    assert (tmp_path / "history.csv").read_text().splitlines()[1:] == ["1,0.1,,,,,,,,", "2,0.1,,,,,,,,"]


def test_a_failed_background_write_is_raised_on_the_training_thread(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    saver = CheckpointSaver(tmp_path / "a_file" / "run", RECORD)
    saver.save_start(nn.Linear(2, 2), {})  # returns at once: the error happens in the writer thread
    with pytest.raises(UsageError, match="Not a directory"):  # one line for the user, naming the file
        saver.save_epoch(nn.Linear(2, 2), 1, _metrics(0.5, 1.0), dict)  # ... and comes back here
    saver.save_start(nn.Linear(2, 2), {})
    with pytest.raises(UsageError, match="a_file/run"):
        saver.close()


def test_leaving_the_saver_on_an_error_flushes_and_keeps_that_error(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(KeyboardInterrupt), CheckpointSaver(tmp_path, RECORD) as saver:  # Ctrl-C: the last
        saver.save_start(nn.Linear(2, 2), {})  # file still lands
        raise KeyboardInterrupt
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 0
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="could not be written"), \
            CheckpointSaver(tmp_path / "a_file" / "run", RECORD) as saver:  # a failed write as well:
        saver.save_start(nn.Linear(2, 2), {})  # the Ctrl-C stays the error reported
        raise KeyboardInterrupt


def test_the_writer_holds_at_most_one_job_and_keeps_their_order():
    """A second submit waits until the first job has finished; jobs run in the order given."""
    writer, release, done = BackgroundWriter(), threading.Event(), []
    writer.submit(lambda: (release.wait(60), done.append(1)))
    second = threading.Thread(target=writer.submit, args=(lambda: done.append(2),))
    second.start()
    second.join(0.3)
    assert second.is_alive() and done == []  # still waiting for the first job
    release.set()
    second.join(60)
    writer.close()
    assert done == [1, 2]


def test_plots_are_redrawn_at_most_every_interval_and_once_at_the_end(tmp_path):
    now = [0.0]
    (tmp_path / "plots").mkdir()
    history = History(tmp_path, plot_interval_s=10.0, clock=lambda: now[0])
    drawn = []
    for epoch, at in enumerate([4.0, 9.0, 12.0, 15.0, 21.0, 22.0], start=1):
        now[0] = at
        history.append({"epoch": epoch, "lr": 0.1, "train_loss": 1.0, "val_loss": 1.0})
        drawn.append(history.plot_if_due(tmp_path / "plots"))
    assert drawn == [False, False, True, False, False, True]  # 10 s after the start, then 10 s after that
    assert not history.plot_if_due(tmp_path / "plots", final=True)  # nothing new since epoch 6
    history.append({"epoch": 7, "lr": 0.1, "train_loss": 1.0, "val_loss": 1.0})
    assert history.plot_if_due(tmp_path / "plots", final=True)  # at the end: epoch 7, however soon
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy.png", "loss.png", "lr.png"]


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


@pytest.mark.parametrize("background", [True, False])
def test_a_checkpoint_that_cannot_be_written_is_one_line_naming_the_file(tmp_path, background):
    """A folder that turns read-only (or a full disk) mid-run: the failed write comes back as a
    UsageError (run_cli prints one line, exit 2) naming the file, in the background writer and without."""
    writer = BackgroundWriter(background)

    def write() -> None:
        raise PermissionError(1, "Operation not permitted", str(tmp_path / ".last.pth.1234.tmp"))

    with pytest.raises(UsageError, match=r"cannot write the checkpoint .*\.last\.pth\.1234\.tmp: Operation not permitted"):
        writer.submit(write)
        writer.flush()
    writer.close()
