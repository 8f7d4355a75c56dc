"""Audit a dataset before training: duplicates, train/test leakage, likely label errors, a data report.

    python audit_dataset.py --dataset_path data/flowers                          # quick K-fold CNN
    python audit_dataset.py --dataset_path data/flowers --weights logs/<run>/best.pth

Writes duplicates.csv, label_issues.csv, report.md and pictures to logs/<time>_audit/ (or --out).
The dataset is only read. The work is done in inference/audit.py; see docs/audit.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

from utils.cli import run_cli
from utils.errors import UsageError
from utils.memory import keep_freed_memory

HASH_CACHE_NAME = "image_hashes.sqlite"  # = utils.image_hash.HASH_CACHE_NAME (shared with train.py); not imported: that loads torch before the checks


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Find duplicates, leakage between splits and likely label errors in DATASET/{train,val[,test]}/"
                    "<class>/ or DATASET/<class>/, and report on the images. Nothing in the dataset is changed.")
    parser.add_argument("--dataset_path", "--dataset-path", "--data", default=None,
                        help="(required) the dataset: a train/val[/test] tree or unsplit class folders")
    parser.add_argument("--weights", default=None,
                        help="a train.py checkpoint: its embeddings find near duplicates and feed a K-fold logistic "
                             "regression for label issues (without it: a quick K-fold training of --model)")
    parser.add_argument("--out", default=None, help="output folder, new or empty (default: LOG_DIR/<time>_audit/)")
    parser.add_argument("--log_dir", "--log-dir", default="logs", help="where the default output folder goes "
                        "(default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5, help="K of the K-fold out-of-sample probabilities "
                        "(default: %(default)s)")
    parser.add_argument("--phash_distance", "--phash-distance", type=int, default=10,
                        help="near duplicates: perceptual hashes differing in at most this many of 64 bits; lowered "
                             "where unrelated images come that close; -1: exact copies only (default: %(default)s)")
    parser.add_argument("--min_similarity", "--min-similarity", type=float, default=0.9,
                        help="with --weights: cosine similarity of centred embeddings from which two images that "
                             "are each other's nearest neighbour are near duplicates (default: %(default)s)")
    parser.add_argument("--no_labels", "--no-labels", action="store_true",
                        help="skip the label-issue search (duplicates and the report only: fast)")
    parser.add_argument("--model", default="resnet18",
                        help="without --weights: the model trained K times (default: %(default)s)")
    parser.add_argument("--input_shape", "--input-shape", type=int, default=None, metavar="SIZE",
                        help="without --weights: its square input side (default: the median short side, within 32-96)")
    parser.add_argument("--epochs", type=int, default=4,
                        help="without --weights: epochs of each fold's training (default: %(default)s)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default: by data size)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the folds and the quick training (default: %(default)s)")
    parser.add_argument("--top", type=int, default=24,
                        help="duplicate groups and suspects shown in the pictures; 0: no pictures (default: %(default)s)")
    parser.add_argument("--cache_dir", "--cache-dir", default=None,
                        help=f"folder of the hash cache {HASH_CACHE_NAME} (default: LOG_DIR/.cache)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked before any work, each failure one line naming the flag."""
    if not args.dataset_path:
        raise UsageError("--dataset_path is required: the dataset folder to audit")
    if not os.path.isdir(args.dataset_path):  # here, before torch is imported: a typo fails at once
        raise UsageError(f"--dataset_path {args.dataset_path} does not exist or is not a folder")
    checks = [
        (args.folds >= 2, f"--folds must be at least 2, got {args.folds}"),
        (-1 <= args.phash_distance <= 64, f"--phash_distance must be in -1..64, got {args.phash_distance}"),
        (0 < args.min_similarity <= 1, f"--min_similarity must be in (0, 1], got {args.min_similarity}"),
        (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
        (args.batch_size >= 2, f"--batch_size must be at least 2, got {args.batch_size}"),
        (args.top >= 0, f"--top must be 0 or more, got {args.top}"),
        (args.workers is None or args.workers >= 0, f"--workers must be 0 or more, got {args.workers}"),
        (args.input_shape is None or args.input_shape >= 16, f"--input_shape must be at least 16, got {args.input_shape}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if args.weights is not None and not os.path.isfile(args.weights):
        raise UsageError(f"--weights {args.weights} does not exist")


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def output_folder(args: argparse.Namespace) -> Path:
    """--out (new or empty) or a fresh LOG_DIR/<time>_audit/; never inside the dataset."""
    from utils.logger import new_run_dir

    dataset = Path(args.dataset_path)
    target = Path(args.out) if args.out else Path(args.log_dir)
    if _inside(target, dataset):
        flag = "--out" if args.out else "--log_dir"
        raise UsageError(f"{flag} {target} is inside the dataset {dataset}; the audit writes nothing there, pick "
                         "another folder")
    if not args.out:
        return new_run_dir(args.log_dir, "audit", subdirs=())
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"--out {target} already exists and is not an empty folder; nothing is overwritten, "
                         "pick a new folder")
    target.mkdir(parents=True, exist_ok=True)
    return target


def cache_path(args: argparse.Namespace) -> Path:
    folder = Path(args.cache_dir) if args.cache_dir else Path(args.log_dir) / ".cache"
    if _inside(folder, Path(args.dataset_path)):
        flag = "--cache_dir" if args.cache_dir else "--log_dir (the default cache place)"
        raise UsageError(f"{flag} {folder} is inside the dataset {args.dataset_path}; the cache must go elsewhere")
    return folder / HASH_CACHE_NAME


def main(argv: Optional[list[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    start = time.perf_counter()
    from inference.audit import AuditOptions, collect_dataset, run_audit  # torch: after the checks
    from inference.audit_report import console_summary
    from models.registry import check_model_name

    if args.weights is None and not args.no_labels:
        check_model_name(args.model)
    dataset = collect_dataset(args.dataset_path)
    options = AuditOptions(
        weights=args.weights, folds=args.folds, max_distance=args.phash_distance, min_similarity=args.min_similarity,
        labels=not args.no_labels, model=args.model, input_size=args.input_shape, epochs=args.epochs,
        batch_size=args.batch_size, device=args.device, workers=args.workers, seed=args.seed, top=args.top,
        cache_path=str(cache_path(args)), progress=sys.stderr.isatty())
    out_dir = output_folder(args)
    print(f"Auditing {len(dataset.items)} images of {len(dataset.class_names)} classes in {args.dataset_path}; "
          f"output: {out_dir}")
    try:
        result = run_audit(dataset, options, out_dir)
    except UsageError:
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # made by this run and still empty: a run that could not start leaves nothing
        raise
    print(console_summary(result, out_dir, time.perf_counter() - start))


if __name__ == "__main__":
    keep_freed_memory()  # glibc keeps the memory a batch frees for the next one (utils/memory.py)
    run_cli(main, skip_teardown=True)
