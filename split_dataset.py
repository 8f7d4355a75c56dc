"""Split a class-folder dataset into train/val[/test], reproducibly and without losing a file.

    python split_dataset.py --src flower_photos --dst data/flower_data --val_ratio 0.1 --test_ratio 0.1

SRC/<class>/**/<image>  ->  DST/{train,val,test}/<class>/...  plus DST/split.csv (file, source,
class, split, sha1, size). The plan comes from utils/split.py, the file handling from
utils/split_files.py; see docs/splitting.md. Copies of one picture (byte-identical, or resized /
recompressed: utils/image_hash.py's perceptual hash) are kept in one split, so val/ and test/ never
score an image that train/ holds. The hashes are cached in logs/.cache/ (--cache_dir), never in SRC.

A run cut short (kill -9, disk full) is finished by running the same command again: the plan
is journaled in DST/split.journal.json before the first file is placed. `--dst DST --undo`
puts every file back where split.csv says it came from.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from utils.cli import run_cli
from utils.errors import UsageError
from utils.files import check_output_dir
from utils.split import (
    MIN_CLASS_SIZE,
    SplitPlan,
    check_ratios,
    plan_split,
)
from utils.split_files import (
    MODES,
    Journal,
    SourceScan,
    check_destination,
    check_locations,
    check_mode,
    finish_split,
    hash_files,
    one_line_list,
    overwrite_removals,
    plan_progress,
    plan_undo,
    planned_files,
    read_journal,
    remove_files,
    remove_journal,
    scan_source,
    split_settings,
    undo_split,
    write_journal,
    write_split_csv,
)

MAX_LISTED = 20  # longer lists (skipped files, duplicate groups) are cut, with a count of the rest
DEFAULT_CACHE_DIR = os.path.join("logs", ".cache")  # where train.py and audit_dataset.py keep the same hash cache
HASH_CACHE_NAME = "image_hashes.sqlite"  # = utils.image_hash.HASH_CACHE_NAME; not imported: that loads torch
NEAR_KEY_PREFIX = "group-"  # utils.image_hash.group_keys' keys; a sha1 never starts so


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Split SRC/<class>/<images> into DST/{train,val,test}/<class>/ (stratified, seeded).",
    )
    parser.add_argument("--src", help="(required) unsplit dataset: one sub-folder of images per class")
    parser.add_argument("--dst", help="(required) output folder: gets train/ val/ [test/] and split.csv")
    parser.add_argument("--val_ratio", "--val-ratio", type=float, default=0.1, help="share of each class for val/ (default %(default)s)")
    parser.add_argument(
        "--test_ratio", "--test-ratio", type=float, default=0.1, help="share of each class for test/; 0: no test/ (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed + same files = same split (default %(default)s)")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="copy",
        help="copy; hardlink (no extra space, same filesystem); symlink (absolute links); "
        "move (each file verified before its source is removed). Default %(default)s",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="allow a --dst that holds an earlier split: deletes only the files its split.csv lists that still "
        "match their source, and refuses (touching nothing) if train/ val/ test/ hold anything else",
    )
    parser.add_argument(
        "--undo",
        action="store_true",
        help="with --dst only: put every file listed in DST/split.csv back (moved files to their source path; "
        "copies and links whose source is intact are deleted), then delete split.csv. Refuses, changing "
        "nothing, when a source path holds a different file",
    )
    parser.add_argument(
        "--phash_distance",
        "--phash-distance",
        type=int,
        default=10,
        help="near duplicates (resized, recompressed copies) kept in one split: perceptual hashes differing in at most "
        "this many of 64 bits (lowered where unrelated images come that close); -1: only byte-identical files, "
        "no image decoded (default %(default)s)",
    )
    parser.add_argument(
        "--cache_dir",
        "--cache-dir",
        default=DEFAULT_CACHE_DIR,
        help=f"folder of the hash cache {HASH_CACHE_NAME}, shared with train.py and audit_dataset.py; never inside "
        "--src (default %(default)s)",
    )
    parser.add_argument(
        "--dry_run", "--dry-run", action="store_true", help="print the plan; write nothing but the hash cache"
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag in ("src", "dst"):
        if not getattr(args, flag):
            raise UsageError(f"--{flag} is required (see --help)")
    if args.val_ratio <= 0:
        raise UsageError(f"--val_ratio must be > 0 (train.py needs a val/ folder), got {args.val_ratio}")
    check_ratios(args.val_ratio, args.test_ratio)
    if not -1 <= args.phash_distance <= 64:
        raise UsageError(f"--phash_distance must be in -1..64, got {args.phash_distance}")
    check_locations(args.src, args.dst)
    cache = Path(args.cache_dir).resolve()
    if cache == Path(args.src).resolve() or Path(args.src).resolve() in cache.parents:
        raise UsageError(f"--cache_dir {args.cache_dir} is inside --src {args.src}, which is never written to; "
                         "pass --cache_dir with a folder elsewhere")
    check_mode(args.mode, args.src, args.dst)
    check_output_dir(args.dst, "--dst")


def duplicate_keys(paths: list[str], sha1s: dict[str, str], max_distance: int, cache_dir: str) -> tuple[dict[str, str], int]:
    """The keys plan_split keeps together: each file's sha1, and for the members of a near-duplicate
    group (utils.image_hash: pHash within `max_distance` bits) one key of the group; and the
    distance used (lowered where unrelated images crowd together; -1: byte-identical files only)."""
    if max_distance < 0:
        return dict(sha1s), -1
    from utils.image_hash import (  # loads torch: only when needed
        fingerprint_files,
        group_keys,
        search_duplicates,
    )

    fingerprints = fingerprint_files(paths, Path(cache_dir, HASH_CACHE_NAME), progress=sys.stderr.isatty())
    search = search_duplicates(fingerprints, max_distance, progress=sys.stderr.isatty())
    near = [group for group in search.groups if any(member.kind != "exact" for member in group.members)]
    return {**sha1s, **group_keys(near)}, search.max_distance  # all-exact groups already share a sha1


def report(scan: SourceScan, plan: SplitPlan, near_distance: int = -1) -> str:
    """The per-class table and the notes a user should read before trusting the split."""
    lines = [
        f"Split of {scan.root} (seed {plan.seed}, val_ratio {plan.val_ratio}, test_ratio {plan.test_ratio}):",
        plan.format_table(),
    ]
    if plan.small_classes:
        sizes = plan.counts()
        listed = ", ".join(f"{c} ({sum(sizes[c].values())})" for c in plan.small_classes)
        lines.append(f"Note: fewer than {MIN_CLASS_SIZE} images, all in train: {listed}")
    if scan.empty_classes:
        lines.append(f"Note: class folders without images (left out): {', '.join(scan.empty_classes)}")
    identical = [g for g in plan.duplicate_groups if not g.key.startswith(NEAR_KEY_PREFIX)]
    near = [g for g in plan.duplicate_groups if g.key.startswith(NEAR_KEY_PREFIX)]
    lines += _duplicate_lines(identical, scan.root, "Identical files", "byte-identical images", "same sha1 in split.csv")
    lines += _duplicate_lines(near, scan.root, "Near duplicates",
                              f"resized or recompressed copies (pHash within {near_distance} of 64 bits)",
                              "python audit_dataset.py --dataset_path DST lists duplicates with pictures")
    if scan.skipped:
        lines.append(f"Skipped {len(scan.skipped)} hidden or non-image path(s), left in --src:")
        lines += [f"  {os.path.relpath(p, scan.root)}: {why}" for p, why in scan.skipped[:MAX_LISTED]]
        if len(scan.skipped) > MAX_LISTED:
            lines.append(f"  ... and {len(scan.skipped) - MAX_LISTED} more")
    return "\n".join(lines)


def _duplicate_lines(groups: list, root: str, title: str, what: str, more: str) -> list[str]:
    if not groups:
        return []
    moved = [g for g in groups if g.moved]
    lines = [
        f"{title}: {len(groups)} group(s) of {what}, each kept in one split "
        f"({len(moved)} moved there to avoid leakage between splits):"
    ]
    for group in groups[:MAX_LISTED]:
        names = ", ".join(os.path.relpath(p, root) for p in group.paths)
        note = "; ".join(f"{os.path.relpath(p, root)} moved from {s}" for p, s in group.moved)
        labels = f" [same image in classes {', '.join(group.classes)}: check the labels]" if len(group.classes) > 1 else ""
        lines.append(f"  {group.split}: {names}" + (f" ({note})" if note else "") + labels)
    if len(groups) > MAX_LISTED:
        lines.append(f"  ... and {len(groups) - MAX_LISTED} more ({more})")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.undo:
        undo(args.dst, args.dry_run)
        return
    check_args(args)
    settings = split_settings(args.src, args.mode, args.seed, args.val_ratio, args.test_ratio)
    journal = read_journal(args.dst) if os.path.isdir(args.dst) else None
    if journal is not None and journal.settings == settings:
        finish_journaled(journal, args.dst, args.dry_run)
        return
    check_destination(args.dst, args.overwrite, journal)
    removals = overwrite_removals(args.src, args.dst) if args.overwrite else []  # refuses before any work
    scan = scan_source(args.src)
    paths = [p for files in scan.files.values() for p in files]
    hashes = hash_files(paths)  # split.csv's sha1 column; a file that cannot be read stops the run here
    keys, near_distance = duplicate_keys(paths, hashes, args.phash_distance, args.cache_dir)
    plan = plan_split(
        scan.files, val_ratio=args.val_ratio, test_ratio=args.test_ratio, seed=args.seed, hashes=keys
    )
    if "val" not in plan.splits:
        raise UsageError(nothing_for_val(plan, args.src))
    print(report(scan, plan, near_distance))
    if args.dry_run:
        if removals:
            print(f"Would delete {len(removals)} file(s) of the earlier split in {args.dst} (each is still at its source)")
        print(f"Dry run: would {args.mode} {len(paths)} file(s) into {args.dst}; nothing written there.")
        return
    if removals:
        print(f"Deleting {len(removals)} file(s) of the earlier split in {args.dst} (--overwrite; each is still at its source)")
        remove_files(removals, args.dst)
    rows = planned_files(plan, args.src, args.dst, hashes)
    csv_path = write_records(args.dst, settings, rows)
    finish_split(rows, args.dst, args.mode)
    remove_journal(args.dst)
    totals = ", ".join(f"{s} {sum(row[s] for row in plan.counts().values())}" for s in plan.splits)
    print(f"Done: {args.mode} {len(rows)} file(s) into {args.dst} ({totals}); wrote {csv_path}")


def nothing_for_val(plan: SplitPlan, src: str) -> str:
    """Why no file could go to val/: tiny classes, or copies of one picture under several labels."""
    if len(plan.small_classes) == len(plan.class_names):
        return f"no class in --src {src} has {MIN_CLASS_SIZE} or more images: nothing for val/"
    shared = [g for g in plan.duplicate_groups if len(g.classes) > 1]
    return (f"nothing in --src {src} can go to val/: its images are copies or near duplicates of pictures in "
            f"other classes ({len(shared)} group(s) of the same picture under several labels), kept in train; "
            f"python audit_dataset.py --dataset_path {src} lists them (--phash_distance -1 groups only identical files)")


def write_records(dst: str, settings: dict, rows: list) -> str:
    """The journal first (from then on a re-run can finish the split and --undo can revert it), then split.csv."""
    try:
        os.makedirs(dst, exist_ok=True)
        write_journal(dst, settings, rows)
        return str(write_split_csv(rows, dst))
    except OSError as error:
        raise UsageError(f"cannot write to --dst {dst} ({error.strerror or error}); pick a folder you can write to") from None


def finish_journaled(journal: Journal, dst: str, dry_run: bool) -> None:
    """The same command as an unfinished split: complete its journaled plan (no re-scan: moved files are gone from SRC)."""
    if dry_run:
        progress = plan_progress(journal.rows, dst, journal.settings["mode"])
        problems = f"; it cannot finish: {one_line_list(progress.problems)}" if progress.problems else ""
        print(
            f"Dry run: {journal.path} holds an unfinished split; {progress.placed} of {len(journal.rows)} file(s) "
            f"are in place, {len(progress.to_place)} would be placed{problems}. Nothing written."
        )
        return
    try:
        write_split_csv(journal.rows, dst)  # the run may have stopped before writing it
    except OSError as error:
        raise UsageError(f"cannot write to --dst {dst} ({error.strerror or error}); pick a folder you can write to") from None
    progress = finish_split(journal.rows, dst, journal.settings["mode"])
    remove_journal(dst)
    partials = f"; removed {len(progress.partials)} leftover .partial file(s)" if progress.partials else ""
    print(
        f"Finished the split journaled in {journal.path}: {progress.placed} of {len(journal.rows)} file(s) were "
        f"already in place, {len(progress.to_place)} placed now{partials}"
    )


def undo(dst: Optional[str], dry_run: bool) -> None:
    """--undo: every file split.csv lists goes back to its source; refuses, changing nothing, on any conflict."""
    if not dst:
        raise UsageError("--undo needs --dst: the folder of the split to undo")
    plan = plan_undo(dst)
    if plan.problems:
        raise UsageError(
            f"--undo changed nothing, because of {len(plan.problems)} file(s): {one_line_list(plan.problems)}. "
            "Move what is at those paths out of the way, then run --undo again"
        )
    counts = (len(plan.move_back), len(plan.remove), plan.at_source)
    if dry_run:
        print("Dry run: --undo would move {} file(s) back to their source and delete {} copies/links/partial "
              "file(s) whose source is intact ({} already at their source); nothing changed.".format(*counts))
    else:
        undo_split(dst, plan)
        print("Undone: moved {} file(s) back to their source, deleted {} copies/links/partial file(s) whose "
              "source is intact ({} already at their source); deleted split.csv".format(*counts))
    if plan.missing:
        print(f"Warning: {len(plan.missing)} listed file(s) are neither in {dst} nor at their source: "
              f"{one_line_list(plan.missing)}")


if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # non-ASCII class names on a legacy console
    run_cli(main)
