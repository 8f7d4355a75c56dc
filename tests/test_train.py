"""train.py end to end, run as a user runs it: a subprocess on real image files."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import REPO, make_class_tree, run_script, write_image
from PIL import Image

FAST = ["--model", "mobilenet_v3_small", "--input_shape", "32", "--batch_size", "8", "--workers", "0"]


def _only_run(log_dir: Path) -> Path:
    (run_dir,) = [p for p in log_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]  # not .cache
    return run_dir


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") or "usage:" in result.stderr
    for needle in needles:
        assert needle in result.stderr


@pytest.mark.slow
def test_demo_default_reaches_95_percent_and_fills_the_run_folder(tmp_path):
    result = run_script("train.py", "--log_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "built-in demo" in result.stdout
    run_dir = _only_run(tmp_path)
    test_metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert test_metrics["top1"] >= 0.95, test_metrics
    assert len(test_metrics["per_class"]) == 10 and sum(r["support"] for r in test_metrics["per_class"]) == 270
    for name in ("args.json", "train.log", "dataset_report.txt", "model_summary.txt", "best.pth", "last.pth",
                 "per_class.csv", "plots/loss.png", "plots/accuracy.png", "plots/lr.png", "plots/confusion_matrix.png"):
        assert (run_dir / name).is_file(), name
    assert [int(r["epoch"]) for r in _history(run_dir)] == list(range(1, 11))
    checkpoint = torch.load(run_dir / "best.pth", weights_only=True)
    assert checkpoint["format"] == "pytorch-classification/1" and checkpoint["model"] == "resnet18"
    assert checkpoint["class_names"] == [str(d) for d in range(10)]
    assert checkpoint["preprocess"]["input_size"] == [32, 32] and "optimizer" not in checkpoint
    assert "optimizer" in torch.load(run_dir / "last.pth", weights_only=True)
    assert "epoch 10/10" in (run_dir / "train.log").read_text(encoding="utf-8")


def _awkward_tree(root: Path) -> Path:
    """Two classes with non-ASCII names, spaced file names and every awkward image kind."""
    make_class_tree(root, {"chat é": 10, "狗": 10}, size=24)
    extras = root / "train" / "chat é"
    Image.new("L", (30, 20), 200).save(extras / "gray scale.png")
    Image.new("RGBA", (30, 20), (220, 40, 40, 128)).save(extras / "rgba.png")
    Image.fromarray(np.full((20, 30), 60000, np.uint16)).save(extras / "deep 16.png")
    rotated = Image.new("RGB", (30, 20), (220, 40, 40))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(extras / "exif.jpg", exif=exif)
    (extras / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (extras / "notes.txt").write_text("not an image")
    return root


def test_binary_awkward_images_train_and_the_dataset_is_untouched(tmp_path):
    root = _awkward_tree(tmp_path / "données")
    before = _tree_digest(root)
    result = run_script("train.py", "--dataset_path", str(root), *FAST[:-2], "--workers", "2", "--epochs", "2",
                        "--log_dir", str(tmp_path / "logs"), "--augment", "randaugment", "--resize_mode", "letterbox")
    assert result.returncode == 0, result.stderr
    run_dir = _only_run(tmp_path / "logs")
    report = (run_dir / "dataset_report.txt").read_text(encoding="utf-8")
    assert "corrupt.jpg" in report and "Skipped 1 file" in report
    assert "chat é" in report and "狗" in report
    rows = _history(run_dir)
    assert len(rows) == 2 and 0 <= float(rows[-1]["val_acc"]) <= 1
    assert _tree_digest(root) == before


def _start(args: list[str], own_group: bool = False) -> subprocess.Popen:
    """train.py with its output piped; own_group: in a process group of its own (with its workers)."""
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", start_new_session=own_group,
                            preexec_fn=_default_ctrl_c if sys.platform != "win32" else None)


def _default_ctrl_c() -> None:
    """In the child, before train.py starts: Ctrl-C (SIGINT) as a terminal gives it. Tests started
    in the background (`nohup pytest &`) inherit SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler at all, so the Ctrl-C test would see the run go on to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_epochs(run_parent: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = [p for p in run_parent.iterdir() if (p / "history.csv").is_file()] if run_parent.is_dir() else []
        if runs and len(_history(runs[0])) >= count:
            return runs[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not reach the expected epoch in time")


def test_resume_after_sigkill_is_exact_and_history_continues(tmp_path):
    root = make_class_tree(tmp_path / "ds", {"a": 24, "b": 24}, size=32)
    common = ["--dataset_path", str(root), *FAST, "--epochs", "4", "--deterministic", "--seed", "5"]
    straight = run_script("train.py", *common, "--log_dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr

    broken_logs = tmp_path / "broken"
    process = _start([*common, "--log_dir", str(broken_logs)])
    run_dir = _wait_for_epochs(broken_logs, 1, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(_history(run_dir)) < 4, "the run finished before it could be killed"

    resumed = run_script("train.py", "--resume", "auto", "--log_dir", str(broken_logs))
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stdout
    assert [p for p in broken_logs.iterdir() if p.is_dir() and not p.name.startswith(".")] == [run_dir]  # continued in its own folder

    straight_dir = _only_run(tmp_path / "straight")
    reference = torch.load(straight_dir / "last.pth", weights_only=True)["state_dict"]
    continued = torch.load(run_dir / "last.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(reference[k], continued[k]) for k in reference)
    rows, reference_rows = _history(run_dir), _history(straight_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    for key in ("lr", "train_loss", "val_loss", "val_acc"):
        assert [r[key] for r in rows] == [r[key] for r in reference_rows], key


def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path):
    root = make_class_tree(tmp_path / "ds", {"a": 24, "b": 24}, size=32)
    process = _start(["--dataset_path", str(root), *FAST, "--epochs", "50", "--log_dir", str(tmp_path / "logs")])
    run_dir = _wait_for_epochs(tmp_path / "logs", 1, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "--resume_training" in out
    checkpoint = torch.load(run_dir / "last.pth", weights_only=True)
    assert "optimizer" in checkpoint and f"holds epoch {checkpoint['epoch']};" in out


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and signals are POSIX")
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_whole_process_group_stops_like_ctrl_c(tmp_path, signal_number):
    """`timeout`, Slurm and systemd signal every process of the job, DataLoader workers too (so does
    Ctrl-C in a terminal). Workers killed by SIGTERM made the main process raise "DataLoader worker
    ... is killed by signal" during its own orderly stop: a traceback instead of the resume command."""
    root = make_class_tree(tmp_path / "ds", {"a": 24, "b": 24}, size=32)
    logs = tmp_path / "logs"
    process = _start(["--dataset_path", str(root), *FAST, "--workers", "2", "--epochs", "50", "--log_dir", str(logs)],
                     own_group=True)
    _wait_for_epochs(logs, 1, process)
    os.killpg(process.pid, signal_number)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "continue with" in stdout
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through Linux's /proc")
def test_a_killed_worker_is_one_line_naming_the_likely_cause(tmp_path):
    """The kernel's out-of-memory killer ends a worker with SIGKILL: one line, not torch's traceback."""
    root = make_class_tree(tmp_path / "ds", {"a": 24, "b": 24}, size=32)
    logs = tmp_path / "logs"
    process = _start(["--dataset_path", str(root), *FAST, "--workers", "2", "--epochs", "50", "--log_dir", str(logs)])
    _wait_for_epochs(logs, 1, process)
    children = " ".join(path.read_text() for path in Path(f"/proc/{process.pid}/task").glob("*/children")).split()
    os.kill(int(children[0]), signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: a data-loading worker process (pid {children[0]}) "
                                                      "was killed by signal Killed; the machine probably ran out of memory")


def test_a_closed_stdout_does_not_stop_the_run(tmp_path):
    """`train.py | head`, or a killed `tee`: the run goes on to its end with every line in train.log."""
    root = make_class_tree(tmp_path / "ds", {"a": 8, "b": 8}, size=32)
    logs = tmp_path / "logs"
    process = _start(["--dataset_path", str(root), *FAST, "--epochs", "2", "--log_dir", str(logs)])
    assert process.stdout.readline().startswith("Run folder:")
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 0, stderr
    assert "Traceback" not in stderr and "Logging error" not in stderr, stderr
    log = (_only_run(logs) / "train.log").read_text(encoding="utf-8")
    assert "stdout was closed (its reader went away)" in log
    assert "Epoch 2" in log or "epoch 2" in log.lower()
    assert (_only_run(logs) / "best.pth").is_file() and "Run folder:" in log.splitlines()[-1]


def test_diverging_loss_stops_with_a_hint(tmp_path):
    root = make_class_tree(tmp_path / "ds", {"a": 8, "b": 8}, size=32)
    result = run_script("train.py", "--dataset_path", str(root), *FAST, "--epochs", "3", "--optimizer_type", "sgd",
                        "--lr", "1e30", "--log_dir", str(tmp_path / "logs"))
    _assert_clean_error(result, "lower --lr")


def test_fine_tune_from_a_trained_run_keeps_the_backbone_and_renews_the_head(tmp_path, trained_run):
    root = make_class_tree(tmp_path / "ds", {"a": 6, "b": 6, "c": 6}, size=32)
    result = run_script("train.py", "--dataset_path", str(root), "--model", "resnet18", "--input_shape", "32",
                        "--workers", "0", "--epochs", "1", "--pretrained", str(trained_run / "best.pth"),
                        "--freeze_backbone", "--log_dir", str(tmp_path / "logs"))
    assert result.returncode == 0, result.stderr
    assert "re-initialised 2: fc.weight, fc.bias" in result.stdout
    source = torch.load(trained_run / "best.pth", weights_only=True)["state_dict"]
    tuned = torch.load(_only_run(tmp_path / "logs") / "best.pth", weights_only=True)
    backbone = [k for k in source if not k.startswith("fc.")]
    assert all(torch.equal(source[k], tuned["state_dict"][k]) for k in backbone)
    assert tuned["state_dict"]["fc.weight"].shape == (3, 512) and source["fc.weight"].shape == (10, 512)
    assert tuned["pretrained"]["source"] == "file"


def test_unsplit_tree_with_val_ratio_trains_without_copying(tmp_path):
    make_class_tree(tmp_path, {"a": 10, "b": 10}, size=24, splits=("flat",))
    before = _tree_digest(tmp_path / "flat")
    result = run_script("train.py", "--dataset_path", str(tmp_path / "flat"), "--val_ratio", "0.2", *FAST,
                        "--epochs", "1", "--log_dir", str(tmp_path / "logs"))
    assert result.returncode == 0, result.stderr
    assert "split in memory" in result.stdout
    assert _tree_digest(tmp_path / "flat") == before


def test_tensorboard_channels_last_and_amp_switches(tmp_path):
    root = make_class_tree(tmp_path / "ds", {"a": 6, "b": 6}, size=24)
    result = run_script("train.py", "--dataset_path", str(root), *FAST, "--epochs", "1", "--tensorboard",
                        "--channels_last", "--amp", "--device", "cpu", "--log_dir", str(tmp_path / "logs"))
    assert result.returncode == 0, result.stderr
    run_dir = _only_run(tmp_path / "logs")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    from utils.device import cpu_has_native_bf16

    if cpu_has_native_bf16():
        assert "precision: torch.bfloat16" in result.stdout
    else:  # bf16 without hardware support is many times slower than fp32: --amp must not slow training down
        assert "--amp ignored" in result.stderr and "precision: torch.float32" in result.stdout


def test_list_models():
    result = run_script("train.py", "--list_models")
    assert result.returncode == 0
    for name in ("resnet18", "vit_b_16", "swin_v2_t", "convnext_tiny", "regnet_y_400mf", "efficientnet_v2_s"):
        assert name in result.stdout


def _bad_input(tmp_path: Path, case: str) -> tuple[list[str], str]:
    good = make_class_tree(tmp_path / "good", {"a": 2, "b": 2}, size=24)
    if case == "missing":
        return ["--dataset_path", str(tmp_path / "nope")], "does not exist"
    if case == "extra_val_class":
        make_class_tree(good, {"zebra": 1}, size=24, splits=("val",))
        return ["--dataset_path", str(good)], "zebra"
    if case == "empty_class":
        (good / "train" / "empty").mkdir()
        return ["--dataset_path", str(good)], "empty class folder"
    if case == "all_corrupt":
        bad = tmp_path / "bad"
        for split in ("train", "val"):
            (bad / split / "a").mkdir(parents=True)
            (bad / split / "a" / "x.jpg").write_bytes(b"junk")
        return ["--dataset_path", str(bad)], "no readable training images"
    if case == "unknown_model":
        return ["--dataset_path", str(good), "--model", "resnet181"], "Did you mean"
    if case == "num_classes":
        return ["--dataset_path", str(good), "--num_classes", "5"], "--num_classes 5"
    if case == "input_too_small":
        return ["--dataset_path", str(good), "--model", "alexnet", "--input_shape", "32"], "too small"
    if case == "weights_not_a_checkpoint":
        (tmp_path / "w.pth").write_text("text")
        return ["--dataset_path", str(good), "--weights", str(tmp_path / "w.pth")], "w.pth"
    if case == "one_class":
        return ["--dataset_path", str(make_class_tree(tmp_path / "solo", {"cat": 3}, size=24))], "solo has only one class"
    if case in ("weights_of_another_model", "checkpoint_of_another_model"):
        state = torchvision.models.mobilenet_v3_small(num_classes=2).state_dict()
        checkpoint = state if case == "weights_of_another_model" else {"model": "mobilenet_v3_small", "state_dict": state}
        torch.save(checkpoint, tmp_path / "other.pth")
        made_for = "" if case == "weights_of_another_model" else " (a mobilenet_v3_small checkpoint)"
        return ["--dataset_path", str(good), "--weights", str(tmp_path / "other.pth")], f"other.pth{made_for} fit resnet18"
    if case == "batch_of_one":  # BatchNorm cannot train on one image when the feature maps shrink to 1x1
        return ["--dataset_path", str(good), "--batch_size", "1", "--input_shape", "32"], "--batch_size 1"
    if case == "weights_missing":
        return ["--dataset_path", str(good), "--weights", str(tmp_path / "none.pth")], "none.pth"
    if case == "resume_not_resumable":
        torch.save({"w": torch.zeros(1)}, tmp_path / "bare.pth")
        return ["--resume_training", str(tmp_path / "bare.pth")], "not resumable"
    if case == "bad_number":
        return ["--dataset_path", str(good), "--batch_size", "0"], "--batch_size"
    if case == "unknown_flag":
        return ["--dataset_path", str(good), "--epoch", "x"], "--epoch"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing", "extra_val_class", "empty_class", "all_corrupt", "one_class", "unknown_model", "num_classes",
    "input_too_small", "weights_not_a_checkpoint", "weights_of_another_model", "checkpoint_of_another_model",
    "weights_missing", "batch_of_one", "resume_not_resumable", "bad_number", "unknown_flag",
])
def test_user_mistakes_get_one_clear_line(tmp_path, case):
    args, needle = _bad_input(tmp_path, case)
    result = run_script("train.py", *args, "--log_dir", str(tmp_path / "logs"), "--workers", "0", "--epochs", "1")
    _assert_clean_error(result, needle)
    # nothing trained, so no run folder stays behind (the weights cases fail after it was made)
    # (LOG_DIR/.cache, the image-hash cache of the leakage check, may stay: it is a cache, not a run)
    assert not [p for p in (tmp_path / "logs").glob("*") if p.is_dir() and p.name != ".cache"], \
        list((tmp_path / "logs").rglob("*"))


def test_grayscale_only_dataset_with_jpeg_extension_case(tmp_path):
    for split in ("train", "val"):
        for name, value in (("dark", 30), ("light", 220)):
            for k in range(4):
                write_image(tmp_path / "ds" / split / name / f"IMG_{k}.JPG", np.full((20, 20), value, np.uint8))
    result = run_script("train.py", "--dataset_path", str(tmp_path / "ds"), *FAST, "--epochs", "1",
                        "--log_dir", str(tmp_path / "logs"))
    assert result.returncode == 0, result.stderr
    assert "dark" in (_only_run(tmp_path / "logs") / "dataset_report.txt").read_text()


def test_an_epoch_ending_on_one_image_does_not_break_batchnorm(tmp_path):
    """9 training images in batches of 4 at 32 px: a last batch of one image made BatchNorm raise
    "Expected more than 1 value per channel" after the whole epoch. That image now sits the epoch out.
    (--cache ram: the cached path; the loader is the same without a cache, see test_training_parts.)"""
    root = make_class_tree(tmp_path / "ds", {"a": 5, "b": 4}, size=32)
    result = run_script("train.py", "--dataset_path", str(root), "--model", "resnet18", "--input_shape", "32",
                        "--batch_size", "4", "--workers", "0", "--epochs", "1", "--cache", "ram",
                        "--log_dir", str(tmp_path / "logs"))
    assert result.returncode == 0, result.stderr
    assert "2 steps/epoch" in result.stdout  # 4 + 4; the ninth image is left out this epoch
    run_dir = _only_run(tmp_path / "logs")
    assert len(_history(run_dir)) == 1
    # every file follows the umask, checkpoints included (they were 0600 while the rest was 0644)
    modes = {path.name: path.stat().st_mode & 0o777 for path in run_dir.iterdir() if path.is_file()}
    assert len(set(modes.values())) == 1, modes


def test_resume_reports_ignored_flags_and_may_extend_the_epochs(tmp_path):
    root = make_class_tree(tmp_path / "ds", {"a": 12, "b": 12}, size=32)
    first = run_script("train.py", "--dataset_path", str(root), *FAST, "--batch_size", "4", "--epochs", "2",
                       "--log_dir", str(tmp_path / "logs"))
    assert first.returncode == 0, first.stderr

    resumed = run_script("train.py", "--resume", "auto", "--log_dir", str(tmp_path / "logs"), "--epochs", "4",
                         "--lr", "5", "--batch_size", "3", "--workers", "0")
    assert resumed.returncode == 0, resumed.stderr
    applied = next(line for line in resumed.stdout.splitlines() if line.startswith("Resume: applied"))
    ignored = next(line for line in resumed.stdout.splitlines() if line.startswith("Resume: ignored"))
    assert "--epochs 4" in applied and "--workers 0" in applied and "--lr" not in applied
    assert "--lr 5.0 (the run keeps 0.001)" in ignored and "--batch_size 3 (the run keeps 4)" in ignored
    assert "--epochs" not in ignored and "--workers" not in ignored
    rows = _history(_only_run(tmp_path / "logs"))
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4"]
    # from the step reached, the lr follows a cosine over 4 epochs (24 images / 4 = 6 steps each),
    # as in a run set for 4 epochs from the start; the 2-epoch schedule had ended at 0
    assert "6 steps/epoch" in resumed.stdout and float(rows[1]["lr"]) == 0
    expected = [0.5e-3 * (1 + math.cos(math.pi * step / 24)) for step in (18, 24)]
    assert [float(row["lr"]) for row in rows[2:]] == pytest.approx(expected, abs=1e-6)

    shorter = run_script("train.py", "--resume", "auto", "--log_dir", str(tmp_path / "logs"), "--epochs", "3")
    _assert_clean_error(shorter, "--epochs 3", "finished 4 epochs already")


# Run train.py so that it is killed (SIGKILL) halfway through writing last.pth at the end of epoch 2:
# after epoch 2's row exists and best.pth may be saved, the worst moment for history.csv and temp files.
KILL_DURING_SAVE = """
import io, os, runpy, signal, sys
import torch

real_save = torch.save

def save_then_die(obj, file, *args, **kwargs):
    if isinstance(obj, dict) and "optimizer" in obj and obj.get("epoch") == 2:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        file.write(buffer.getvalue()[: buffer.tell() // 2])
        file.flush()
        os.fsync(file.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, file, *args, **kwargs)

torch.save = save_then_die
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_kill_during_a_checkpoint_save_leaves_history_behind_and_resume_cleans_up(tmp_path):
    root = make_class_tree(tmp_path / "ds", {"a": 8, "b": 8}, size=32)
    logs = tmp_path / "logs"
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, "--dataset_path", str(root), *FAST,
                             "--epochs", "3", "--log_dir", str(logs)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = _only_run(logs)
    (temp,) = run_dir.glob(".last.pth.*.tmp")  # the save that was cut short
    assert torch.load(run_dir / "last.pth", weights_only=True)["epoch"] == 1
    assert [row["epoch"] for row in _history(run_dir)] == ["1"]  # never ahead of last.pth
    for name in ("notes.tmp", ".last.pth.mine.tmp"):  # not the saver's names: never deleted
        (run_dir / name).write_text("keep me")

    resumed = run_script("train.py", "--resume", "auto", "--log_dir", str(logs))
    assert resumed.returncode == 0, resumed.stderr
    assert f"Removed 1 temporary file(s) of a checkpoint save that was cut short: {temp.name}" in resumed.stdout
    assert [path.name for path in run_dir.glob(".last.pth.*.tmp")] == [".last.pth.mine.tmp"]
    assert (run_dir / "notes.tmp").read_text() == (run_dir / ".last.pth.mine.tmp").read_text() == "keep me"
    assert [row["epoch"] for row in _history(run_dir)] == ["1", "2", "3"]


# Run train.py with an --log_dir it cannot use, then list the heavy libraries it loaded on the way
# (from an atexit handler: train.py ends through utils.cli.exit_without_teardown, which runs them).
HEAVY_IMPORTS = """
import atexit, runpy, sys
heavy = ("torchmetrics", "matplotlib", "scipy", "sklearn", "imagehash", "onnx", "onnxruntime", "torchinfo")
atexit.register(lambda: print("loaded", sorted(name for name in heavy if name in sys.modules)))
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_bad_log_dir_is_answered_before_metrics_or_plotting_libraries_load(tmp_path):
    """train.py imports torchmetrics, matplotlib and the like where first used: a run that stops on
    its --log_dir (checked before the data scan) never pays for them."""
    (tmp_path / "a_file").write_text("not a folder")
    result = subprocess.run([sys.executable, "-c", HEAVY_IMPORTS, "--log_dir", str(tmp_path / "a_file" / "logs")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--log_dir" in result.stderr, result.stderr
    assert "loaded []" in result.stdout, result.stdout


def test_sigterm_stops_like_ctrl_c_with_the_last_checkpoint_finished(tmp_path):
    """`kill PID` (SIGTERM) after epoch 1: the run stops as on Ctrl-C (exit 130, the resume command),
    the checkpoint writer finishes its file first (no temp file left), history.csv is not ahead of
    last.pth, and the run resumes from there."""
    root = make_class_tree(tmp_path / "ds", {"a": 8, "b": 8}, size=32)
    logs = tmp_path / "logs"
    process = _start(["--dataset_path", str(root), *FAST, "--epochs", "30", "--log_dir", str(logs)])
    run_dir = _wait_for_epochs(logs, 1, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "continue with" in stdout and "Traceback" not in stderr
    assert not list(run_dir.glob(".*.tmp"))
    last = torch.load(run_dir / "last.pth", weights_only=True)
    assert 1 <= len(_history(run_dir)) <= last["epoch"] < 30
    assert [row["epoch"] for row in last["history"]][:len(_history(run_dir))] == [
        int(row["epoch"]) for row in _history(run_dir)]
