"""Training under torchrun (DDP): real 2-process runs on CPU with gloo, and the pieces on their own.

The multi-process runs share one small dataset (real digits scans, uneven val/test sizes so the
two ranks' evaluation shards differ). Each scenario is a 2-process run whose rank 1 crashes in
epoch 2, then a 2-process resume of it that finishes in the same run folder: once on one machine
(`torchrun --standalone`), once as two one-process "nodes" started as on two machines (c10d
rendezvous, then a static one for the resume), all on loopback addresses.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import REPO

import train
from models.registry import create_model
from utils.checkpoint import load_checkpoint
from utils.data import ImageDataset, create_dataloader, scan_dataset
from utils.distributed import ShardSampler, describe_scale, on_main_process, scaled_lr
from utils.engine import StepSettings, evaluate
from utils.errors import UsageError
from utils.logger import History
from utils.optim import create_optimizer, create_scheduler, restore_schedule
from utils.transforms import Preprocess, build_eval_transform

LAUNCH_TIMEOUT_S = 240  # a bound, not a speed claim: each run takes well under a minute on 2 cores
TRAIN_ARGS = ("--model", "resnet18", "--input_shape", "32", "--hflip", "0", "--crop_scale", "0.5",
              "--workers", "0", "--batch_size", "16")


def launch_env(extra: dict | None = None) -> dict:
    """This environment without the test hooks' variables, one thread per process, plus `extra`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_CLS_")}
    return {**clean, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(extra or {})}


