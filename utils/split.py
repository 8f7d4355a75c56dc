"""Plan and apply a train/val/test split of a class-folder dataset (split_dataset.py, train.py).

`plan_split` is pure: {class: files} in, one Assignment per file out. The result depends only on
the file paths, the ratios and the seed (never on input order or the global RNG), so the same
files always give the same split. The rest of this module scans the source tree, hashes files,
guards the destination and places the files (copy, hardlink, symlink or move).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import math
import os
import random
import shutil
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from natsort import natsort_keygen, natsorted

from utils.errors import UsageError
from utils.files import VAL_SPLIT_NAMES, is_image_file, list_class_dirs

SPLITS = ("train", "val", "test")
MODES = ("copy", "hardlink", "symlink", "move")
MIN_CLASS_SIZE = 3  # below this a class goes to train whole: 1 of 2 images is no validation
CSV_NAME = "split.csv"
CSV_COLUMNS = ("file", "source", "class", "split", "sha1")
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
    """Byte-identical files (same sha1). All of them end in `split`."""

    sha1: str
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
    (val first, then test, the rest train). With `hashes` ({path: sha1}), byte-identical files
    that landed in different splits are pulled into one split (see `_keep_duplicates_together`).
    """
    check_ratios(val_ratio, test_ratio)
    _check_unique(files)
    split_of: dict[str, str] = {}
    class_of: dict[str, str] = {}
    order: dict[str, list[str]] = {}
    for class_name, paths in files.items():
        order[class_name] = _shuffled(paths, class_name, seed)
        _, n_val, n_test = split_counts(len(paths), val_ratio, test_ratio)
        for i, path in enumerate(order[class_name]):
            split_of[path] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
            class_of[path] = class_name
    groups = _keep_duplicates_together(split_of, class_of, order, hashes or {})
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
    """Put every group of byte-identical files in one split (edits `split_of` in place).

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


def _move_with_swap(path: str, target: str, split_of: dict[str, str], class_order: list[str], locked: set) -> None:
    partner = next((p for p in class_order if split_of[p] == target and p not in locked), None)
    if partner is not None:
        split_of[partner] = split_of[path]
    split_of[path] = target


# ----------------------------------------------------------------------------- source tree


@dataclass
class SourceScan:
    """Images per class under --src, and what was left out (with the reason)."""

    root: str
    files: dict[str, list[str]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    empty_classes: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(len(paths) for paths in self.files.values())


def _skip_reason(name: str) -> str:
    return "hidden file" if name.startswith(".") else "not an image (extension)"


def scan_source(src: str | os.PathLike) -> SourceScan:
    """Find SRC/<class>/**/<image>; same image rule as training (utils.data.is_image_file)."""
    root = str(src)
    if not os.path.isdir(root):
        raise UsageError(f"--src {root} does not exist or is not a folder")
    class_names = list_class_dirs(root)
    if not class_names:
        raise UsageError(f"--src {root} has no class folders (expected SRC/<class>/<images>)")
    if "train" in class_names and any(v in class_names for v in VAL_SPLIT_NAMES):
        raise UsageError(
            f"--src {root} is already split (it has train/ and val/); pass the unsplit folder "
            "with one sub-folder per class"
        )
    scan = SourceScan(root, {})
    for entry in natsorted(list(os.scandir(root)), key=lambda e: e.name):
        if entry.name not in class_names:
            reason = "hidden folder" if entry.is_dir() else "not inside a class folder"
            scan.skipped.append((entry.path, reason))
    for name in class_names:
        images = _scan_class(os.path.join(root, name), scan.skipped)
        if images:
            scan.files[name] = images
        else:
            scan.empty_classes.append(name)
    if not scan.files:
        raise UsageError(f"--src {root} has class folders but no images ({', '.join(scan.empty_classes)})")
    return scan


def _scan_class(folder: str, skipped: list[tuple[str, str]]) -> list[str]:
    images = []
    for dirpath, dirnames, filenames in os.walk(folder):
        skipped.extend((os.path.join(dirpath, d), "hidden folder") for d in dirnames if d.startswith("."))
        dirnames[:] = natsorted(d for d in dirnames if not d.startswith("."))
        for name in natsorted(filenames):
            path = os.path.join(dirpath, name)
            if is_image_file(name):
                images.append(path)
            else:
                skipped.append((path, _skip_reason(name)))
    return natsorted(images)


def file_sha1(path: str | os.PathLike) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_files(paths: Sequence[str], threads: int = 4) -> dict[str, str]:
    """{path: sha1}. Threads overlap the disk reads (hashlib releases the GIL on large blocks)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip(paths, pool.map(file_sha1, paths)))


# ----------------------------------------------------------------------------- destination


