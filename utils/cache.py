"""Decode-once image caches for `train.py --cache ram|disk`.

Without a cache every epoch decodes every image file again, which dominates the data time for
large JPEGs. A cache keeps, per image, the output of the deterministic part of its preprocessing:

    eval splits   the whole eval transform (utils.transforms.build_eval_transform): the cached
                  tensor IS the model input before normalisation, so evaluation with a cache is
                  bit-identical to evaluation without one (tests/test_perf.py checks this).
    train split   the image shrunk, aspect ratio kept, to cover the input size x TRAIN_CACHE_MARGIN
                  (utils.transforms.build_cache_transform), never enlarged; the random
                  augmentation still runs each epoch on that smaller image.

ram   one uint8 tensor for a whole split, filled before the first epoch (the DataLoader workers
      decode in parallel) and shared with the workers (fork: copy-on-write; spawn: shared memory).
disk  one .npy file per image under the cache folder, written the first time an image is read,
      keyed by the file's path, mtime and size and the preprocessing, so an edited image or a
      different input size never reads a stale entry. The folder is never inside the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np
import torch
from tqdm import tqdm

from utils.data import ImageDataset, ImageReadError, Sample, read_rgb, stop_worker_like_ctrl_c
from utils.errors import UsageError
from utils.transforms import Preprocess, build_cache_transform, build_eval_transform

CACHE_MODES = ("none", "ram", "disk")
CACHE_VERSION = 2  # part of every disk key: bump when the reader or the stored layout changes
RAM_SHARE = 0.5  # --cache ram refuses to take more than this share of the available memory

Prepare = Callable[[torch.Tensor], torch.Tensor]


class ImageCache(Protocol):
    def get(self, index: int) -> torch.Tensor:
        """The prepared uint8 CHW image of sample `index`; ImageReadError if it cannot be read."""


class _PrepareOne:
    """Decode sample `index` and apply the deterministic `prepare` (a picklable callable)."""

    def __init__(self, samples: Sequence[Sample], prepare: Prepare):
        self.samples, self.prepare = samples, prepare

    def __call__(self, index: int) -> torch.Tensor:
        path = self.samples[index][0]  # large JPEGs decoded smaller, as without a cache (utils.data.read_rgb)
        image = torch.from_numpy(read_rgb(path, getattr(self.prepare, "source_min_size", None))).permute(2, 0, 1)
        return self.prepare(image).contiguous()


class _FillSet(torch.utils.data.Dataset):
    """index -> (index, prepared image or an empty tensor, error text): the RAM cache's one decoding pass."""

    def __init__(self, prepare_one: _PrepareOne):
        self.prepare_one = prepare_one

    def __len__(self) -> int:
        return len(self.prepare_one.samples)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        try:
            return index, self.prepare_one(index), ""
        except ImageReadError as error:
            return index, torch.empty(0, dtype=torch.uint8), str(error)


class RamCache:
    """All prepared images of one split in a single uint8 tensor plus a (N, 3) index of offset, H, W."""

    def __init__(self, buffer: torch.Tensor, index: torch.Tensor, errors: dict[int, str]):
        self.buffer, self.index, self.errors = buffer, index, errors

    def get(self, index: int) -> torch.Tensor:
        offset, height, width = self.index[index].tolist()
        if height == 0:
            raise ImageReadError(self.errors.get(index, f"image {index} could not be cached"))
        return self.buffer[offset:offset + 3 * height * width].view(3, height, width)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @classmethod
    def fill(cls, samples: Sequence[Sample], prepare: Prepare, workers: int = 0, description: str = "cache",
             budget_bytes: Optional[int] = None, show_progress: bool = False) -> RamCache:
        """Decode and prepare every sample once (in `workers` processes); refuse to exceed the budget."""
        budget = available_memory() * RAM_SHARE if budget_bytes is None else budget_bytes
        loader = torch.utils.data.DataLoader(_FillSet(_PrepareOne(samples, prepare)), batch_size=None,
                                             num_workers=workers, worker_init_fn=stop_worker_like_ctrl_c)
        images: list[Optional[torch.Tensor]] = [None] * len(samples)
        errors: dict[int, str] = {}
        total = 0
        for index, image, error in tqdm(loader, desc=description, disable=not show_progress, leave=False,
                                        file=sys.stderr, total=len(samples)):
            if error:
                errors[index] = error
            total += image.numel()
            if budget and total > budget:
                raise UsageError(f"--cache ram: {description} needs more than {budget / 2**30:.1f} GiB "
                                 f"(half the free memory) after {index + 1} of {len(samples)} images; "
                                 "use --cache disk or --cache none")
            # a tensor from a worker holds a shared-memory file descriptor while it lives: copy it,
            # or a large dataset runs out of descriptors ("Too many open files")
            images[index] = image.clone() if workers else image
        return cls._pack(images, errors)

    @classmethod
    def _pack(cls, images: list[Optional[torch.Tensor]], errors: dict[int, str]) -> RamCache:
        # torch.empty only reserves the pages; each copy commits its part while the source is dropped,
        # so packing does not need twice the memory.
        buffer = torch.empty(sum(image.numel() for image in images), dtype=torch.uint8)
        index = torch.zeros(len(images), 3, dtype=torch.int64)
        offset = 0
        for i, image in enumerate(images):
            if image.numel():
                height, width = image.shape[-2:]
                buffer[offset:offset + image.numel()] = image.flatten()
                index[i] = torch.tensor([offset, height, width])
                offset += image.numel()
            images[i] = None
        return cls(buffer, index, errors)