def torchrun(nproc: int, *train_args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N train.py ...`, as a user would start it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py", *TRAIN_ARGS, *train_args]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               encoding="utf-8", env=launch_env(env))
    try:
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except BaseException:  # a timeout or Ctrl-C: stop torchrun AND its workers (a bare kill orphans them)
        stop_torchrun(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (chosen by the OS; free until torchrun binds it, barring a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def loopback_gloo_env() -> dict:
    """GLOO_SOCKET_IFNAME naming the loopback interface, where it has a known name.

    gloo otherwise connects the ranks through the address of the machine's host name."""
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return next(({"GLOO_SOCKET_IFNAME": name} for name in ("lo", "lo0") if name in names), {})


def stop_torchrun(process: subprocess.Popen) -> None:
    """End a torchrun that is still running, and the training processes it started.

    torchrun starts each of them in a session of its own, so killing torchrun or its process
    group would leave them running; on SIGTERM torchrun stops them itself (SIGTERM, and SIGKILL
    after 30 s), so it gets that first and SIGKILL only if it has not exited a minute later."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def torchrun_nodes(node_flags: list[list[str]], *train_args: str, output_dir: Path,
                   env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """One `torchrun ... --nproc_per_node=1 train.py ...` per "node", all started at once on this
    machine, as a user starts one on each machine; each node's result, in the order of `node_flags`.

    All nodes share one deadline, LAUNCH_TIMEOUT_S; past it (or on any error, Ctrl-C included)
    every node still running is stopped with its training process, and the test fails with their
    output. Output goes to files: a pipe that nobody reads while we wait for another node could
    fill up and stall that node, and with it the whole job.
    """
    nodes: list[subprocess.Popen] = []
    outputs = [(output_dir / f"node{index}.out", output_dir / f"node{index}.err") for index in range(len(node_flags))]
    timed_out = False
    try:
        for flags, (stdout_path, stderr_path) in zip(node_flags, outputs):
            command = [sys.executable, "-m", "torch.distributed.run", *flags, "--nproc_per_node=1",
                       "--local_addr=127.0.0.1", "train.py", *TRAIN_ARGS, *train_args]
            with open(stdout_path, "w", encoding="utf-8") as stdout, open(stderr_path, "w", encoding="utf-8") as stderr:
                nodes.append(subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr,
                                              env=launch_env({**loopback_gloo_env(), **(env or {})})))
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        for node in nodes:
            node.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for node in nodes:
            if node.poll() is None:
                stop_torchrun(node)
    results = [subprocess.CompletedProcess(node.args, node.returncode, out.read_text(encoding="utf-8"),
                                           err.read_text(encoding="utf-8")) for node, (out, err) in zip(nodes, outputs)]
    if timed_out:
        pytest.fail(f"the nodes did not finish within {LAUNCH_TIMEOUT_S} s and were stopped:\n"
                    + "\n".join(result.stdout[-2000:] + result.stderr[-2000:] for result in results))
    return results


@pytest.fixture(scope="module")
def small_digits(digits_root, tmp_path_factory) -> Path:
    """12 train images per class; 49 val and 31 test images (odd: the two shards differ)."""
    root = tmp_path_factory.mktemp("small_digits")
    for split, per_class in (("train", 12), ("val", 5), ("test", 3)):
        for class_dir in sorted((digits_root / split).iterdir()):
            files = sorted(class_dir.glob("*.png"))[:per_class]
            if split == "val" and class_dir.name == "9":
                files = files[:-1]
            if split == "test" and class_dir.name == "0":
                files = sorted(class_dir.glob("*.png"))[:per_class + 1]
            (root / split / class_dir.name).mkdir(parents=True)
            for file in files:
                shutil.copy(file, root / split / class_dir.name / file.name)
    return root


@pytest.fixture(scope="module")
def crashed_run(small_digits, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """2 processes, 2 epochs; rank 1 raises at the start of epoch 2 (after epoch 1 is saved)."""
    log_dir = tmp_path_factory.mktemp("ddp_logs")
    result = torchrun(2, "--dataset_path", str(small_digits), "--epochs", "2", "--log_dir", str(log_dir),
                      env={"TORCH_CLS_FAIL_RANK": "1", "TORCH_CLS_FAIL_EPOCH": "2"})
    return result, log_dir


def single_process_evaluation(checkpoint_path: Path, dataset: Path, split: str) -> dict:
    """The checkpoint's metrics on `split`, evaluated in this one process (no torchrun)."""
    checkpoint = load_checkpoint(checkpoint_path)
    preprocess = Preprocess.from_dict(checkpoint["preprocess"])
    model = create_model(checkpoint["model"], len(checkpoint["class_names"]), tuple(preprocess.input_size))
    model.load_state_dict(checkpoint["state_dict"])
    samples = scan_dataset(dataset).splits[split]
    loader = create_dataloader(ImageDataset(samples, build_eval_transform(preprocess)), 7, False, 0, torch.device("cpu"))
    return evaluate(model, loader, nn.CrossEntropyLoss(), StepSettings(torch.device("cpu"), preprocess),
                    len(checkpoint["class_names"]), show_progress=False)


def test_a_crash_on_one_rank_ends_the_job_and_keeps_the_last_epoch(crashed_run):
    result, log_dir = crashed_run  # torchrun returned within LAUNCH_TIMEOUT_S, else TimeoutExpired
    assert result.returncode != 0
    assert "failure injected on rank 1" in result.stdout + result.stderr
    (run_dir,) = [p for p in log_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert load_checkpoint(run_dir / "last.pth")["epoch"] == 1


def assert_val_metrics_cover_the_whole_split(run_dir: Path, dataset: Path) -> None:
    """best.pth's val metrics, summed over the ranks' shards, equal one process evaluating all of val."""
    best = load_checkpoint(run_dir / "best.pth")
    assert not any(key.startswith("module.") for key in best["state_dict"])  # the unwrapped model
    reference = single_process_evaluation(run_dir / "best.pth", dataset, "val")
    assert best["metrics"]["count"] == reference["count"] == 49  # each val image once: none twice, none missed
    for name in ("top1", "top5", "f1", "precision", "recall", "loss"):
        assert best["metrics"][name] == pytest.approx(reference[name], rel=1e-5, abs=1e-6), name


def assert_resumed_run_finished(log_dir: Path, run_dir: Path, dataset: Path) -> None:
    """The resumed run finished epoch 2 in its own folder (still the only one), written by rank 0 alone."""
    assert [p for p in log_dir.iterdir() if p.is_dir() and not p.name.startswith(".")] == [run_dir]
    with open(run_dir / "history.csv", encoding="utf-8") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["1", "2"]
    log_text = (run_dir / "train.log").read_text(encoding="utf-8")
    assert log_text.count("epoch 2/2") == 1  # one writer: rank 0
    assert load_checkpoint(run_dir / "last.pth")["epoch"] == 2
    test_metrics = json.loads((run_dir / "test_metrics.json").read_text(encoding="utf-8"))
    reference = single_process_evaluation(run_dir / "best.pth", dataset, "test")
    assert test_metrics["count"] == reference["count"] == 31
    assert test_metrics["top1"] == pytest.approx(reference["top1"], abs=1e-6)


def test_validation_metrics_over_both_ranks_equal_a_single_process_evaluation(crashed_run, small_digits):
    _, log_dir = crashed_run
    (run_dir,) = [p for p in log_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert_val_metrics_cover_the_whole_split(run_dir, small_digits)


def test_resume_under_torchrun_finishes_in_the_same_single_run_folder(crashed_run, small_digits):
    _, log_dir = crashed_run
    (run_dir,) = [p for p in log_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    result = torchrun(2, "--dataset_path", str(small_digits), "--resume_training", str(run_dir / "last.pth"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "16 per process x 2 processes x 1 accumulation = 32 images per optimizer step" in result.stdout
    assert_resumed_run_finished(log_dir, run_dir, small_digits)


@pytest.fixture(scope="module")
def two_node_crashed_run(small_digits, tmp_path_factory) -> tuple[list[subprocess.CompletedProcess], Path]:
    """Two "nodes" of one process each, joined by c10d rendezvous, 2 epochs; rank 1 raises at the
    start of epoch 2. c10d numbers the nodes itself (--node_rank is for static rendezvous only), so
    either node may hold rank 0."""
    log_dir = tmp_path_factory.mktemp("two_node_logs")
    rendezvous = ["--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_loopback_port()}",
                  "--rdzv_id=two_nodes"]
    nodes = torchrun_nodes([rendezvous, rendezvous], "--dataset_path", str(small_digits), "--epochs", "2",
                           "--log_dir", str(log_dir), "--dist_timeout", "60",
                           output_dir=tmp_path_factory.mktemp("two_node_output"),
                           env={"TORCH_CLS_FAIL_RANK": "1", "TORCH_CLS_FAIL_EPOCH": "2"})
    return nodes, log_dir


@pytest.mark.slow
def test_two_nodes_write_one_run_folder_and_validate_on_the_whole_split(two_node_crashed_run, small_digits):
    nodes, log_dir = two_node_crashed_run
    outputs = [node.stdout + node.stderr for node in nodes]
    assert all(node.returncode != 0 for node in nodes)  # rank 1's crash ended the job on both nodes
    assert sum("failure injected on rank 1" in output for output in outputs) == 1
    assert sum("error: [rank 0] lost contact with the other training processes" in output for output in outputs) == 1
    assert sum("Run folder:" in node.stdout for node in nodes) == 1  # rank 0 alone prints
    (run_dir,) = [p for p in log_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]  # and alone creates the run folder
    assert load_checkpoint(run_dir / "last.pth")["epoch"] == 1
    assert_val_metrics_cover_the_whole_split(run_dir, small_digits)  # both nodes' shards, summed


@pytest.mark.slow
def test_two_nodes_resume_with_static_rendezvous_and_finish_in_the_same_folder(two_node_crashed_run, small_digits,
                                                                              tmp_path):
    _, log_dir = two_node_crashed_run
    (run_dir,) = [p for p in log_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    port = free_loopback_port()
    static = [["--nnodes=2", f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]
              for rank in (0, 1)]
    node0, node1 = torchrun_nodes(static, "--resume", "auto", "--log_dir", str(log_dir), output_dir=tmp_path)
    assert node0.returncode == 0, node0.stderr[-3000:]
    assert node1.returncode == 0, node1.stderr[-3000:]
    # Static rendezvous: node_rank 0's process is rank 0, the one that prints and writes.
    assert f"Resumed from {run_dir / 'last.pth'} after epoch 1" in node0.stdout
    assert "16 per process x 2 processes x 1 accumulation = 32 images per optimizer step" in node0.stdout
    assert "epoch 2/2" not in node1.stdout
    assert_resumed_run_finished(log_dir, run_dir, small_digits)


def test_a_hung_rank_makes_the_others_give_up_after_the_timeout(small_digits, tmp_path):
    result = torchrun(2, "--dataset_path", str(small_digits), "--epochs", "1", "--log_dir", str(tmp_path),
                      "--dist_timeout", "10", env={"TORCH_CLS_FAIL_RANK": "1", "TORCH_CLS_FAIL_MODE": "hang"})
    assert result.returncode != 0
    assert "error: [rank 0] lost contact with the other training processes" in result.stderr


UNFREEZE_SCRIPT = """
import sys
import torch
import torch.distributed as dist
import torch.nn as nn
from utils.distributed import follow_unfreeze, get_rank, init_distributed, wrap_for_training

device = init_distributed("cpu")
for follow in (False, True):
    torch.manual_seed(get_rank())  # other initial weights on each rank: DDP must sync them
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # --freeze_backbone
    train_model, _ = wrap_for_training(model, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in (1, 2):
        if epoch == 2:  # --unfreeze_epoch 2
            model[0].requires_grad_(True)
            if follow:
                train_model = follow_unfreeze(train_model, model, device)
        train_model(torch.randn(8, 4) + get_rank()).square().sum().backward()  # each rank its own batch
        optimizer.step()
        optimizer.zero_grad()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weights)
    same = all(torch.equal(gathered[0], other) for other in gathered)
    print(f"follow_unfreeze={follow}: ranks {'in sync' if same else 'drifted'}")
"""  # no destroy_process_group(): init_distributed leaves the group at exit, as in train.py


def test_unfreezing_under_ddp_keeps_the_ranks_in_sync(tmp_path):
    script = tmp_path / "unfreeze.py"
    script.write_text(UNFREEZE_SCRIPT, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        cwd=REPO, capture_output=True, text=True, encoding="utf-8", timeout=LAUNCH_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "follow_unfreeze=False: ranks drifted" in result.stdout  # what DDP alone does: the test can see it
    assert "follow_unfreeze=True: ranks in sync" in result.stdout


@pytest.mark.parametrize("num_samples", [0, 1, 2, 7, 49, 50])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shard_sampler_covers_each_sample_exactly_once(num_samples, world_size):
    shards = [list(ShardSampler(num_samples, rank, world_size)) for rank in range(world_size)]
    assert sorted(index for shard in shards for index in shard) == list(range(num_samples))
    assert [len(ShardSampler(num_samples, rank, world_size)) for rank in range(world_size)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_sampler_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError):
        ShardSampler(10, rank=2, world_size=2)


def schedule(steps_per_epoch: int, lr: float = 0.1) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = create_optimizer(model, "sgd", lr, momentum=0.9, weight_decay=0.0)
    return optimizer, create_scheduler(optimizer, "cos", epochs=6, iters_per_epoch=steps_per_epoch, warmup_epochs=1)


def train_steps(optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()


def test_resume_with_more_steps_per_epoch_continues_the_schedule_at_the_same_point():
    old_optimizer, old_scheduler = schedule(steps_per_epoch=4)  # e.g. 2 processes
    train_steps(old_optimizer, old_scheduler, 2 * 4)  # 2 epochs
    optimizer, scheduler = schedule(steps_per_epoch=8)  # resumed with 1 process
    assert restore_schedule(optimizer, scheduler, old_optimizer.state_dict(), old_scheduler.state_dict(), 2 * 8)
    reference_optimizer, reference_scheduler = schedule(steps_per_epoch=8)
    train_steps(reference_optimizer, reference_scheduler, 2 * 8)  # a run that had 8 steps per epoch all along
    assert optimizer.param_groups[0]["lr"] == pytest.approx(reference_optimizer.param_groups[0]["lr"])
    assert scheduler.last_epoch == 16
    saved_momentum = old_optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"], saved_momentum)


def test_resume_with_the_same_steps_loads_the_schedule_as_saved():
    old_optimizer, old_scheduler = schedule(steps_per_epoch=4)
    train_steps(old_optimizer, old_scheduler, 8)
    optimizer, scheduler = schedule(steps_per_epoch=4)
    assert not restore_schedule(optimizer, scheduler, old_optimizer.state_dict(), old_scheduler.state_dict(), 8)
    assert optimizer.param_groups[0]["lr"] == old_optimizer.param_groups[0]["lr"]
    train_steps(optimizer, scheduler, 3)
    train_steps(old_optimizer, old_scheduler, 3)
    assert optimizer.param_groups[0]["lr"] == old_optimizer.param_groups[0]["lr"]


def test_one_process_without_torchrun_is_unchanged(tmp_path):
    assert scaled_lr(0.1, "linear") == 0.1  # world size 1
    assert on_main_process(lambda x: x + 1, 1) == 2
    assert describe_scale(16, 2, 0.1, 0.1).startswith("Effective batch size: 16 per process x 2 accumulation = 32")
    history = History(None)  # what ranks other than 0 keep: rows, no files
    history.append({"epoch": 1, "train_loss": 1.0})
    history.plot(tmp_path)
    assert history.rows and not list(tmp_path.iterdir())


def test_sync_bn_without_torchrun_is_a_one_line_usage_error(small_digits):
    with pytest.raises(UsageError, match="--sync_bn needs several processes"):
        train.main(["--dataset_path", str(small_digits), "--sync_bn"])


def _state_equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.allclose(first[k].float(), second[k].float(), atol=1e-6)
                                                 for k in first)


@pytest.mark.slow
def test_ema_and_balanced_sampling_under_torchrun_validate_the_average_and_resume_exactly(small_digits,
                                                                                         tmp_path):
    """--ema and --sampler balanced on two ranks: best.pth holds the EMA weights that validation
    judged (equal to one process evaluating them), and a run that crashed on rank 1 at epoch 2
    resumes to the same weights, EMA and history as a run that was never interrupted."""
    recipe = ["--dataset_path", str(small_digits), "--epochs", "2", "--ema", "0.9", "--sampler", "balanced",
              "--seed", "3", "--deterministic"]
    straight = torchrun(2, *recipe, "--log_dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "use the EMA weights" in straight.stdout
    (straight_dir,) = [p for p in (tmp_path / "straight").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert_val_metrics_cover_the_whole_split(straight_dir, small_digits)
    best, last = load_checkpoint(straight_dir / "best.pth"), load_checkpoint(straight_dir / "last.pth")
    assert best["epoch"] in (1, 2) and last["ema"]["updates"] > 0
    if best["epoch"] == 2:  # best.pth keeps the average, last.pth both the average and the trained weights
        assert _state_equal(best["state_dict"], last["ema"]["state_dict"])
        assert not _state_equal(best["state_dict"], last["state_dict"])

    broken_logs = tmp_path / "broken"
    crashed = torchrun(2, *recipe, "--log_dir", str(broken_logs),
                       env={"TORCH_CLS_FAIL_RANK": "1", "TORCH_CLS_FAIL_EPOCH": "2"})
    assert crashed.returncode != 0
    (run_dir,) = [p for p in broken_logs.iterdir() if p.is_dir() and not p.name.startswith(".")]
    resumed = torchrun(2, "--dataset_path", str(small_digits), "--resume_training", str(run_dir / "last.pth"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    continued = load_checkpoint(run_dir / "last.pth")
    assert continued["epoch"] == last["epoch"] == 2
    assert _state_equal(continued["state_dict"], last["state_dict"])
    assert _state_equal(continued["ema"]["state_dict"], last["ema"]["state_dict"])
    assert continued["ema"]["updates"] == last["ema"]["updates"]
    with open(run_dir / "history.csv", encoding="utf-8") as file, \
            open(straight_dir / "history.csv", encoding="utf-8") as reference_file:
        rows, reference_rows = list(csv.DictReader(file)), list(csv.DictReader(reference_file))
    for key in ("epoch", "train_loss", "val_loss", "val_acc"):
        assert [row[key] for row in rows] == [row[key] for row in reference_rows], key
