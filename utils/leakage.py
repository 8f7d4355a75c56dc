"""train.py's leakage check: the same picture in two splits (exact or near copies), found before training.

    check = check_leakage(scan, hash_cache_path(log_dir, dataset_root))
    check.report()      # lines for dataset_report.txt and the log

A copy of a training image in val/ or test/ makes those scores a measure of memory, not of
generalisation. This is the cheap part of audit_dataset.py (utils.image_hash: SHA-1 for exact
copies, pHash for resized/recompressed ones), run over the files train.py has already scanned.
Fingerprints are cached in LOG_DIR/.cache/image_hashes.sqlite (the cache audit_dataset.py uses
too), so a second run on the same dataset decodes nothing. Nothing is written into the dataset.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from utils.data import DatasetScan
from utils.image_hash import (
    DEFAULT_MAX_DISTANCE,
    HASH_CACHE_NAME,
    DuplicateGroup,
    fingerprint_files,
    search_duplicates,
)

MAX_LISTED = 10  # groups named in the report; audit_dataset.py lists them all


@dataclass
class LeakageCheck:
    """The duplicate groups whose members lie in more than one split, and how they were searched."""

    root: str
    leaks: list[DuplicateGroup]
    split_of: dict[str, str]  # path -> split, for every scanned image
    images: int
    max_distance: int  # pHash bits used (-1: exact copies only; see utils.image_hash.crowding_limit)
    seconds: float
    split_on_the_fly: bool = False

    def report(self) -> str:
        """The dataset report's section: a verdict, then the groups, each file as SPLIT/CLASS/NAME."""
        how = ("exact copies only: the images are too alike for perceptual hashes" if self.max_distance < 0
               else f"exact and near copies: pHash within {self.max_distance} of 64 bits")
        head = f"Leakage check ({how}; {self.images} images, {self.seconds:.1f}s; --no_audit skips it):"
        if not self.leaks:
            return f"{head}\n  no picture is in more than one split"
        lines = [head, f"  WARNING: {len(self.leaks)} picture(s) are in more than one split: the val/test scores "
                       "count images the model has trained on"]
        for group in self.leaks[:MAX_LISTED]:
            lines.append("  " + ", ".join(self._name(path) for path in group.paths) + f"  ({_kind(group)})")
        if len(self.leaks) > MAX_LISTED:
            lines.append(f"  ... and {len(self.leaks) - MAX_LISTED} more")
        fix = ("re-split it on disk with split_dataset.py, which keeps copies in one split" if self.split_on_the_fly
               else "keep each picture in one split (delete or move the copies)")
        lines.append(f"  Fix: {fix}; python audit_dataset.py --dataset_path {self.root} lists every group")
        return "\n".join(lines)

    def _name(self, path: str) -> str:
        name = os.path.relpath(path, self.root)  # train/<class>/<file> in a split tree
        return f"{self.split_of.get(path, '?')}: {name}" if self.split_on_the_fly else name


def _kind(group: DuplicateGroup) -> str:
    if all(member.kind == "exact" for member in group.members):
        return "identical files"
    farthest = max(member.distance for member in group.members if member.kind != "exact")
    return f"near copies: pHash {farthest:.0f} bits apart"


def hash_cache_path(log_dir: str | os.PathLike, dataset_root: str | os.PathLike) -> Optional[Path]:
    """LOG_DIR/.cache/image_hashes.sqlite; None (no cache, only slower) when LOG_DIR is inside the
    dataset, which is never written to."""
    folder = Path(log_dir, ".cache").resolve()
    root = Path(dataset_root).resolve()
    if folder == root or root in folder.parents:
        return None
    return folder / HASH_CACHE_NAME


def check_leakage(scan: DatasetScan, cache_path: Optional[str | os.PathLike],
                  max_distance: int = DEFAULT_MAX_DISTANCE, progress: bool = False) -> LeakageCheck:
    """Exact and near-duplicate groups among the scanned images that span splits."""
    start = time.perf_counter()
    split_of = {path: split for split, samples in scan.splits.items() for path, _ in samples}
    paths = list(split_of)
    search = search_duplicates(fingerprint_files(paths, cache_path, progress=progress), max_distance,
                               progress=progress)
    leaks = [group for group in search.groups if group.spans(split_of)]
    return LeakageCheck(scan.root, leaks, split_of, len(paths), search.max_distance,
                        time.perf_counter() - start, scan.split_on_the_fly)
