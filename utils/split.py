"""Plan a train/val/test split of a class-folder dataset (split_dataset.py and train.py's --val_ratio).

`plan_split` is pure: {class: files} in, one Assignment per file out. The result depends only on
the file paths, the ratios and the seed (never on input order or the global RNG), so the same
files always give the same split. Files that share a key (`hashes`: a sha1 for byte-identical
files, a group key for near duplicates) are kept in one split.
The file-system half (scanning the source, records, placing, --overwrite, --undo) is
utils/split_files.py, which only split_dataset.py uses.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from natsort import natsort_keygen, natsorted

from utils.errors import UsageError

SPLITS = ("train", "val", "test")
MIN_CLASS_SIZE = 3  # below this a class goes to train whole: 1 of 2 images is no validation
_natural_key = natsort_keygen()


def _path_key(path: str) -> tuple:
    # natsort sees "img1" and "img01" as equal; the raw string breaks the tie so that
    # the input order can never leak into the result
    return (_natural_key(path), path)


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Assignment:
    """One input file and the split it goes to."""

    path: str
    class_name: str
    split: str  # "train", "val" or "test"


@dataclass
class DuplicateGroup:
    """Files that share a key in `hashes` (a sha1: byte-identical; a group key such as
    utils.image_hash.group_keys gives: near duplicates). All of them end in `split`."""

    key: str
    paths: list[str]
    classes: list[str]  # more than one: the same image carries two labels
    split: str
    moved: list[tuple[str, str]] = field(default_factory=list)  # (path, split it was planned for)


@dataclass
class SplitPlan:
    """The result of `plan_split`: one assignment per input file, plus what the report needs."""

    assignments: list[Assignment]
    val_ratio: float
    test_ratio: float
    seed: int
    duplicate_groups: list[DuplicateGroup] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return natsorted({a.class_name for a in self.assignments})

    @property
    def splits(self) -> list[str]:
        """The splits that receive at least one file, in train/val/test order."""
        used = {a.split for a in self.assignments}
        return [s for s in SPLITS if s in used]

    def counts(self) -> dict[str, dict[str, int]]:
        """class -> split -> number of files (every split in SPLITS present, maybe 0)."""
        table = {name: dict.fromkeys(SPLITS, 0) for name in self.class_names}
        for a in self.assignments:
            table[a.class_name][a.split] += 1
        return table

    @property
    def small_classes(self) -> list[str]:
        """Classes with fewer than MIN_CLASS_SIZE files: all of them are in train."""
        return [c for c, row in self.counts().items() if sum(row.values()) < MIN_CLASS_SIZE]

    def format_table(self) -> str:
        """Per-class table: total / train / val [/ test], and a total row."""
        counts = self.counts()
        splits = [s for s in SPLITS if s != "test" or self.test_ratio > 0]
        width = max([len(c) for c in counts] + [5])
        lines = [f"{'class':<{width}} {'total':>7}" + "".join(f" {s:>7}" for s in splits)]
        for name, row in counts.items():
            lines.append(f"{name:<{width}} {sum(row.values()):>7}" + "".join(f" {row[s]:>7}" for s in splits))
        totals = {s: sum(row[s] for row in counts.values()) for s in SPLITS}
        lines.append(f"{'total':<{width}} {len(self.assignments):>7}" + "".join(f" {totals[s]:>7}" for s in splits))
        return "\n".join(lines)


def check_ratios(val_ratio: float, test_ratio: float) -> None:
    """UsageError (naming the flags) unless 0 <= ratios and val + test < 1."""
    for flag, ratio in (("--val_ratio", val_ratio), ("--test_ratio", test_ratio)):
        if not 0 <= ratio < 1:  # also catches NaN
            raise UsageError(f"{flag} must be in [0, 1), got {ratio}")
    if val_ratio + test_ratio >= 1:
        raise UsageError(
            f"--val_ratio {val_ratio} + --test_ratio {test_ratio} must be below 1 (train needs the rest)"
        )


def _round_half_up(x: float) -> int:
    # Python's round() rounds 2.5 to 2; round(x, 9) drops float noise such as 90 * 0.35 = 31.499999999999996
    return math.floor(round(x, 9) + 0.5)


def split_counts(n: int, val_ratio: float, test_ratio: float) -> tuple[int, int, int]:
    """(train, val, test) sizes for a class of `n` files.

    Classes of fewer than MIN_CLASS_SIZE files go to train whole. Otherwise each split gets
    n * ratio rounded half up, at least 1 when its ratio is > 0, and train keeps at least 1.
    """
    if n < MIN_CLASS_SIZE:
        return n, 0, 0
    n_val = max(1, _round_half_up(n * val_ratio)) if val_ratio > 0 else 0
    n_test = max(1, _round_half_up(n * test_ratio)) if test_ratio > 0 else 0
    while n_val + n_test > n - 1:  # only on tiny classes where rounding up ate train
        if n_test > 1 and n_test >= n_val:  # on a tie test gives first: train.py needs val, test is optional
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def _check_unique(files: Mapping[str, Sequence[str]]) -> None:
    seen: dict[str, str] = {}
    for class_name, paths in files.items():
        for path in paths:
            if path in seen:
                raise ValueError(f"{path} is listed twice (classes {seen[path]!r} and {class_name!r})")
            seen[path] = class_name


def _shuffled(paths: Sequence[str], class_name: str, seed: int) -> list[str]:
    # One RNG per class, seeded by the class name: adding a class does not reshuffle the others,
    # and the global RNG state plays no part.
    ordered = sorted(paths, key=_path_key)
    random.Random(f"{seed}:{class_name}").shuffle(ordered)
    return ordered


def plan_split(
    files: Mapping[str, Sequence[str]],
    *,
    val_ratio: float,
    test_ratio: float = 0.0,
    seed: int = 0,
    hashes: Optional[Mapping[str, str]] = None,
) -> SplitPlan:
    """Stratified split of {class: file paths}: one Assignment per file.

    Each class is sorted naturally, shuffled with its own seeded RNG and cut per `split_counts`
    (val first, then test, the rest train). With `hashes` ({path: sha1 or group key}), files that
    share a key and landed in different splits are pulled into one split (see `_keep_duplicates_together`).
    """
    check_ratios(val_ratio, test_ratio)
    _check_unique(files)
    split_of: dict[str, str] = {}
    class_of: dict[str, str] = {}
    order: dict[str, list[str]] = {}
    planned: dict[str, tuple[int, int]] = {}  # class -> (val, test) sizes
    for class_name, paths in files.items():
        order[class_name] = _shuffled(paths, class_name, seed)
        _, n_val, n_test = split_counts(len(paths), val_ratio, test_ratio)
        planned[class_name] = (n_val, n_test)
        for i, path in enumerate(order[class_name]):
            split_of[path] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
            class_of[path] = class_name
    groups = _keep_duplicates_together(split_of, class_of, order, hashes or {})
    _refill_eval_splits(split_of, class_of, order, groups, planned)
    assignments = [
        Assignment(path, class_of[path], split_of[path])
        for path in sorted(split_of, key=lambda p: (_natural_key(class_of[p]), class_of[p], _path_key(p)))
    ]
    return SplitPlan(assignments, val_ratio, test_ratio, seed, groups)


def _group_split(splits: Sequence[str]) -> str:
    """Where a duplicate group goes: train if any member is there (train has the most files to
    swap with, and keeps val/test free of repeats), else the eval split holding more of them."""
    if "train" in splits:
        return "train"
    counts = Counter(splits)
    return max(("val", "test"), key=lambda s: counts[s])  # tie: val


def _keep_duplicates_together(
    split_of: dict[str, str],
    class_of: dict[str, str],
    order: dict[str, list[str]],
    hashes: Mapping[str, str],
) -> list[DuplicateGroup]:
    """Put every group of files that share a key in one split (edits `split_of` in place).

    A file moved from split A to split B swaps with a non-duplicate file of its class in B, so
    the per-class counts stay as planned (if no such file exists, the counts shift by one).
    """
    by_hash: dict[str, list[str]] = defaultdict(list)
    for path in split_of:
        if path in hashes:
            by_hash[hashes[path]].append(path)
    members = [sorted(paths, key=_path_key) for paths in by_hash.values() if len(paths) > 1]
    locked = {path for paths in members for path in paths}  # duplicates never serve as swap partners
    groups = []
    for paths in sorted(members, key=lambda ps: _path_key(ps[0])):
        target = _group_split([split_of[p] for p in paths])
        classes = natsorted({class_of[p] for p in paths})
        group = DuplicateGroup(hashes[paths[0]], paths, classes, target)
        for path in paths:
            if split_of[path] != target:
                group.moved.append((path, split_of[path]))
                _move_with_swap(path, target, split_of, order[class_of[path]], locked)
        groups.append(group)
    return groups


def _refill_eval_splits(split_of: dict[str, str], class_of: dict[str, str], order: dict[str, list[str]],
                        groups: list[DuplicateGroup], planned: dict[str, tuple[int, int]]) -> None:
    """Give val and test back what duplicate groups took from them (edits `split_of` and `groups`).

    A group that went to train displaces no file when its class has no ordinary file left to swap
    with: a class made mostly of copies (frames of a few videos, one picture saved many times)
    would end with val or test short, or empty. Whole groups of that class then move from train to
    the short split, in the class's shuffled order: each one that brings the split closer to its
    planned size, as long as train keeps a file. Groups spanning classes stay in train.
    """
    counts = {name: Counter() for name in order}
    for path, split in split_of.items():
        counts[class_of[path]][split] += 1
    position = {path: i for paths in order.values() for i, path in enumerate(paths)}
    in_train: dict[str, list[DuplicateGroup]] = defaultdict(list)
    for group in sorted(groups, key=lambda g: min(position[p] for p in g.paths)):
        if group.split == "train" and len(group.classes) == 1:
            in_train[group.classes[0]].append(group)
    for name, targets in planned.items():
        count = counts[name]
        for split, target in zip(("val", "test"), targets):
            for group in list(in_train[name]):
                size = len(group.paths)
                if count[split] >= target:
                    break
                if size >= 2 * (target - count[split]) or size >= count["train"]:
                    continue  # it would overshoot by more than it fills, or empty train
                was = dict(group.moved)
                group.split, group.moved = split, [(p, was.get(p, "train")) for p in group.paths
                                                   if was.get(p, "train") != split]
                for path in group.paths:
                    split_of[path] = split
                count[split] += size
                count["train"] -= size
                in_train[name].remove(group)


def _move_with_swap(path: str, target: str, split_of: dict[str, str], class_order: list[str], locked: set) -> None:
    partner = next((p for p in class_order if split_of[p] == target and p not in locked), None)
    if partner is not None:
        split_of[partner] = split_of[path]
    split_of[path] = target
