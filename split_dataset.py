"""Split a class-folder dataset into train/val[/test], reproducibly and without losing a file.

    python split_dataset.py --src flower_photos --dst data/flower_data --val_ratio 0.1 --test_ratio 0.1

SRC/<class>/**/<image>  ->  DST/{train,val,test}/<class>/...  plus DST/split.csv (file, source,
class, split, sha1). The planning and file handling live in utils/split.py; see README
"Splitting a dataset".
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from utils.cli import run_cli
from utils.errors import UsageError
from utils.split import (
    MIN_CLASS_SIZE,
    MODES,
    SourceScan,
    SplitPlan,
    apply_split,
    check_destination,
    check_locations,
    check_mode,
    check_ratios,
    hash_files,
    plan_split,
    planned_removals,
    remove_paths,
    scan_source,
    write_split_csv,
)

MAX_LISTED = 20  # longer lists (skipped files, duplicate groups) are cut, with a count of the rest


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
        help="allow a --dst that holds files: replaces only its train/ val/ test/ and split.csv",
    )
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="print the plan, write nothing")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag in ("src", "dst"):
        if not getattr(args, flag):
            raise UsageError(f"--{flag} is required (see --help)")
    if args.val_ratio <= 0:
        raise UsageError(f"--val_ratio must be > 0 (train.py needs a val/ folder), got {args.val_ratio}")
    check_ratios(args.val_ratio, args.test_ratio)
    check_locations(args.src, args.dst)
    check_mode(args.mode, args.src, args.dst)
    check_destination(args.dst, args.overwrite)


def report(scan: SourceScan, plan: SplitPlan) -> str:
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
    lines += _duplicate_lines(plan, scan.root)
    if scan.skipped:
        lines.append(f"Skipped {len(scan.skipped)} hidden or non-image path(s), left in --src:")
        lines += [f"  {os.path.relpath(p, scan.root)}: {why}" for p, why in scan.skipped[:MAX_LISTED]]
        if len(scan.skipped) > MAX_LISTED:
            lines.append(f"  ... and {len(scan.skipped) - MAX_LISTED} more")
    return "\n".join(lines)


def _duplicate_lines(plan: SplitPlan, root: str) -> list[str]:
    if not plan.duplicate_groups:
        return []
    moved = [g for g in plan.duplicate_groups if g.moved]
    lines = [
        f"Identical files: {len(plan.duplicate_groups)} group(s) of byte-identical images, each kept in one split "
        f"({len(moved)} moved there to avoid leakage between splits):"
    ]
    for group in plan.duplicate_groups[:MAX_LISTED]:
        names = ", ".join(os.path.relpath(p, root) for p in group.paths)
        note = "; ".join(f"{os.path.relpath(p, root)} moved from {s}" for p, s in group.moved)
        labels = f" [same image in classes {', '.join(group.classes)}: check the labels]" if len(group.classes) > 1 else ""
        lines.append(f"  {group.split}: {names}" + (f" ({note})" if note else "") + labels)
    if len(plan.duplicate_groups) > MAX_LISTED:
        lines.append(f"  ... and {len(plan.duplicate_groups) - MAX_LISTED} more (same sha1 in split.csv)")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    scan = scan_source(args.src)
    paths = [p for files in scan.files.values() for p in files]
    hashes = hash_files(paths)
    plan = plan_split(
        scan.files, val_ratio=args.val_ratio, test_ratio=args.test_ratio, seed=args.seed, hashes=hashes
    )
    if "val" not in plan.splits:
        raise UsageError(f"no class in --src {args.src} has {MIN_CLASS_SIZE} or more images: nothing for val/")
    print(report(scan, plan))
    removals = planned_removals(plan, args.src, args.dst)
    if args.dry_run:
        for path in removals:
            print(f"Would delete {path}")
        print(f"Dry run: would {args.mode} {len(paths)} file(s) into {args.dst}; nothing written.")
        return
    for path in removals:
        print(f"Deleting {path} (--overwrite)")
    remove_paths(removals)
    os.makedirs(args.dst, exist_ok=True)
    csv_path = write_split_csv(plan, args.src, args.dst, hashes)  # first: a cut-short run still says what went where
    placed = apply_split(plan, args.src, args.dst, args.mode)
    totals = ", ".join(f"{s} {sum(row[s] for row in plan.counts().values())}" for s in plan.splits)
    print(f"Done: {args.mode} {placed} file(s) into {args.dst} ({totals}); wrote {csv_path}")


if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # non-ASCII class names on a legacy console
    run_cli(main)
