"""audit_dataset.py --weights on 5,000 small images: wall time per step, a first and a second run.

    python bench/bench_audit.py            # 5,000 64x64 images of 4 classes, about a minute or two
    python bench/bench_audit.py --quick    # 400 images: a smoke test
    python bench/bench_audit.py --images 20000 --keep /tmp/audit_bench

The dataset is tests/audit_fixtures.py's generated scenes with planted faults (2% flipped labels,
near and exact copies across splits, two unreadable files), so the run also says how many
planted faults it found. The checkpoint comes from a one-epoch train.py run on the same data
(resnet18 at 32 px), as a user would make one. The second audit finds every hash in the cache.
Both runs are subprocesses, timed from start to exit (Python and torch start-up included).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit_fixtures import Planted, make_faulty_dataset  # noqa: E402
from benchlib import machine_description  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time audit_dataset.py --weights on generated small images.")
    parser.add_argument("--quick", action="store_true", help="400 images: a smoke test")
    parser.add_argument("--images", type=int, default=5000, help="images in the dataset (4 classes, 80%% train)")
    parser.add_argument("--keep", default=None, help="build the data and runs in this folder and keep them")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the runs (default: torch's, one per core); 1 is faster on a "
                             "machine other processes keep busy (bench/RESULTS.md)")
    return parser


def run(args: list[str]) -> tuple[float, str]:
    """Run a repository script; (wall seconds, stdout). Any failure stops the benchmark."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args[:1])} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start, result.stdout


def step_times(report: Path) -> dict[str, str]:
    """The Timings table of report.md: step -> time as written."""
    text = report.read_text(encoding="utf-8").split("## Timings", 1)[1]
    return dict(re.findall(r"^\| ([a-z ]+) \| ([\d.]+ s|\d+ min \d+ s) \|$", text, flags=re.MULTILINE))


def found(out: Path, planted: Planted) -> str:
    """Planted duplicate pairs grouped and flipped labels in the top 2 x flips of label_issues.csv."""
    with open(out / "duplicates.csv", newline="", encoding="utf-8") as file:
        groups: dict[str, list[str]] = {}
        for row in csv.DictReader(file):
            groups.setdefault(row["group"], []).append(row["path"])
    pairs = {frozenset((a, b)) for paths in groups.values() for a in paths for b in paths if a < b}
    with open(out / "label_issues.csv", newline="", encoding="utf-8") as file:
        ranked = [row["path"] for row in csv.DictReader(file)]
    top = set(ranked[:2 * len(planted.flipped)])
    hits = len(pairs & planted.duplicate_pairs)
    return (f"duplicates: {hits} of {len(planted.duplicate_pairs)} planted pairs found, {len(pairs) - hits} other "
            f"pairs; label issues: {len(ranked)} flagged, {sum(p in top for p in planted.flipped)} of "
            f"{len(planted.flipped)} flipped labels in the top {2 * len(planted.flipped)}")


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    images = 400 if args.quick else args.images
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by the subprocesses' torch at start
    print(machine_description() + (f"; OMP_NUM_THREADS={args.threads} for the runs" if args.threads else ""))
    if args.keep:
        bench(Path(args.keep), images)
        return
    with tempfile.TemporaryDirectory(prefix="bench_audit_") as work:  # removed afterwards: it is ours
        bench(Path(work), images)


def bench(work: Path, images: int) -> None:
    start = time.perf_counter()
    planted = make_faulty_dataset(work / "data", per_class=max(5, images // 5), val_per_class=max(2, images // 20),
                                  classes=4, flips=max(4, images // 50), near_copies=max(3, images // 100 // 3 * 3),
                                  exact_copies=max(2, images // 200))
    print(f"dataset: {images} images of 64x64 (+ planted copies) written in {time.perf_counter() - start:.1f} s")
    seconds, _ = run(["train.py", "--dataset_path", str(work / "data"), "--model", "resnet18", "--input_shape",
                      "32", "--resize_mode", "stretch", "--epochs", "1", "--hflip", "0", "--crop_scale", "0.8",
                      "--log_dir", str(work / "train"), "--quiet"])
    (weights,) = (work / "train").glob("*/best.pth")
    print(f"checkpoint: one epoch of train.py (resnet18, 32 px) in {seconds:.1f} s")
    for attempt in ("first", "second (hash cache)"):
        out = work / f"audit_{attempt.split()[0]}"
        seconds, _ = run(["audit_dataset.py", "--dataset_path", str(work / "data"), "--weights", str(weights),
                          "--out", str(out), "--log_dir", str(work / "logs")])
        steps = ", ".join(f"{step} {value}" for step, value in step_times(out / "report.md").items())
        print(f"audit --weights, {attempt} run: wall {seconds:.1f} s ({steps})")
    print(found(work / "audit_first", planted))


if __name__ == "__main__":
    main()
