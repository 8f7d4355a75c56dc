"""Output folders train.py and infer.py cannot write to: one line naming the flag and the path, exit 2,
in seconds (a dangling link once made them loop forever). Real processes on real folders."""

from __future__ import annotations

import os
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import make_class_tree, run_script, write_image

from models.registry import create_model
from utils import logger
from utils.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from utils.errors import UsageError
from utils.logger import new_run_dir
from utils.transforms import Preprocess

TIMEOUT_S = 120  # torch's start-up on a busy machine; the old bug never returned at all


def make_checkpoint(path: Path, model_name: str = "mobilenet_v3_small", classes: tuple = ("a", "b")) -> Path:
    """A train.py-format checkpoint with untrained weights (32 px): enough for infer.py to run."""
    model = create_model(model_name, len(classes), (32, 32))
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model": model_name, "class_names": list(classes),
                     "state_dict": model.state_dict(), "preprocess": Preprocess(input_size=[32, 32]).to_dict(),
                     "epoch": 1}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pth")


@pytest.fixture
def dangling_link(tmp_path) -> Path:
    """`logs -> /nonexistent/mnt/logs`: a log folder on a drive that is not mounted."""
    link = tmp_path / "logs"
    link.symlink_to("/nonexistent/mnt/logs", target_is_directory=True)
    return link


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A folder nobody can create anything in. Permissions do not stop root, so as root it is also
    made immutable (chattr +i); skipped where neither works."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if not _refuses_writes(folder) and os.geteuid() == 0:
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        if not _refuses_writes(folder):
            pytest.skip("cannot make a read-only folder here (root without chattr)")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def _refuses_writes(folder: Path) -> bool:
    try:
        (folder / "probe").mkdir()
    except OSError:
        return True
    (folder / "probe").rmdir()
    return False


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for needle in needles:
        assert needle in last, last


def _train(dataset: Path, log_dir: Path) -> subprocess.CompletedProcess:
    return run_script("train.py", "--dataset_path", str(dataset), "--model", "mobilenet_v3_small", "--input_shape",
                      "32", "--workers", "0", "--epochs", "1", "--log_dir", str(log_dir), timeout=TIMEOUT_S)


def _infer(checkpoint: Path, image: Path, save_dir: Path) -> subprocess.CompletedProcess:
    return run_script("infer.py", "--weights", str(checkpoint), "--image_path", str(image), "--save_dir", str(save_dir),
                      "--device", "cpu", timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_class_tree(tmp_path_factory.mktemp("data") / "ds", {"a": 3, "b": 3}, size=32)


def test_train_with_a_dangling_log_dir_link_exits_at_once(dataset, dangling_link):
    _assert_one_line_error(_train(dataset, dangling_link), f"--log_dir {dangling_link}", "/nonexistent/mnt/logs")


def test_infer_with_a_dangling_save_dir_link_exits_at_once(checkpoint, dataset, dangling_link):
    image = next((dataset / "val" / "a").iterdir())
    _assert_one_line_error(_infer(checkpoint, image, dangling_link), f"--save_dir {dangling_link}",
                           "/nonexistent/mnt/logs")


def test_new_run_dir_refuses_a_dangling_link_itself(dangling_link):
    """The run-folder maker that infer.py and train.py share, without the scripts' early check."""
    with pytest.raises(UsageError, match="--save_dir .*/nonexistent/mnt/logs"):
        new_run_dir(dangling_link, "resnet18", flag="--save_dir")


def test_new_run_dir_tries_a_bounded_number_of_names(tmp_path, monkeypatch):
    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2030, 1, 2, 3, 4, 5)

    monkeypatch.setattr(logger, "datetime", FrozenClock)
    base = "20300102-030405_resnet18"
    for number in range(1, logger.MAX_RUNS_PER_SECOND + 1):
        (tmp_path / (base if number == 1 else f"{base}_{number}")).mkdir()
    with pytest.raises(UsageError, match="exist already"):
        new_run_dir(tmp_path, "resnet18")
    (tmp_path / f"{base}_7").rmdir()
    assert new_run_dir(tmp_path, "resnet18") == tmp_path / f"{base}_7"


def test_train_with_a_read_only_log_dir(dataset, read_only_dir):
    _assert_one_line_error(_train(dataset, read_only_dir / "logs"), "--log_dir", str(read_only_dir), "not writable")


def test_infer_with_a_read_only_save_dir(checkpoint, dataset, read_only_dir):
    image = next((dataset / "val" / "a").iterdir())
    _assert_one_line_error(_infer(checkpoint, image, read_only_dir), f"--save_dir {read_only_dir}", "not writable")


def test_infer_with_a_save_dir_that_is_a_file(checkpoint, dataset, tmp_path):
    image = next((dataset / "val" / "a").iterdir())
    (tmp_path / "results").write_text("my notes")
    _assert_one_line_error(_infer(checkpoint, image, tmp_path / "results"), "--save_dir", "is a file, not a folder")
    assert (tmp_path / "results").read_text() == "my notes"


def test_train_with_a_log_dir_inside_a_file(dataset, tmp_path):
    write_image(tmp_path / "photo.png", torch.zeros(8, 8, 3, dtype=torch.uint8).numpy())
    _assert_one_line_error(_train(dataset, tmp_path / "photo.png" / "logs"), "--log_dir", "photo.png is a file")
