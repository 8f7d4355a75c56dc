"""Copies of one picture in two splits, end to end: train.py's leakage check names them in
dataset_report.txt (--no_audit skips it), and split_dataset.py keeps a near-duplicate pair in one split."""

from __future__ import annotations

import contextlib
import csv
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
from audit_fixtures import scene, write_rgb
from conftest import run_script

from utils.split import plan_split
from utils.split_files import scan_source

FAST = ["--model", "mobilenet_v3_small", "--input_shape", "32", "--batch_size", "8", "--workers", "0", "--epochs", "1"]
CLASSES = ("disc", "square")


def _scenes(root: Path, per_class: int, seed: int) -> list[Path]:
    """root/<class>/<n>.png scenes (tests/audit_fixtures.py: far apart in pHash, as photos are)."""
    rng = np.random.default_rng(seed)
    return [Path(write_rgb(root / name / f"{name}_{k:02d}.png", scene(rng, label)))
            for label, name in enumerate(CLASSES) for k in range(per_class)]


def _resized_recompressed(source: Path, target: Path) -> None:
    image = cv2.cvtColor(cv2.imread(str(source)), cv2.COLOR_BGR2RGB)
    write_rgb(target, cv2.resize(image, (96, 96), interpolation=cv2.INTER_CUBIC), quality=60)


@pytest.fixture(scope="module")
def leaky_tree(tmp_path_factory) -> tuple[Path, str, str]:
    """A split tree whose val/ holds a resized, JPEG-recompressed copy of a train image."""
    root = tmp_path_factory.mktemp("leaky") / "data"
    _scenes(root / "train", 10, seed=1)
    _scenes(root / "val", 4, seed=2)
    original = root / "train" / "disc" / "disc_03.png"
    _resized_recompressed(original, root / "val" / "disc" / "copy_of_03.jpg")
    return root, "train/disc/disc_03.png", "val/disc/copy_of_03.jpg"


def _only_run(log_dir: Path) -> Path:
    (run_dir,) = [p for p in log_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return run_dir


def test_train_names_a_near_copy_across_splits_in_the_dataset_report(leaky_tree, tmp_path):
    root, original, copy = leaky_tree
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    result = run_script("train.py", "--dataset_path", str(root), "--log_dir", str(tmp_path), *FAST)
    assert result.returncode == 0, result.stderr
    report = (_only_run(tmp_path) / "dataset_report.txt").read_text(encoding="utf-8")
    warning = next(line for line in report.splitlines() if "WARNING" in line)
    assert "1 picture(s) are in more than one split" in warning
    (group,) = [line for line in report.splitlines() if original in line]
    assert copy in group and "near copies" in group  # the pair, on one line, found by its perceptual hash
    assert "WARNING: 1 picture(s)" in (_only_run(tmp_path) / "train.log").read_text(encoding="utf-8")
    assert (tmp_path / ".cache" / "image_hashes.sqlite").is_file()
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written into the dataset


def test_no_audit_skips_the_check(leaky_tree, tmp_path):
    root, _, copy = leaky_tree
    result = run_script("train.py", "--dataset_path", str(root), "--log_dir", str(tmp_path), *FAST, "--no_audit")
    assert result.returncode == 0, result.stderr
    report = (_only_run(tmp_path) / "dataset_report.txt").read_text(encoding="utf-8")
    assert "Classes (2)" in report and "Leakage check" not in report and copy not in report
    cache = tmp_path / ".cache" / "image_hashes.sqlite"  # it holds the pre-scan's header checks now
    if cache.exists():  # but no image was hashed
        with contextlib.closing(sqlite3.connect(cache)) as connection:
            tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            assert "fingerprints" not in tables or not connection.execute("SELECT COUNT(*) FROM fingerprints").fetchone()[0]


def test_split_dataset_keeps_a_near_duplicate_pair_in_one_split(tmp_path):
    src = tmp_path / "photos"
    originals = _scenes(src, 12, seed=3)
    copy = src / "disc" / "disc_copy.jpg"
    files = scan_source(src).files
    # a seed where the planner, seeing only the bytes, puts the pair in different splits
    apart = next(seed for seed in range(100) if len({a.split for a in plan_split(
        {**files, "disc": files["disc"] + [str(copy)]}, val_ratio=0.2, test_ratio=0.2, seed=seed).assignments
        if a.path in (str(originals[0]), str(copy))}) == 2)
    _resized_recompressed(originals[0], copy)
    args = ["--src", str(src), "--val_ratio", "0.2", "--test_ratio", "0.2", "--seed", str(apart),
            "--cache_dir", str(tmp_path / "cache")]

    dry = run_script("split_dataset.py", *args, "--dst", str(tmp_path / "dry"), "--dry_run")
    assert dry.returncode == 0, dry.stderr
    near = dry.stdout[dry.stdout.index("Near duplicates: 1 group(s)"):].splitlines()[1]
    assert "disc/disc_00.png" in near and "disc/disc_copy.jpg" in near and "moved from" in near
    assert "Identical files" not in dry.stdout and not (tmp_path / "dry").exists()

    dst = tmp_path / "split"
    result = run_script("split_dataset.py", *args, "--dst", str(dst))
    assert result.returncode == 0, result.stderr
    with open(dst / "split.csv", newline="", encoding="utf-8") as file:
        rows = {row["file"].split("/", 1)[1]: row for row in csv.DictReader(file)}
    assert rows["disc/disc_00.png"]["split"] == rows["disc/disc_copy.jpg"]["split"]
    assert rows["disc/disc_00.png"]["sha1"] != rows["disc/disc_copy.jpg"]["sha1"]  # the real content hashes

    exact_only = run_script("split_dataset.py", *args, "--dst", str(tmp_path / "exact"), "--dry_run",
                            "--phash_distance", "-1")
    assert exact_only.returncode == 0 and "Near duplicates" not in exact_only.stdout


@pytest.mark.parametrize("flags, needle", [
    (["--phash_distance", "65"], "--phash_distance must be in -1..64, got 65"),
    (["--cache_dir", "INSIDE"], "is inside --src"),
], ids=["distance", "cache in src"])
def test_split_dataset_refuses_bad_near_duplicate_flags_in_one_line(tmp_path, flags, needle):
    src = tmp_path / "photos"
    _scenes(src, 3, seed=4)
    before = sorted(src.rglob("*"))
    flags = [str(src / "cache") if flag == "INSIDE" else flag for flag in flags]
    result = run_script("split_dataset.py", "--src", str(src), "--dst", str(tmp_path / "out"), *flags)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
    assert sorted(src.rglob("*")) == before and not (tmp_path / "out").exists()


def test_the_three_tools_share_one_hash_cache_file():
    """train.py, split_dataset.py and audit_dataset.py name the cache alike (the scripts keep their own
    copy of the name so that --help does not load torch), so one tool's hashes serve the others."""
    import audit_dataset
    import split_dataset
    from utils.image_hash import HASH_CACHE_NAME
    from utils.leakage import hash_cache_path

    assert split_dataset.HASH_CACHE_NAME == audit_dataset.HASH_CACHE_NAME == HASH_CACHE_NAME
    assert hash_cache_path("logs", "data/flowers").name == HASH_CACHE_NAME
    assert hash_cache_path("data/flowers/logs", "data/flowers") is None  # never inside the dataset
