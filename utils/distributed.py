"""Training on many GPUs or machines under torchrun (DistributedDataParallel).

torchrun starts one process per GPU (or several CPU processes) and tells each one where it
stands through environment variables: RANK (index among all processes), LOCAL_RANK (index on
this machine) and WORLD_SIZE. Without them everything here falls back to one process, so
train.py runs the same code either way.

Who does what under torchrun:
    every rank   trains on its share of each epoch (DistributedSampler) and evaluates its
                 share of val/test (ShardSampler); metrics are summed across ranks
    rank 0       creates the run folder and writes logs, plots, checkpoints and progress bars

A rank that fails ends the job: torchrun stops the others when a process exits, and a
rank stuck waiting for a dead or hung peer gives up after --dist_timeout seconds.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, WeightedRandomSampler

from utils.device import select_device
from utils.errors import UsageError

T = TypeVar("T")

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
BACKENDS = ("auto", "nccl", "gloo")
LR_SCALES = ("none", "linear")
DEFAULT_TIMEOUT_S = 600.0  # PyTorch's own NCCL default; rank 0 alone may save a large checkpoint meanwhile
# Flags that describe the launch rather than the run, so a resumed run may change them.
RESUME_OVERRIDABLE_FLAGS = ("dist_backend", "dist_timeout")
# Per-rank seeds: rank r adds r * stride, so rank 0 keeps the single-process seeds.
_RANK_SEED_STRIDE = 100_003

# Test hooks (used by tests/test_distributed.py): the process of rank TORCH_CLS_FAIL_RANK fails
# at the start of epoch TORCH_CLS_FAIL_EPOCH (default 1), by raising ("raise", the default
# TORCH_CLS_FAIL_MODE) or by hanging ("hang").
FAIL_RANK_VARIABLE = "TORCH_CLS_FAIL_RANK"
FAIL_EPOCH_VARIABLE = "TORCH_CLS_FAIL_EPOCH"
FAIL_MODE_VARIABLE = "TORCH_CLS_FAIL_MODE"
# How gloo words a lost peer: a plain RuntimeError (NCCL raises DistBackendError, a DistError).
_PEER_FAILURE_SIGNS = ("timeout", "timed out", "connection closed", "connection reset", "closed by peer",
                       "broken pipe")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The torchrun-related flags of train.py."""
    group = parser.add_argument_group("many GPUs / machines (run under torchrun, see README)")
    group.add_argument("--dist_backend", "--dist-backend", choices=BACKENDS, default="auto",
                       help="process-group backend: nccl on CUDA, gloo on CPU (auto)")
    group.add_argument("--dist_timeout", "--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                       help="seconds a process waits for the others before giving up (a crashed or hung rank)")
    group.add_argument("--sync_bn", "--sync-bn", action="store_true",
                       help="BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only)")
    group.add_argument("--lr_scale", "--lr-scale", choices=LR_SCALES, default="none",
                       help="linear: multiply --lr by the number of processes (the global batch grows with it)")


# ---- where this process stands ------------------------------------------------------------

def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def is_distributed() -> bool:
    """True once the process group is up (under torchrun, after init_distributed)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, the one process that writes files and prints progress (True without torchrun)."""
    return get_rank() == 0


# ---- set-up and tear-down -----------------------------------------------------------------

def init_distributed(device_name: str = "auto", backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                     sync_bn: bool = False) -> torch.device:
    """Pick this process's device and, under torchrun, join the process group.

    Without torchrun this is `select_device(device_name)`. Under torchrun on CUDA each process
    takes the GPU cuda:LOCAL_RANK; the backend is nccl on CUDA and gloo on CPU unless
    `backend` names one. `timeout_s` bounds every wait for the other ranks. `sync_bn` is
    only checked here (it needs torchrun and CUDA), before any time goes into data or model.
    """
    if not launched_by_torchrun():
        if sync_bn:
            raise UsageError("--sync_bn needs several processes: start train.py with torchrun (see README)")
        return select_device(device_name)
    if timeout_s <= 0:
        raise UsageError(f"--dist_timeout must be a positive number of seconds, got {timeout_s}")
    device = _device_for_local_rank(device_name, int(os.environ["LOCAL_RANK"]))
    if sync_bn and device.type != "cuda":
        raise UsageError("--sync_bn needs CUDA GPUs (SyncBatchNorm has no CPU implementation)")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UsageError(f"--dist_backend nccl needs CUDA GPUs, but this process runs on {device}; use gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    atexit.register(cleanup_distributed)
    return device


def _device_for_local_rank(device_name: str, local_rank: int) -> torch.device:
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UsageError(f"LOCAL_RANK {local_rank} has no GPU: this machine has {count}; "
                             f"start at most {count} processes per node (torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    device = select_device(device_name)
    if device.type == "cuda":
        raise UsageError(f"--device {device_name}: under torchrun each process takes cuda:LOCAL_RANK; "
                         "pass --device cuda and choose GPUs with CUDA_VISIBLE_DEVICES")
    if device.type == "mps":
        raise UsageError("Apple MPS cannot be shared by several torchrun processes; use --device cpu")
    return device


def cleanup_distributed() -> None:
    """Leave the process group (no-op in one process); init_distributed registers it to run at exit.

    DDP wrappers hold the process group: they are collected first, else gloo's threads can
    outlive the interpreter and abort the process ("terminate called without an active
    exception") after a successful run.
    """
    if not is_distributed():
        return
    gc.collect()
    dist.destroy_process_group()


def describe_peer_failure(error: BaseException) -> Optional[str]:
    """A one-line explanation when `error` means another rank died or hangs, else None."""
    if not is_distributed() or not isinstance(error, RuntimeError):
        return None
    text = str(error).strip()
    if not isinstance(error, dist.DistError) and not any(sign in text.lower() for sign in _PEER_FAILURE_SIGNS):
        return None
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(error).__name__)  # drop "[file.cc:12]"
    return (f"lost contact with the other training processes ({detail[:200]}): another rank crashed "
            "(its own output says why) or hangs; --dist_timeout sets how long a rank waits for the others")


# ---- sharing work and results between ranks -----------------------------------------------

def on_main_process(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `function` on rank 0 only and return its result on every rank.

    For work that must happen once (creating the run folder, writing the demo data) or that
    only rank 0 may see (reading a file it wrote). A UsageError on rank 0 is raised on every
    rank, so all of them stop with the same one-line message instead of waiting for it.
    """
    if not is_distributed():
        return function(*args, **kwargs)
    payload: list[Any] = [None]
    if is_main_process():
        try:
            payload[0] = (True, function(*args, **kwargs))
        except UsageError as error:
            payload[0] = (False, str(error))
    dist.broadcast_object_list(payload, src=0)
    succeeded, value = payload[0]
    if not succeeded:
        raise UsageError(value)
    return value


def check_same_on_all_ranks(value: Any, what: str) -> None:
    """UsageError when the ranks disagree on `value` (say, machines holding different copies
    of the dataset), which would otherwise end in mismatched batch counts and a timeout."""
    if not is_distributed():
        return
    values: list[Any] = [None] * get_world_size()
    dist.all_gather_object(values, value)
    differing = [rank for rank, other in enumerate(values) if other != values[0]]
    if differing:
        raise UsageError(f"{what} differs between rank 0 and rank(s) {differing}: "
                         "every process must see the same files at the same path")


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP keeps the weights equal, but each rank updates its running statistics with its own
    last batch; before evaluating, all ranks take those of rank 0, whose model is the one
    saved in the checkpoints.
    """
    if not is_distributed():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` across ranks (the values themselves in one process)."""
    if not is_distributed():
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


# ---- data ---------------------------------------------------------------------------------

class ShardSampler(Sampler[int]):
    """Rank r of W takes samples r, r + W, r + 2W, ...: over all ranks each sample exactly once.

    For evaluation. DistributedSampler pads the shards with repeated samples so every rank
    runs the same number of batches (training needs that for the gradient all-reduce); in
    metrics those repeats would count twice. Shards here differ by at most one sample.
    """

    def __init__(self, num_samples: int, rank: Optional[int] = None, world_size: Optional[int] = None):
        self.num_samples = num_samples
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


class BalancedSampler(Sampler[int]):
    """Class-balanced sampling (--sampler balanced): an epoch of len(labels) draws with
    replacement, each image weighted 1 / (its class's image count), so every class is drawn
    equally often on average, whatever its size. Rare-class images repeat within an epoch;
    some images of large classes are not seen in it.

    The draws come from torch's WeightedRandomSampler with a generator seeded from (seed,
    epoch) (`set_epoch`, called by begin_epoch): the same sequence on every rank, of which
    rank r of W takes draws r, r + W, ... (the sequence is padded to a multiple of W), and an
    epoch replays exactly on resume.
    """

    def __init__(self, labels: Sequence[int], seed: int, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        counts = Counter(labels)
        self.weights = torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.float64)
        self.seed, self.epoch = seed, 0
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.total = math.ceil(len(labels) / self.world_size) * self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = list(WeightedRandomSampler(self.weights, self.total, replacement=True, generator=generator))
        return iter(draws[self.rank::self.world_size])

    def __len__(self) -> int:
        return self.total // self.world_size


def train_sampler(dataset: Dataset, seed: int, balanced_labels: Optional[Sequence[int]] = None) -> Optional[Sampler]:
    """The training sampler: a BalancedSampler over `balanced_labels` (the training labels) when
    given; else a DistributedSampler under torchrun (same `seed` on every rank, reshuffled by
    begin_epoch); None in one process (the DataLoader shuffles)."""
    if balanced_labels is not None:
        return BalancedSampler(balanced_labels, seed)
    if not is_distributed():
        return None
    return DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)


def eval_sampler(dataset: Dataset) -> Optional[ShardSampler]:
    """A ShardSampler over `dataset` for this rank; None in one process."""
    return ShardSampler(len(dataset)) if is_distributed() else None


def rank_seed(seed: int) -> int:
    """A seed of this rank's own: rank 0 keeps `seed`, the others get distinct ones."""
    return seed + _RANK_SEED_STRIDE * get_rank()


def begin_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Seed an epoch's randomness from (seed, epoch, rank), so any epoch replays exactly.

    The loader's generator seeds shuffling and the DataLoader workers' augmentation. Under
    torchrun the DistributedSampler reshuffles with `epoch` (the same order on every rank,
    each rank taking its share; a BalancedSampler draws by `epoch` in one process too), and
    torch's global RNG (augmentation without workers, dropout) is reseeded per rank: ranks draw differently, and a resumed run needs no
    per-rank RNG state in the checkpoint.
    """
    epoch_seed = seed + epoch
    if hasattr(loader.sampler, "set_epoch"):  # DistributedSampler, BalancedSampler
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(rank_seed(epoch_seed))
    if is_distributed():
        torch.manual_seed(rank_seed(epoch_seed))
    _fail_if_asked(epoch)


def _fail_if_asked(epoch: int) -> None:
    """The test hook described at FAIL_RANK_VARIABLE."""
    failing_rank = os.environ.get(FAIL_RANK_VARIABLE)
    if failing_rank is None or int(failing_rank) != get_rank():
        return
    if int(os.environ.get(FAIL_EPOCH_VARIABLE, "1")) != epoch:
        return
    if os.environ.get(FAIL_MODE_VARIABLE, "raise") == "hang":
        time.sleep(24 * 3600)
    raise RuntimeError(f"{FAIL_RANK_VARIABLE}={failing_rank}: failure injected on rank {get_rank()} (test hook)")


# ---- model, gradients, learning rate ------------------------------------------------------

def wrap_for_training(model: nn.Module, device: torch.device, compile_model: bool = False,
                      sync_bn: bool = False) -> tuple[nn.Module, nn.Module]:
    """(model to train, model to evaluate), both sharing `model`'s parameters.

    Under torchrun the first is DistributedDataParallel around `model` (which syncs the
    initial weights from rank 0 and averages gradients). Evaluation uses the plain model:
    DDP's forward syncs buffers with the other ranks, and evaluation shards may hold
    different numbers of batches. `sync_bn` first turns BatchNorm into SyncBatchNorm
    (init_distributed has checked that it can run here).
    """
    if sync_bn:
        _convert_sync_batchnorm(model)
    eval_model = torch.compile(model) if compile_model else model
    if not is_distributed():
        return eval_model, eval_model
    return _wrap_ddp(model, device, compile_model), eval_model


def follow_unfreeze(train_model: nn.Module, model: nn.Module, device: torch.device,
                    compile_model: bool = False) -> nn.Module:
    """`train_model`, or a new DDP wrapper if more parameters train than when it was built.

    DDP averages the gradients of the parameters that were trainable when it was made; after
    --unfreeze_epoch the others would train on each rank's own gradients and the ranks drift
    apart. Cheap to call every epoch: it rebuilds only when the trainable set grew.
    """
    ddp_model = getattr(train_model, "_orig_mod", train_model)  # inside torch.compile
    if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
        return train_model
    if ddp_model.trainable_when_wrapped == _count_trainable(model):
        return train_model
    return _wrap_ddp(model, device, compile_model)


def _wrap_ddp(model: nn.Module, device: torch.device, compile_model: bool) -> nn.Module:
    ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp_model.trainable_when_wrapped = _count_trainable(model)  # for follow_unfreeze
    return torch.compile(ddp_model) if compile_model else ddp_model


def _count_trainable(model: nn.Module) -> int:
    return sum(1 for param in model.parameters() if param.requires_grad)


def _convert_sync_batchnorm(model: nn.Module) -> None:
    # Child by child, so `model` itself stays the object the optimizer and checkpoints refer to.
    for name, child in model.named_children():
        setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces gradients in every backward; between accumulation steps
    (--accum_steps) that is wasted traffic, so `enabled=False` skips it (DDP's no_sync)."""
    no_sync = getattr(model, "no_sync", None)
    return contextlib.nullcontext() if enabled or no_sync is None else no_sync()


def scaled_lr(lr: float, rule: str) -> float:
    """The lr to train with: --lr, times the number of processes with --lr_scale linear."""
    if rule not in LR_SCALES:
        raise UsageError(f"--lr_scale must be one of {', '.join(LR_SCALES)}, got {rule!r}")
    return lr * get_world_size() if rule == "linear" else lr


def describe_scale(batch_size: int, accum_steps: int, base_lr: float, lr: float) -> str:
    """One line: the global batch per optimizer step and the lr that goes with it."""
    world = get_world_size()
    processes = f" x {world} processes" if world > 1 else ""
    line = (f"Effective batch size: {batch_size} per process{processes} x {accum_steps} accumulation "
            f"= {batch_size * world * accum_steps} images per optimizer step; lr {lr:.3g}")
    if not math.isclose(lr, base_lr):
        line += f" (--lr {base_lr:.3g} x {world} processes, --lr_scale linear)"
    return line