def target_path(item: Assignment, src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """DST/<split>/<class>/<path inside SRC/<class>>: sub-folders are kept, so names never clash."""
    inner = os.path.relpath(item.path, os.path.join(src, item.class_name))
    return Path(dst, item.split, item.class_name, inner)


def _is_inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_locations(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Refuse a --dst that would be scanned as part of --src, or a --dst that is a file."""
    if _is_inside(Path(dst), Path(src)):
        raise UsageError(f"--dst {dst} is inside --src {src}; it would be read as a class folder. Pick a folder outside")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UsageError(f"--dst {dst} exists and is not a folder")


def _holds_files(dst: Path) -> bool:
    return dst.is_dir() and any(dst.iterdir())


def check_destination(dst: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a --dst that already holds files unless --overwrite (checked before any hashing)."""
    if _holds_files(Path(dst)) and not overwrite:
        raise UsageError(
            f"--dst {dst} already holds files; pass --overwrite to replace its train/ val/ test/ "
            f"folders and {CSV_NAME} (nothing else in it is touched), or choose an empty folder"
        )


def planned_removals(plan: SplitPlan, src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """What --overwrite deletes in --dst: only the split folders and split.csv that this plan rewrites.

    Raises UsageError if deleting would lose the only copy of a file, reach into --src, or leave
    a stale split folder behind.
    """
    dst = Path(dst)
    if not _holds_files(dst):
        return []
    removals = [dst / s for s in plan.splits if (dst / s).exists()]
    removals += [dst / CSV_NAME] if (dst / CSV_NAME).exists() else []
    stale = [s for s in SPLITS if s not in plan.splits and (dst / s).exists()]
    if stale:
        raise UsageError(
            f"{', '.join(str(dst / s) for s in stale)} would be left from an earlier split (this split "
            f"writes only {' '.join(s + '/' for s in plan.splits)}) and train.py would still read it; "
            "remove it yourself or pick another --dst"
        )
    for folder in removals:
        if _is_inside(Path(src), folder):
            raise UsageError(f"--src {src} is inside {folder}, which --overwrite would delete")
    _refuse_to_delete_only_copies(dst)
    return removals


def _refuse_to_delete_only_copies(dst: Path) -> None:
    """A previous --mode move (or a deleted source) leaves DST holding the only copy: keep it."""
    rows = read_split_csv(dst / CSV_NAME) if (dst / CSV_NAME).is_file() else []
    # is_file() follows links, so a symlink to a gone source (nothing to lose) does not count
    only = [
        r["file"] for r in rows if r.get("file") and r.get("source")
        and not os.path.lexists(r["source"]) and (dst / r["file"]).is_file()
    ]
    if only:
        raise UsageError(
            f"{len(only)} file(s) in {dst} (e.g. {only[0]}) no longer exist at their source listed in "
            f"{dst / CSV_NAME} (an earlier --mode move?); --overwrite would delete the only copy. "
            "Move them back or pick another --dst"
        )


def remove_paths(paths: Sequence[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # does not follow symlinks: a symlink split never touches SRC
        else:
            path.unlink()


def write_split_csv(
    plan: SplitPlan, src: str | os.PathLike, dst: str | os.PathLike, hashes: Mapping[str, str]
) -> Path:
    """DST/split.csv: file (relative to DST), source (absolute), class, split, sha1."""
    path = Path(dst, CSV_NAME)
    partial = path.with_name(CSV_NAME + ".partial")
    with open(partial, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for item in plan.assignments:
            rel = target_path(item, src, dst).relative_to(dst).as_posix()
            writer.writerow([rel, os.path.abspath(item.path), item.class_name, item.split, hashes.get(item.path, "")])
    os.replace(partial, path)  # never a half-written split.csv
    return path


def read_split_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- placing files


def _device_of(path: Path) -> int:
    while not path.exists():  # --dst may not exist yet: its nearest existing parent decides
        path = path.parent
    return path.stat().st_dev


def check_mode(mode: str, src: str | os.PathLike, dst: str | os.PathLike) -> None:
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "hardlink" and _device_of(Path(src).resolve()) != _device_of(Path(dst).resolve()):
        raise UsageError(
            f"--mode hardlink: --src {src} and --dst {dst} are on different filesystems; "
            "use --mode copy or --mode symlink"
        )


def move_file(source: str | os.PathLike, target: Path) -> None:
    """Move so that at every moment the file is whole in at least one place.

    Same filesystem: os.rename, which is atomic. Otherwise copy to TARGET.partial, check the
    size, rename it into place, and only then delete the source.
    """
    try:
        os.rename(source, target)
        return
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    partial = target.with_name(target.name + ".partial")  # not an image name: no scanner picks it up
    shutil.copy2(source, partial)
    if os.path.getsize(partial) != os.path.getsize(source):
        partial.unlink()
        raise OSError(f"copy of {source} to {target} is incomplete (size differs); the source is kept")
    os.replace(partial, target)
    os.remove(source)


def place_file(source: str, target: Path, mode: str) -> None:
    """Put one file at `target` (which must not exist) by copy, hardlink, symlink or move."""
    if os.path.lexists(target):
        raise UsageError(f"{target} already exists; it is never overwritten")
    try:
        if mode == "copy":
            shutil.copy2(source, target)
        elif mode == "hardlink":
            os.link(source, target)
        elif mode == "symlink":
            os.symlink(os.path.abspath(source), target)  # absolute: the link works from anywhere
        else:
            move_file(source, target)
    except OSError as error:
        if mode in ("hardlink", "symlink") and error.errno in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP):
            raise UsageError(f"--mode {mode} is not possible here ({error.strerror}); use --mode copy") from None
        raise


def apply_split(plan: SplitPlan, src: str | os.PathLike, dst: str | os.PathLike, mode: str = "copy") -> int:
    """Place every planned file under DST/<split>/<class>/. Returns the number placed.

    On failure (disk full, ...) raises UsageError saying how far it got; files already placed
    stay, and with --mode move every file is whole in SRC or in DST.
    """
    check_mode(mode, src, dst)
    done = 0
    for item in plan.assignments:
        target = target_path(item, src, dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            place_file(item.path, target, mode)
        except OSError as error:
            advice = (
                f"move them back to their sources ({CSV_NAME} lists them) before a new run"
                if mode == "move"
                else "fix the cause and rerun with --overwrite"
            )
            raise UsageError(
                f"{mode} of {item.path} failed: {error}. {done} of {len(plan.assignments)} file(s) "
                f"were placed in {dst} and no file was lost; {advice}"
            ) from None
        done += 1
    return done
