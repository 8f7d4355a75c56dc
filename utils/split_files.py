"""The file-system half of split_dataset.py: scan the source, hash, guard and fill the destination.

The plan itself comes from utils/split.py. Nothing is lost: the plan is journaled
(DST/split.journal.json, written atomically before the first file is placed) so a run cut short
can be finished by running it again or undone with --undo; --overwrite deletes only files an
earlier split wrote that still match their source.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from natsort import natsorted

from utils.errors import UsageError
from utils.files import VAL_SPLIT_NAMES, file_digest, is_image_file, list_class_dirs, stoppable_thread_pool
from utils.split import SPLITS, Assignment, SplitPlan

MODES = ("copy", "hardlink", "symlink", "move")
CSV_NAME = "split.csv"
CSV_COLUMNS = ("file", "source", "class", "split", "sha1", "size")  # size (bytes) added later: may be absent
JOURNAL_NAME = "split.journal.json"  # present only while a split is unfinished
JOURNAL_FORMAT = "split_dataset journal 1"
PARTIAL = ".partial"  # suffix of a copy in progress: TARGET.partial is renamed to TARGET once whole
MAX_PROBLEMS_LISTED = 10  # refusals list this many files, then the count of the rest
KILL_HOOK_ENV = "SPLIT_DATASET_KILL_AT"  # test hook, see _crash_hook
_hook_counts: Counter = Counter()


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
    """Find SRC/<class>/**/<image>; same image rule as training (utils.files.is_image_file).

    A folder that cannot be read (permission denied, ...) is a UsageError naming it: skipping
    it would quietly leave its images out of the split.
    """
    root = str(src)
    if not os.path.isdir(root):
        raise UsageError(f"--src {root} does not exist or is not a folder")
    try:
        class_names = list_class_dirs(root)
        entries = natsorted(list(os.scandir(root)), key=lambda e: e.name)
    except OSError as error:
        raise _unreadable_folder(root, error) from None
    if not class_names:
        raise UsageError(f"--src {root} has no class folders (expected SRC/<class>/<images>)")
    if "train" in class_names and any(v in class_names for v in VAL_SPLIT_NAMES):
        raise UsageError(
            f"--src {root} is already split (it has train/ and val/); pass the unsplit folder "
            "with one sub-folder per class"
        )
    scan = SourceScan(root, {})
    for entry in entries:
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


def _unreadable_folder(folder: str, error: OSError) -> UsageError:
    return UsageError(
        f"cannot read folder {error.filename or folder} ({error.strerror or error}); "
        "fix its permissions or move it out of --src, then run again"
    )


def _scan_class(folder: str, skipped: list[tuple[str, str]]) -> list[str]:
    def refuse(error: OSError) -> None:  # os.walk would otherwise skip the folder without a word
        raise _unreadable_folder(folder, error)

    images = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=refuse):
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
    return file_digest(path, "sha1")


def hash_files(paths: Sequence[str], threads: int = 4) -> dict[str, str]:
    """{path: sha1}. Threads overlap the disk reads (hashlib releases the GIL on large blocks).

    A file that cannot be read is a UsageError naming it and the OS error.
    """
    with stoppable_thread_pool(threads) as pool:
        return dict(zip(paths, pool.map(_readable_sha1, paths)))


def _readable_sha1(path: str) -> str:
    try:
        return file_sha1(path)
    except OSError as error:
        raise UsageError(f"cannot read {path} ({error.strerror or error}); fix its permissions or move it out of --src") from None


# ----------------------------------------------------------------------------- destination and its records


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
    # a run killed while writing its records leaves only their .partial: nothing of the user's
    ours = {CSV_NAME + PARTIAL, JOURNAL_NAME + PARTIAL}
    return dst.is_dir() and any(entry.name not in ours for entry in dst.iterdir())


@dataclass(frozen=True)
class PlannedFile:
    """One row of split.csv and of the journal: where one source file goes, and what it holds."""

    file: str  # relative to DST, "/"-separated
    source: str  # absolute path of the original
    class_name: str
    split: str
    sha1: str  # "" when not hashed
    size: Optional[int]  # None in a split.csv written before sizes were recorded

    def target(self, dst: str | os.PathLike) -> Path:
        return Path(dst, self.file)

    def as_row(self) -> list:
        return [self.file, self.source, self.class_name, self.split, self.sha1, "" if self.size is None else self.size]


def planned_files(
    plan: SplitPlan, src: str | os.PathLike, dst: str | os.PathLike, hashes: Mapping[str, str]
) -> list[PlannedFile]:
    """The plan as the rows split.csv and the journal record (sizes read from the sources now)."""
    rows = []
    for item in plan.assignments:
        rel = target_path(item, src, dst).relative_to(dst).as_posix()
        size = os.path.getsize(item.path)
        rows.append(PlannedFile(rel, os.path.abspath(item.path), item.class_name, item.split, hashes.get(item.path, ""), size))
    return rows


def _write_atomically(path: Path, write) -> None:
    """Write through PATH.partial, flushed to disk, then rename: PATH is whole or absent, never half-written."""
    partial = path.with_name(path.name + PARTIAL)
    with open(partial, "w", newline="", encoding="utf-8") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def write_split_csv(rows: Sequence[PlannedFile], dst: str | os.PathLike) -> Path:
    """DST/split.csv: file (relative to DST), source (absolute), class, split, sha1, size (bytes)."""
    path = Path(dst, CSV_NAME)

    def write(f) -> None:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(row.as_row() for row in rows)

    _write_atomically(path, write)
    return path


def read_split_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_planned_files(path: str | os.PathLike) -> list[PlannedFile]:
    """split.csv as PlannedFile rows; one written before the size column existed reads with size None."""
    try:
        records = read_split_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UsageError(f"cannot read {path} ({error}); move it away if it is not a split's record") from None
    if records and not {"file", "source"} <= set(records[0]):
        raise UsageError(f"{path} has no file and source columns: not written by split_dataset.py; move it away")
    return [
        PlannedFile(r["file"], r["source"], r.get("class") or "", r.get("split") or "", r.get("sha1") or "",
                    int(r["size"]) if (r.get("size") or "").isdigit() else None)
        for r in records if r.get("file") and r.get("source")
    ]


@dataclass
class Journal:
    """DST/split.journal.json: the settings and the full plan of a split that has not finished yet.

    Written atomically before the first file is placed and removed after the last, so a re-run
    with the same settings can finish a split cut short (kill -9, power loss, disk full), and
    --undo knows every file it may have to move back.
    """

    path: Path
    settings: dict  # src (absolute), mode, seed, val_ratio, test_ratio
    rows: list[PlannedFile]

    def describe(self) -> str:
        s = self.settings
        return f"--src {s['src']} --mode {s['mode']} --seed {s['seed']} --val_ratio {s['val_ratio']} --test_ratio {s['test_ratio']}"


def split_settings(src: str | os.PathLike, mode: str, seed: int, val_ratio: float, test_ratio: float) -> dict:
    """What makes two runs "the same command" for finishing a journaled split."""
    return {"src": os.path.abspath(src), "mode": mode, "seed": seed, "val_ratio": val_ratio, "test_ratio": test_ratio}


def write_journal(dst: str | os.PathLike, settings: dict, rows: Sequence[PlannedFile]) -> Path:
    path = Path(dst, JOURNAL_NAME)
    record = {"format": JOURNAL_FORMAT, **settings, "columns": list(CSV_COLUMNS), "rows": [r.as_row() for r in rows]}
    _write_atomically(path, lambda f: json.dump(record, f))
    return path


def read_journal(dst: str | os.PathLike) -> Optional[Journal]:
    """The unfinished split's journal in DST, or None when there is none."""
    path = Path(dst, JOURNAL_NAME)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != JOURNAL_FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        settings = {key: record[key] for key in ("src", "mode", "seed", "val_ratio", "test_ratio")}
        rows = [PlannedFile(*row[:5], None if row[5] == "" else int(row[5])) for row in record["rows"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise UsageError(
            f"{path} is not a journal this version can read ({error}); if no split into {dst} is in "
            "progress, move it away"
        ) from None
    return Journal(path, settings, rows)


def remove_journal(dst: str | os.PathLike) -> None:
    """The split is complete: the journal goes (split.csv stays as the record of what went where)."""
    Path(dst, JOURNAL_NAME).unlink(missing_ok=True)


def one_line_list(problems: Sequence[str]) -> str:
    """Up to MAX_PROBLEMS_LISTED items and the count of the rest, on one line."""
    shown = "; ".join(problems[:MAX_PROBLEMS_LISTED])
    more = len(problems) - MAX_PROBLEMS_LISTED
    return shown + (f"; ... and {more} more" if more > 0 else "")


def _same_content(path: Path, other: Path) -> bool:
    """Same file, or same size and same SHA-1: deleting one of the two loses nothing."""
    if os.path.samefile(path, other):  # a hardlink split, or --src and --dst through a link
        return True
    return path.stat().st_size == other.stat().st_size and file_sha1(path) == file_sha1(other)


def _matches_row(path: Path, row: PlannedFile) -> bool:
    """`path` holds what the journal says its source held (size and SHA-1)."""
    if row.size is not None and path.stat().st_size != row.size:
        return False
    return bool(row.sha1) and file_sha1(path) == row.sha1


def _map(function, items: Sequence, threads: int = 4) -> list:
    # the checks below are disk-bound (stat, SHA-1): threads overlap them on large datasets
    with stoppable_thread_pool(threads) as pool:
        return list(pool.map(function, items))


# ----------------------------------------------------------------------------- --overwrite


def check_destination(dst: str | os.PathLike, overwrite: bool, journal: Optional[Journal] = None) -> None:
    """Refuse a --dst that already holds files unless --overwrite (checked before any hashing)."""
    if journal is not None and not overwrite:
        raise UsageError(
            f"--dst {dst} holds an unfinished split ({journal.path}: {journal.describe()}); run that same "
            f"command again to finish it, or `python split_dataset.py --dst {dst} --undo` to put its files back"
        )
    if _holds_files(Path(dst)) and not overwrite:
        raise UsageError(
            f"--dst {dst} already holds files; pass --overwrite to replace an earlier split there (it removes "
            f"only files listed in its {CSV_NAME} that are still identical in size and content to their source, "
            "and refuses if train/ val/ test/ hold anything else), or choose an empty folder"
        )


def overwrite_removals(src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """The files --overwrite may delete: every file in DST/train, val, test, each one written by an
    earlier split (listed in its split.csv or journal) and still identical to its source.

    Anything else there (a file put by hand, one changed since, the only copy of a moved file)
    raises UsageError listing them, before anything is touched.
    """
    dst = Path(dst)
    entries = _split_entries(dst)
    if not entries:
        return []
    for split in SPLITS:
        if (dst / split).exists() and _is_inside(Path(src), dst / split):
            raise UsageError(f"--src {src} is inside {dst / split}, which --overwrite would empty")
    rows = _recorded_rows(dst)
    if rows is None:
        reasons = [f"not listed, {dst} has no {CSV_NAME}"] * len(entries)
    else:
        reasons = _map(lambda path: _not_ours_because(path, rows, dst), entries)
    problems = [(path.relative_to(dst).as_posix(), why) for path, why in zip(entries, reasons) if why]
    if problems:
        raise UsageError(
            f"--overwrite deletes only files an earlier split wrote (listed in {dst / CSV_NAME} and still "
            f"identical in size and content to their source); nothing was touched, because {len(problems)} "
            f"file(s) in {dst} are not. {_grouped_by_reason(problems)}. Move such files out of --dst, or pick "
            "another --dst"
        )
    return entries


def _grouped_by_reason(problems: Sequence[tuple[str, str]]) -> str:
    """"reason: file, file; other reason: file ... and N more", at most MAX_PROBLEMS_LISTED files in all."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name, reason in problems[:MAX_PROBLEMS_LISTED]:
        groups[reason].append(name)
    more = len(problems) - MAX_PROBLEMS_LISTED
    text = "; ".join(f"{reason[0].upper()}{reason[1:]}: {', '.join(names)}" for reason, names in groups.items())
    return text + (f"; ... and {more} more" if more > 0 else "")


def _split_entries(dst: Path) -> list[Path]:
    """Everything in DST/train, val, test that is not a folder (files, links, links to folders)."""
    entries: list[Path] = []

    def refuse(error: OSError) -> None:
        raise UsageError(f"cannot read folder {error.filename} ({error.strerror}); --overwrite must check every file in it")

    for split in SPLITS:
        top = dst / split
        if top.is_symlink() or (top.exists() and not top.is_dir()):
            entries.append(top)
            continue
        for dirpath, dirnames, filenames in os.walk(top, onerror=refuse) if top.is_dir() else ():
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]  # never descended
            entries += [Path(dirpath, name) for name in natsorted(filenames + links)]
    return natsorted(entries, key=str)


def _recorded_rows(dst: Path) -> Optional[dict[str, PlannedFile]]:
    """{DST-relative path: row} from split.csv and the journal (None when DST has neither)."""
    rows = None
    if (dst / CSV_NAME).is_file():
        rows = {row.file: row for row in read_planned_files(dst / CSV_NAME)}
    journal = read_journal(dst)
    if journal is not None:
        rows = {**(rows or {}), **{row.file: row for row in journal.rows}}
    return rows


def _not_ours_because(path: Path, rows: Mapping[str, PlannedFile], dst: Path) -> str:
    """Why --overwrite must keep `path`; "" when an earlier split wrote it and its source still holds it."""
    rel = path.relative_to(dst).as_posix()
    if rel.endswith(PARTIAL) and rel[: -len(PARTIAL)] in rows:  # an interrupted copy of ours
        return "" if os.path.isfile(rows[rel[: -len(PARTIAL)]].source) else "a partial copy whose source is gone"
    row = rows.get(rel)
    if row is None:
        return f"not in {CSV_NAME}"
    if path.is_symlink():
        return "" if os.readlink(path) == row.source else f"a link {CSV_NAME} did not make"
    if not os.path.lexists(row.source):
        return "the only copy, its source is gone (an earlier --mode move? --undo moves such files back)"
    try:
        same = path.is_file() and _same_content(path, Path(row.source))
    except OSError as error:
        return f"cannot compare it with its source: {error.strerror or error}"
    return "" if same else "differs from its source"


def remove_files(paths: Sequence[Path], dst: str | os.PathLike) -> None:
    """Delete the files `overwrite_removals` cleared, then the folders that leaves empty (never whole trees)."""
    for done, path in enumerate(paths):
        try:
            path.unlink()
        except OSError as error:
            raise UsageError(
                f"could not delete {path} ({error.strerror}); {done} of {len(paths)} file(s) of the earlier "
                "split were deleted (each is still at its source), nothing else was touched"
            ) from None
    _remove_empty_folders(paths, Path(dst))


def _remove_empty_folders(paths: Sequence[Path], root: Path) -> None:
    """Remove the folders of `paths` that are now empty, and their empty parents, up to `root` (kept)."""
    for folder in sorted({p.parent for p in paths}, key=lambda f: len(f.parts), reverse=True):
        while folder != root and root in folder.parents:
            try:
                folder.rmdir()  # fails on a folder that still holds anything: that is the check
            except OSError:
                break
            folder = folder.parent


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


def _partial_of(target: Path) -> Path:
    return target.with_name(target.name + PARTIAL)  # not an image name: no scanner picks it up


def _crash_hook(event: str) -> None:
    """Test hook: with SPLIT_DATASET_KILL_AT=EVENT:N the process kills itself (SIGKILL, as kill -9
    does) at its Nth EVENT ("placed": a file is in place; "partial": a copy is in TARGET.partial),
    so tests can cut a split short at a known point and check that a re-run finishes it."""
    wanted = os.environ.get(KILL_HOOK_ENV, "")
    if wanted.partition(":")[0] != event:
        return
    _hook_counts[event] += 1
    if _hook_counts[event] == int(wanted.partition(":")[2]):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def copy_file(source: str | os.PathLike, target: Path) -> None:
    """Copy to TARGET.partial, check the size, rename into place: TARGET is whole or absent."""
    partial = _partial_of(target)
    shutil.copy2(source, partial)
    _crash_hook("partial")
    if os.path.getsize(partial) != os.path.getsize(source):
        partial.unlink()
        raise OSError(f"copy of {source} to {target} is incomplete (size differs); the source is kept")
    os.replace(partial, target)


def move_file(source: str | os.PathLike, target: Path) -> None:
    """Move so that at every moment the file is whole in at least one place.

    Same filesystem: os.rename, which is atomic. Otherwise `copy_file`, and only then delete
    the source.
    """
    try:
        os.rename(source, target)
        return
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    copy_file(source, target)
    os.remove(source)


def place_file(source: str, target: Path, mode: str) -> None:
    """Put one file at `target` (which must not exist) by copy, hardlink, symlink or move."""
    if os.path.lexists(target):
        raise UsageError(f"{target} already exists; it is never overwritten")
    try:
        if mode == "copy":
            copy_file(source, target)
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


def place_files(rows: Sequence[PlannedFile], dst: str | os.PathLike, mode: str, total: Optional[int] = None) -> int:
    """Place each row's source at DST/<row.file>. Returns the number placed.

    On failure (disk full, ...) raises UsageError saying how far it got; files already placed
    stay, and with --mode move every file is whole in SRC or in DST.
    """
    total = len(rows) if total is None else total
    for done, row in enumerate(rows):
        target = row.target(dst)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            place_file(row.source, target, mode)
        except OSError as error:
            raise UsageError(
                f"{mode} of {row.source} failed: {error}. {total - len(rows) + done} of {total} file(s) are in "
                f"{dst} and no file was lost; fix the cause and run the same command again to finish, or "
                f"`python split_dataset.py --dst {dst} --undo` to put them back"
            ) from None
        _crash_hook("placed")
    return len(rows)


def apply_split(plan: SplitPlan, src: str | os.PathLike, dst: str | os.PathLike, mode: str = "copy") -> int:
    """Place every planned file under DST/<split>/<class>/ (no records written). Returns the number placed."""
    check_mode(mode, src, dst)
    return place_files(planned_files(plan, src, dst, {}), dst, mode)


@dataclass
class Progress:
    """Where a journaled plan stands: what is left to do, and what stops it (`problems`)."""

    to_place: list[PlannedFile] = field(default_factory=list)
    placed: int = 0  # already in place
    partials: list[Path] = field(default_factory=list)  # our leftover TARGET.partial copies (source intact)
    sources_to_remove: list[str] = field(default_factory=list)  # moves cut short after their copy completed
    problems: list[str] = field(default_factory=list)


def _progress_of(row: PlannedFile, dst: Path, mode: str) -> tuple[str, str]:
    """(state, problem) of one journaled file: state is place, done, done_drop_source or problem."""
    target, source = row.target(dst), row.source
    has_source = os.path.lexists(source)
    if os.path.lexists(_partial_of(target)) and not has_source:
        return "problem", f"{_partial_of(target)} is a partial copy and its source {source} is gone"
    if not os.path.lexists(target):
        return ("place", "") if has_source else ("problem", f"{row.file} is neither in {dst} nor at its source {source}")
    try:
        if mode == "symlink":
            in_place = target.is_symlink() and os.readlink(target) == source
        else:
            in_place = not target.is_symlink() and target.is_file() and _matches_row(target, row)
        if not in_place:
            return "problem", f"{target} exists and is not the file planned there"
        if mode == "move" and has_source:  # a move across filesystems stopped between copy and delete
            if _matches_row(Path(source), row):
                return "done_drop_source", ""
            return "problem", f"{source} is still there and differs from its copy {target}"
    except OSError as error:
        return "problem", f"cannot check {target}: {error.strerror or error}"
    return "done", ""


def plan_progress(rows: Sequence[PlannedFile], dst: str | os.PathLike, mode: str) -> Progress:
    """Compare the journal with the disk (nothing is changed): files in place are recognised by size and SHA-1."""
    dst = Path(dst)
    progress = Progress()
    for row, (state, problem) in zip(rows, _map(lambda r: _progress_of(r, dst, mode), rows)):
        if state == "problem":
            progress.problems.append(problem)
            continue
        if os.path.lexists(_partial_of(row.target(dst))):
            progress.partials.append(_partial_of(row.target(dst)))
        if state == "place":
            progress.to_place.append(row)
        else:
            progress.placed += 1
            if state == "done_drop_source":
                progress.sources_to_remove.append(row.source)
    return progress


def finish_split(rows: Sequence[PlannedFile], dst: str | os.PathLike, mode: str) -> Progress:
    """Bring DST to the journaled plan: clean our .partial leftovers, complete moves cut short, place the rest.

    Refuses (UsageError listing the problems) before changing anything if a file is where it
    should not be or is missing everywhere. Returns the progress found before it started.
    """
    progress = plan_progress(rows, dst, mode)
    if progress.problems:
        raise UsageError(
            f"cannot finish the split into {dst}, nothing was changed: {one_line_list(progress.problems)}. "
            f"Fix these by hand, or run `python split_dataset.py --dst {dst} --undo` to put the files back"
        )
    # ours: each .partial is named after a journaled target whose source is whole, and each source
    # here has a copy in DST that was just checked byte for byte
    _delete_all([*progress.partials, *map(Path, progress.sources_to_remove)], "finish the split")
    place_files(progress.to_place, dst, mode, total=len(rows))
    return progress


def _delete_all(paths: Sequence[Path], task: str) -> None:
    for path in paths:
        try:
            path.unlink()
        except OSError as error:
            raise UsageError(f"could not delete {path} ({error.strerror or error}) to {task}; fix that and run again") from None


# ----------------------------------------------------------------------------- --undo


@dataclass
class UndoPlan:
    """What --undo does with each file that split.csv (or the journal) lists."""

    move_back: list[PlannedFile] = field(default_factory=list)  # only copy is in DST: moved to its source
    remove: list[Path] = field(default_factory=list)  # copies, links and .partial files whose source is intact
    at_source: int = 0  # already back (or never moved)
    missing: list[str] = field(default_factory=list)  # neither in DST nor at the source
    problems: list[str] = field(default_factory=list)  # a source path taken by a different file, ...


def _undo_state(row: PlannedFile, dst: Path) -> tuple[str, str]:
    """(action, problem) for one listed file: move_back, remove, at_source, missing or problem."""
    target, source = row.target(dst), Path(row.source)
    if not os.path.lexists(target):
        if not os.path.lexists(source):
            return "missing", row.file
        return "at_source", ""
    if target.is_symlink():
        return ("remove", "") if os.readlink(target) == row.source else ("problem", f"{target} is a link {CSV_NAME} did not make")
    if not target.is_file():
        return "problem", f"{target} is not a file"
    if not os.path.lexists(source):
        return "move_back", ""
    try:
        if source.is_file() and _same_content(target, source):
            return "remove", ""
        if source.is_file() and _matches_row(source, row):  # the original is back; TARGET is not ours: left alone
            return "at_source", ""
    except OSError as error:
        return "problem", f"cannot compare {target} with {source}: {error.strerror or error}"
    return "problem", f"{source} is taken by a different file"


def plan_undo(dst: str | os.PathLike) -> UndoPlan:
    """Check every listed file (nothing is changed). UsageError when DST holds no split record."""
    dst = Path(dst)
    rows = _recorded_rows(dst) if dst.is_dir() else None
    if rows is None:
        raise UsageError(f"--undo: {dst} holds no {CSV_NAME} or {JOURNAL_NAME}, so there is no split to undo")
    undo = UndoPlan()
    listed = list(rows.values())
    for row, (action, detail) in zip(listed, _map(lambda r: _undo_state(r, dst), listed)):
        partial = _partial_of(row.target(dst))
        if os.path.lexists(partial):
            if os.path.isfile(row.source) or action == "move_back":
                undo.remove.append(partial)  # an interrupted copy of ours; the whole file exists elsewhere
            else:
                undo.problems.append(f"{partial} is a partial copy and its source {row.source} is gone")
        if action == "move_back":
            undo.move_back.append(row)
        elif action == "remove":
            undo.remove.append(row.target(dst))
        elif action == "at_source":
            undo.at_source += 1
        elif action == "missing":
            undo.missing.append(detail)
        else:
            undo.problems.append(detail)
    return undo


def undo_split(dst: str | os.PathLike, undo: UndoPlan) -> None:
    """Carry out a checked UndoPlan: move files back, remove copies, then the records and emptied folders.

    Cut short, it can be run again: files already back are recognised (they are at their source).
    """
    dst = Path(dst)
    for done, row in enumerate(undo.move_back):
        source = Path(row.source)
        try:
            source.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(source):  # appeared since the check: never overwritten
                raise OSError(errno.EEXIST, f"{source} appeared meanwhile")
            move_file(row.target(dst), source)
        except OSError as error:
            raise UsageError(
                f"moving {row.target(dst)} back to {source} failed ({error}); {done} of {len(undo.move_back)} "
                "file(s) were moved back and no file was lost; fix the cause and run --undo again"
            ) from None
    _delete_all(undo.remove, "undo the split")
    _remove_empty_folders([row.target(dst) for row in undo.move_back] + undo.remove, dst)
    _delete_all([Path(dst, r) for r in (JOURNAL_NAME, CSV_NAME) if os.path.lexists(Path(dst, r))], "undo the split")