class DiskCache:
    """One .npy per prepared image under `folder`, written on first use (atomically)."""

    def __init__(self, samples: Sequence[Sample], prepare: Prepare, folder: str | os.PathLike, recipe: str):
        self.prepare_one = _PrepareOne(samples, prepare)
        self.folder, self.recipe = Path(folder), recipe

    def entry(self, index: int) -> Path:
        """Where sample `index` is stored: a hash of path, mtime, size and recipe."""
        path = os.path.abspath(self.prepare_one.samples[index][0])
        try:
            stat = os.stat(path)
        except OSError as error:
            raise ImageReadError(f"cannot read {path}: {error.strerror or error}") from None
        key = hashlib.sha1(f"{CACHE_VERSION}|{path}|{stat.st_mtime_ns}|{stat.st_size}|{self.recipe}".encode()).hexdigest()
        return self.folder / key[:2] / f"{key[2:]}.npy"

    def get(self, index: int) -> torch.Tensor:
        entry = self.entry(index)
        try:
            return torch.from_numpy(np.load(entry))
        except (OSError, ValueError, EOFError):  # not written yet (or cut short by a crash): make it
            pass
        image = self.prepare_one(index)
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial = entry.with_name(f"{entry.stem}.{os.getpid()}.partial.npy")
        np.save(partial, image.numpy())
        os.replace(partial, entry)  # atomic: a reader sees the whole entry or none
        return image


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable; 0 = unknown, no limit)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resolve_cache_dir(mode: str, cache_dir: Optional[str], log_dir: str | os.PathLike,
                      dataset_root: str | os.PathLike) -> Optional[Path]:
    """Where --cache disk writes: --cache_dir, else LOG_DIR/.cache/images (shared by the runs of one
    log folder: the keys keep different settings apart); None for the other modes. Never inside the
    dataset: nothing in the dataset is ever modified."""
    if mode != "disk":
        return None
    folder = Path(cache_dir) if cache_dir else Path(log_dir) / ".cache" / "images"
    resolved, root = folder.resolve(), Path(dataset_root).resolve()
    if resolved == root or root in resolved.parents:
        flag = "--cache_dir" if cache_dir else "--log_dir (the default cache place)"
        raise UsageError(f"{flag} {folder} is inside the dataset {root}; the cache must go elsewhere")
    return folder


def _recipe(kind: str, preprocess: Preprocess) -> str:
    return f"{kind}:{json.dumps(preprocess.to_dict(), sort_keys=True)}"


def build_cache(mode: str, samples: Sequence[Sample], prepare: Prepare, recipe: str, folder: Optional[Path],
                workers: int, description: str, show_progress: bool) -> Optional[ImageCache]:
    if mode == "ram":
        return RamCache.fill(samples, prepare, workers, description, show_progress=show_progress)
    if mode == "disk":
        if folder is None:
            raise UsageError("--cache disk needs a cache folder (--cache_dir)")
        return DiskCache(samples, prepare, folder, recipe)
    if mode == "none":
        return None
    raise UsageError(f"--cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")


def cache_datasets(mode: str, preprocess: Preprocess, train_set: ImageDataset, eval_sets: Sequence[ImageDataset],
                   folder: Optional[str | os.PathLike] = None, workers: int = 0, show_progress: bool = False) -> str:
    """Give the datasets of a run their caches (mode "none": leave them as they are).

    Eval datasets then return the cached eval-transform output directly (their transform is
    dropped: it already ran); the train dataset keeps its random transform, applied to the
    cached, shrunk image. Returns a line for the log.
    """
    if mode == "none":
        return "Cache: none (every epoch decodes the image files; --cache ram or disk decodes them once)"
    folder = Path(folder) if folder is not None else None
    train_set.cache = build_cache(mode, train_set.samples, build_cache_transform(preprocess),
                                  _recipe("train", preprocess), folder, workers, "caching train images", show_progress)
    eval_transform = build_eval_transform(preprocess)
    for number, dataset in enumerate(eval_sets, start=1):
        dataset.cache = build_cache(mode, dataset.samples, eval_transform, _recipe("eval", preprocess), folder,
                                    workers, f"caching eval images ({number}/{len(eval_sets)})", show_progress)
        dataset.transform = None
    if mode == "ram":
        size = sum(dataset.cache.nbytes for dataset in (train_set, *eval_sets))
        return f"Cache: ram, {size / 2**20:.0f} MiB of decoded images"
    return f"Cache: disk, {folder}"
