"""utils/split.py (planner), utils/split_files.py (file placement) and split_dataset.py (CLI), on real files in tmp_path."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

import split_dataset
import utils.split_files as split_module
from utils.cli import run_cli
from utils.errors import UsageError
from utils.split import (
    SPLITS,
    plan_split,
    split_counts,
)
from utils.split_files import (
    apply_split,
    hash_files,
    read_split_csv,
    scan_source,
)

REPO = Path(__file__).resolve().parents[1]

# The generated tree: class -> image files (relative to the class folder).
IMAGES = {
    "daisy": [f"daisy_{i}.png" for i in range(10)] + ["sub/daisy_0.png", "daisy_copy.png"],
    "rose": [f"rose_{i}.jpg" for i in range(1, 7)] + ["img1.jpg", "img01.jpg"],
    "café": [f"café_{i}.png" for i in range(4)] + ["花.jpg"],
    "single": ["one.png"],
    "pair": ["a.png", "b.png"],
}
DUPLICATES = {"daisy/daisy_copy.png": "daisy/daisy_0.png", "café/花.jpg": "rose/rose_1.jpg"}
SKIPPED = {
    ".DS_Store": "not inside a class folder",
    "LICENSE.txt": "not inside a class folder",
    "daisy/notes.txt": "not an image (extension)",
    "daisy/._daisy_3.png": "hidden file",
    "daisy/.thumbs": "hidden folder",
    "rose/.DS_Store": "hidden file",
    "empty/.gitkeep": "hidden file",
}
NUM_IMAGES = sum(len(v) for v in IMAGES.values())


def _write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)  # noise: unique bytes
    Image.fromarray(pixels).save(path)


def _build_tree(root: Path) -> None:
    seed = 0
    for class_name, names in IMAGES.items():
        for name in names:
            rel = f"{class_name}/{name}"
            if rel not in DUPLICATES:
                seed += 1
                _write_image(root / rel, seed)
    for copy, original in DUPLICATES.items():
        shutil.copyfile(root / original, root / copy)  # byte-identical
    for rel in SKIPPED:
        if rel == "daisy/.thumbs":
            _write_image(root / rel / "t.png", 999)
        else:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"not an image")


@pytest.fixture(scope="module")
def tree_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template") / "photos"
    _build_tree(root)
    return root


@pytest.fixture
def src(tree_template, tmp_path) -> Path:
    """A fresh copy of the generated tree for each test."""
    root = tmp_path / "photos"
    shutil.copytree(tree_template, root)
    return root


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _image_hashes(root: Path) -> dict[str, str]:
    """{class/inner path: sha1} of the images of an unsplit tree."""
    return {f"{c}/{n}": _sha1(root / c / n) for c, names in IMAGES.items() for n in names}


def _all_files(root: Path) -> dict[str, str]:
    """{relative path: sha1} of every regular file under root (symlinks followed)."""
    return {p.relative_to(root).as_posix(): _sha1(p) for p in root.rglob("*") if p.is_file()}


def _split_files(dst: Path) -> dict[str, str]:
    """{class/inner path: split} for every file under dst/<split>/; fails on a file in two splits."""
    found: dict[str, str] = {}
    for split in SPLITS:
        for path in (dst / split).rglob("*") if (dst / split).exists() else []:
            if path.is_file():
                rel = path.relative_to(dst / split).as_posix()
                assert rel not in found, f"{rel} is in {found[rel]} and {split}"
                found[rel] = split
    return found


def _expected_plan(src: Path, val_ratio: float = 0.1, test_ratio: float = 0.1, seed: int = 0):
    scan = scan_source(src)
    hashes = hash_files([p for paths in scan.files.values() for p in paths])
    return plan_split(scan.files, val_ratio=val_ratio, test_ratio=test_ratio, seed=seed, hashes=hashes)


def _run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """split_dataset.main in-process, through run_cli like the script: (exit code, stdout, stderr)."""
    code = 0
    try:
        run_cli(lambda: split_dataset.main(args))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _run_cli(*args: str, env: Optional[dict] = None, as_user: bool = False) -> subprocess.CompletedProcess:
    """The script as a user runs it. `env`: extra variables. `as_user`: file permissions apply even
    when the tests run as root (see `_drop_root_file_override`)."""
    full_env = dict(os.environ, PYTHONIOENCODING="utf-8", **(env or {}))
    try:
        return subprocess.run(
            [sys.executable, "split_dataset.py", *args], cwd=REPO, capture_output=True, text=True,
            encoding="utf-8", env=full_env, timeout=120, preexec_fn=_drop_root_file_override if as_user else None,
        )
    except subprocess.TimeoutExpired:
        raise
    except subprocess.SubprocessError as error:  # raised in the child by _drop_root_file_override
        pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE for the child, so chmod does not bind it: {error}")


def _drop_root_file_override() -> None:
    """In the child: root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH meets permission bits like any
    user (dropped from the bounding set, so the exec'd python never gets them back). No-op when not root."""
    if os.geteuid() != 0:
        return
    if not sys.platform.startswith("linux"):
        raise OSError("no prctl outside Linux")
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) refused")


def _names(n: int, prefix: str = "img") -> list[str]:
    return [f"/data/{prefix}/{prefix}_{i}.jpg" for i in range(n)]


# ----------------------------------------------------------------------------- rounding rule


@pytest.mark.parametrize(
    "n, val, test, expected",
    [
        (0, 0.1, 0.1, (0, 0, 0)),
        (1, 0.5, 0.2, (1, 0, 0)),  # classes of 1 and 2 stay in train
        (2, 0.5, 0.0, (2, 0, 0)),
        (3, 0.1, 0.1, (1, 1, 1)),  # >= 3: at least one val and one test
        (3, 0.1, 0.0, (2, 1, 0)),
        (10, 0.1, 0.1, (8, 1, 1)),
        (10, 0.25, 0.0, (7, 3, 0)),  # 2.5 rounds half up, not to even
        (90, 0.35, 0.0, (58, 32, 0)),  # 90 * 0.35 = 31.499999999999996 in floats: still 31.5 -> 32
        (4, 0.45, 0.45, (1, 2, 1)),  # rounding up would eat train: one image stays
        (3, 0.9, 0.0, (1, 2, 0)),
        (633, 0.1, 0.1, (507, 63, 63)),
    ],
)
def test_split_counts_examples(n, val, test, expected):
    assert split_counts(n, val, test) == expected


def test_split_counts_invariants():
    for n in range(60):
        for val, test in [(0.1, 0.1), (0.2, 0.0), (0.5, 0.45), (0.01, 0.01), (0.0, 0.3), (0.7, 0.2)]:
            n_train, n_val, n_test = split_counts(n, val, test)
            assert n_train + n_val + n_test == n
            assert min(n_train, n_val, n_test) >= 0
            if n >= 1:
                assert n_train >= 1
            if n >= 3:
                assert (n_val >= 1) == (val > 0) and (n_test >= 1) == (test > 0)
            if test == 0:
                assert n_test == 0


# ----------------------------------------------------------------------------- planner


def test_plan_is_stratified_one_assignment_per_file():
    files = {"a": _names(50, "a"), "b": _names(7, "b"), "c": _names(2, "c")}
    plan = plan_split(files, val_ratio=0.2, test_ratio=0.1, seed=0)
    assert sorted(a.path for a in plan.assignments) == sorted(p for ps in files.values() for p in ps)
    assert all(a.path.split("/")[2] == a.class_name for a in plan.assignments)
    counts = plan.counts()
    for name, paths in files.items():
        assert tuple(counts[name][s] for s in SPLITS) == split_counts(len(paths), 0.2, 0.1)
    assert plan.small_classes == ["c"]
    assert plan.splits == ["train", "val", "test"]


def test_plan_does_not_depend_on_input_order():
    names = _names(30) + ["/data/img/x1.jpg", "/data/img/x01.jpg"]  # natsort ties these two
    plan = plan_split({"img": names, "b": _names(9, "b")}, val_ratio=0.2, test_ratio=0.2, seed=5)
    shuffled = random.Random(1).sample(names, len(names))
    other = plan_split({"b": _names(9, "b")[::-1], "img": shuffled}, val_ratio=0.2, test_ratio=0.2, seed=5)
    assert other.assignments == plan.assignments


def test_same_seed_same_split_other_seed_differs():
    files = {"a": _names(40, "a"), "b": _names(40, "b")}
    first = plan_split(files, val_ratio=0.2, test_ratio=0.1, seed=7)
    assert plan_split(files, val_ratio=0.2, test_ratio=0.1, seed=7).assignments == first.assignments
    assert plan_split(files, val_ratio=0.2, test_ratio=0.1, seed=8).assignments != first.assignments


def test_global_rng_state_plays_no_part():
    files = {"a": _names(40)}
    random.seed(1)
    np.random.seed(1)
    first = plan_split(files, val_ratio=0.3, seed=0)
    random.seed(2)
    np.random.seed(2)
    assert plan_split(files, val_ratio=0.3, seed=0).assignments == first.assignments


def test_adding_a_class_does_not_reshuffle_the_others():
    files = {"a": _names(40, "a")}
    before = plan_split(files, val_ratio=0.2, seed=0)
    after = plan_split({**files, "0new": _names(40, "0new")}, val_ratio=0.2, seed=0)
    assert [a for a in after.assignments if a.class_name == "a"] == before.assignments


def test_zero_test_ratio_makes_no_test_split():
    plan = plan_split({"a": _names(40)}, val_ratio=0.2, test_ratio=0.0)
    assert {a.split for a in plan.assignments} == {"train", "val"}
    assert plan.splits == ["train", "val"]
    assert "test" not in plan.format_table().splitlines()[0]


def test_duplicates_kept_together_and_counts_kept():
    names = _names(20)
    hashes = {p: f"h{i // 2}" for i, p in enumerate(names[:12])}  # 6 pairs of identical files
    plain = plan_split({"img": names}, val_ratio=0.2, test_ratio=0.2, seed=0)
    planned = {a.path: a.split for a in plain.assignments}
    assert any(planned[names[i]] != planned[names[i + 1]] for i in range(0, 12, 2)), "test needs a split pair"

    plan = plan_split({"img": names}, val_ratio=0.2, test_ratio=0.2, seed=0, hashes=hashes)
    split_of = {a.path: a.split for a in plan.assignments}
    for i in range(0, 12, 2):
        assert split_of[names[i]] == split_of[names[i + 1]]
    assert plan.counts() == plain.counts()  # moved files swapped with non-duplicates
    assert len(plan.duplicate_groups) == 6
    moved = [g for g in plan.duplicate_groups if g.moved]
    assert any(g.split == "train" for g in moved)
    for group in moved:  # train if a member was planned there, else the eval split that held one
        was = {planned[p] for p in group.paths}
        assert group.split == "train" if "train" in was else group.split in was
        assert group.moved == [(p, planned[p]) for p in group.paths if planned[p] != group.split]


def test_a_class_made_of_copies_still_gets_val_and_test_in_whole_groups():
    """Frames of a few videos, one picture saved many times: every file has copies. Pulling each group
    into train (where most of its members were planned) with no ordinary file to swap left val and
    test empty; whole groups go there instead, about their planned size."""
    names = _names(40)
    hashes = {p: f"video{i // 5}" for i, p in enumerate(names)}  # 8 groups of 5 frames
    plan = plan_split({"img": names}, val_ratio=0.2, test_ratio=0.2, seed=0, hashes=hashes)
    split_of = {a.path: a.split for a in plan.assignments}
    counts = plan.counts()["img"]
    assert 5 <= counts["val"] <= 10 and 5 <= counts["test"] <= 10 and counts["train"] >= 20, counts
    for group in plan.duplicate_groups:
        assert {split_of[p] for p in group.paths} == {group.split}
    plain = {a.path: a.split for a in plan_split({"img": names}, val_ratio=0.2, test_ratio=0.2, seed=0).assignments}
    for group in plan.duplicate_groups:  # moved: exactly the members planned elsewhere, with that split
        assert group.moved == [(p, plain[p]) for p in group.paths if plain[p] != group.split]
    again = plan_split({"img": list(reversed(names))}, val_ratio=0.2, test_ratio=0.2, seed=0, hashes=hashes)
    assert again.assignments == plan.assignments


def test_duplicate_across_classes_is_reported_with_both_classes():
    files = {"a": _names(10, "a"), "b": _names(10, "b")}
    plain = {x.path: x.split for x in plan_split(files, val_ratio=0.3, seed=0).assignments}
    a_val = next(p for p in files["a"] if plain[p] == "val")
    b_train = next(p for p in files["b"] if plain[p] == "train")
    plan = plan_split(files, val_ratio=0.3, seed=0, hashes={a_val: "same", b_train: "same"})
    split_of = {x.path: x.split for x in plan.assignments}
    assert split_of[a_val] == split_of[b_train] == "train"
    (group,) = plan.duplicate_groups
    assert group.classes == ["a", "b"] and group.moved == [(a_val, "val")]


@pytest.mark.parametrize("val, test", [(1.0, 0.0), (-0.1, 0.1), (0.5, 0.5), (0.2, 1.2), (float("nan"), 0.1)])
def test_bad_ratios_are_usage_errors(val, test):
    with pytest.raises(UsageError, match="ratio"):
        plan_split({"a": _names(10)}, val_ratio=val, test_ratio=test)


def test_a_path_listed_twice_is_refused():
    with pytest.raises(ValueError, match="listed twice"):
        plan_split({"a": ["/x/1.jpg"], "b": ["/x/1.jpg"]}, val_ratio=0.2)


# ----------------------------------------------------------------------------- source scan and placing files


def test_scan_source_takes_images_and_lists_the_rest(src):
    scan = scan_source(src)
    found = {c: sorted(os.path.relpath(p, src / c) for p in ps) for c, ps in scan.files.items()}
    assert found == {c: sorted(str(Path(n)) for n in names) for c, names in IMAGES.items()}
    assert {Path(p).relative_to(src).as_posix(): why for p, why in scan.skipped} == SKIPPED
    assert scan.empty_classes == ["empty"]


@pytest.mark.parametrize("mode", ["copy", "hardlink", "symlink"])
def test_apply_places_every_file_once_and_keeps_the_source(src, tmp_path, mode):
    before = _all_files(src)
    plan = _expected_plan(src)
    dst = tmp_path / "out"
    assert apply_split(plan, src, dst, mode) == NUM_IMAGES
    placed = _split_files(dst)
    assert placed == {Path(a.path).relative_to(src).as_posix(): a.split for a in plan.assignments}
    assert _all_files(src) == before  # source untouched
    for rel, split in placed.items():
        target, source = dst / split / rel, src / rel
        assert _sha1(target) == before[rel]
        assert target.is_symlink() == (mode == "symlink")
        if mode != "copy":
            assert os.path.samefile(target, source)


@pytest.mark.parametrize("failing", ["copy2", "replace"])
def test_interrupted_cross_device_move_loses_nothing(src, tmp_path, monkeypatch, failing):
    originals = _image_hashes(src)
    plan = _expected_plan(src)
    dst = tmp_path / "out"

    def no_rename(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    calls = []
    real = {"copy2": shutil.copy2, "replace": os.replace}[failing]

    def fail_on_fifth(a, b):
        calls.append(a)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(split_module.os, "rename", no_rename)
    monkeypatch.setattr(split_module.shutil if failing == "copy2" else split_module.os, failing, fail_on_fifth)
    with pytest.raises(UsageError, match="4 of 28 file.*no file was lost"):
        apply_split(plan, src, dst, "move")
    split_of = {Path(a.path).relative_to(src).as_posix(): a.split for a in plan.assignments}
    for rel, sha1 in originals.items():
        places = [p for p in (src / rel, dst / split_of[rel] / rel) if p.exists()]
        assert len(places) == 1, f"{rel} is in {len(places)} places"
        assert _sha1(places[0]) == sha1
    assert sum(1 for rel in originals if not (src / rel).exists()) == 4


def test_move_with_a_short_copy_keeps_the_source(src, tmp_path, monkeypatch):
    plan = _expected_plan(src)
    first = Path(plan.assignments[0].path)
    data = first.read_bytes()
    monkeypatch.setattr(split_module.os, "rename", lambda a, b: (_ for _ in ()).throw(OSError(errno.EXDEV, "x")))
    monkeypatch.setattr(split_module.shutil, "copy2", lambda a, b: Path(b).write_bytes(Path(a).read_bytes()[:-1]))
    with pytest.raises(UsageError, match="size differs"):
        apply_split(plan, src, tmp_path / "out", "move")
    assert first.read_bytes() == data
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_hardlink_across_filesystems_is_a_clear_error(src, tmp_path, monkeypatch):
    def cross_device(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(split_module.os, "link", cross_device)
    with pytest.raises(UsageError, match="--mode hardlink is not possible.*--mode copy"):
        apply_split(_expected_plan(src), src, tmp_path / "out", "hardlink")


# ----------------------------------------------------------------------------- CLI, in-process


def test_same_seed_gives_the_same_split_csv(src, tmp_path, capsys):
    for out in ("a", "b"):
        assert _run_main(["--src", str(src), "--dst", str(tmp_path / out), "--seed", "3"], capsys)[0] == 0
    rows = [[(r["file"], r["split"], r["sha1"]) for r in read_split_csv(tmp_path / o / "split.csv")] for o in "ab"]
    assert rows[0] == rows[1] and len(rows[0]) == NUM_IMAGES


def test_test_ratio_zero_writes_no_test_folder(src, tmp_path, capsys):
    code, out, _ = _run_main(["--src", str(src), "--dst", str(tmp_path / "o"), "--test_ratio", "0"], capsys)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["split.csv", "train", "val"]
    assert len(_split_files(tmp_path / "o")) == NUM_IMAGES


def test_overwrite_never_deletes_the_only_copy_of_moved_files(src, tmp_path, capsys):
    again = tmp_path / "again"
    shutil.copytree(src, again)
    dst = tmp_path / "o"
    assert _run_main(["--src", str(src), "--dst", str(dst), "--mode", "move"], capsys)[0] == 0
    moved = _all_files(dst)
    code, _, err = _run_main(["--src", str(again), "--dst", str(dst), "--overwrite"], capsys)
    assert code == 2 and "the only copy, its source is gone" in err.lower() and "--undo" in err
    assert _all_files(dst) == moved


def test_overwrite_removes_an_earlier_test_folder_the_new_split_does_not_write(src, tmp_path, capsys):
    dst = tmp_path / "o"
    assert _run_main(["--src", str(src), "--dst", str(dst), "--seed", "2"], capsys)[0] == 0
    assert (dst / "test").is_dir()
    before = _all_files(src)
    code, _, err = _run_main(["--src", str(src), "--dst", str(dst), "--overwrite", "--test_ratio", "0"], capsys)
    assert code == 0, err
    assert not (dst / "test").exists()  # its files were ours and matched their sources: nothing stale left
    assert _all_files(src) == before
    assert {r["split"] for r in read_split_csv(dst / "split.csv")} == {"train", "val"}
    assert len(_split_files(dst)) == NUM_IMAGES


def test_overwrite_never_deletes_the_source(src, tmp_path, capsys):
    dst = tmp_path / "o"
    assert _run_main(["--src", str(src), "--dst", str(dst), "--test_ratio", "0"], capsys)[0] == 0
    before = _all_files(dst)
    code, _, err = _run_main(["--src", str(dst / "train"), "--dst", str(dst), "--overwrite", "--test_ratio", "0"], capsys)
    assert code == 2 and "which --overwrite would empty" in err
    assert _all_files(dst) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dst", "{tmp}/o"], "--src is required"),
        (["--src", "{tmp}/nowhere", "--dst", "{tmp}/o"], "does not exist"),
        (["--src", "{src}/daisy/sub", "--dst", "{tmp}/o"], "has no class folders"),
        (["--src", "{src}", "--dst", "{tmp}/o", "--val_ratio", "0.6", "--test_ratio", "0.4"], "must be below 1"),
        (["--src", "{src}", "--dst", "{tmp}/o", "--val_ratio", "0"], "--val_ratio must be > 0"),
        (["--src", "{src}", "--dst", "{src}/out"], "is inside --src"),
        (["--src", "{src}", "--dst", "{src}/LICENSE.txt"], "is inside --src"),
        (["--src", "{tmp}/split", "--dst", "{tmp}/o"], "already split"),
        (["--src", "{src}", "--dst", "{tmp}/file.txt"], "not a folder"),
        (["--src", "{src}", "--dst", "{tmp}/o", "--mode", "copy", "--val_ratio", "1.5"], "--val_ratio must be in"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(src, tmp_path, capsys, args, message):
    (tmp_path / "split" / "train" / "a").mkdir(parents=True)
    (tmp_path / "split" / "val" / "a").mkdir(parents=True)
    (tmp_path / "file.txt").write_text("x")
    code, _, err = _run_main([a.format(tmp=tmp_path, src=src) for a in args], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- CLI, subprocess


def test_cli_copy_prints_the_plan_and_copies_every_image_once(src, tmp_path):
    before = _all_files(src)
    plan = _expected_plan(src)
    dst = tmp_path / "flower_data"
    result = _run_cli("--src", str(src), "--dst", str(dst), "--val_ratio", "0.1", "--test_ratio", "0.1")
    assert result.returncode == 0, result.stderr
    counts = plan.counts()
    for class_name, row in counts.items():
        expected = [class_name, sum(row.values()), row["train"], row["val"], row["test"]]
        assert " ".join(map(str, expected)) in [" ".join(line.split()) for line in result.stdout.splitlines()]
        if sum(row.values()) >= 3:  # duplicates were swapped, so the rounding rule still holds
            assert tuple(row[s] for s in SPLITS) == split_counts(sum(row.values()), 0.1, 0.1)
    assert f"total {NUM_IMAGES} " in " ".join(result.stdout.split())
    assert "pair (2), single (1)" in result.stdout and "café/花.jpg" in result.stdout
    assert _all_files(src) == before  # copy: the source is untouched
    placed = _split_files(dst)
    assert placed == {Path(a.path).relative_to(src).as_posix(): a.split for a in plan.assignments}
    assert placed["daisy/daisy_0.png"] == placed["daisy/daisy_copy.png"]
    assert placed["café/花.jpg"] == placed["rose/rose_1.jpg"]
    rows = read_split_csv(dst / "split.csv")
    assert len(rows) == NUM_IMAGES
    for row in rows:
        assert _sha1(dst / row["file"]) == row["sha1"] == before[Path(row["source"]).relative_to(src).as_posix()]
        assert row["file"].split("/")[:2] == [row["split"], row["class"]]


def test_cli_move_loses_no_file(src, tmp_path):
    images = _image_hashes(src)
    originals = Counter(images.values())
    dst = tmp_path / "flower_data"
    result = _run_cli("--src", str(src), "--dst", str(dst), "--mode", "move")
    assert result.returncode == 0, result.stderr
    moved = _split_files(dst)
    assert Counter(_sha1(dst / split / rel) for rel, split in moved.items()) == originals
    left = _all_files(src)
    assert not set(images) & set(left)  # no image left behind
    assert {"LICENSE.txt", "daisy/notes.txt", "daisy/._daisy_3.png"} <= set(left)  # skipped files stay


def test_cli_refuses_a_full_dst_without_overwrite(src, tmp_path, capsys):
    dst = tmp_path / "flower_data"
    assert _run_main(["--src", str(src), "--dst", str(dst)], capsys)[0] == 0
    before = _all_files(dst)
    refused = _run_cli("--src", str(src), "--dst", str(dst), "--seed", "1")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: --dst") and refused.stderr.count("\n") == 1
    assert "pass --overwrite" in refused.stderr and "still identical in size and content" in refused.stderr
    assert refused.stdout == ""  # refused before any work
    assert _all_files(dst) == before


@pytest.mark.parametrize("record", ["split.csv", "old split.csv (no size column)"])
def test_cli_overwrite_replaces_a_clean_earlier_split(src, tmp_path, capsys, record):
    dst = tmp_path / "flower_data"
    assert _run_main(["--src", str(src), "--dst", str(dst)], capsys)[0] == 0
    if record.startswith("old"):  # as written before sizes were recorded: read back the same
        lines = (dst / "split.csv").read_text(encoding="utf-8").splitlines()
        assert lines[0].endswith(",sha1,size")
        (dst / "split.csv").write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n", encoding="utf-8")
    (dst / "notes.md").write_text("mine")
    source_files = _all_files(src)

    replaced = _run_cli("--src", str(src), "--dst", str(dst), "--seed", "1", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert f"Deleting {NUM_IMAGES} file(s) of the earlier split" in replaced.stdout
    assert (dst / "notes.md").read_text() == "mine"  # outside the split folders: kept
    plan = _expected_plan(src, seed=1)
    assert _split_files(dst) == {Path(a.path).relative_to(src).as_posix(): a.split for a in plan.assignments}
    rows = read_split_csv(dst / "split.csv")
    assert [r["split"] for r in rows] == [a.split for a in plan.assignments]
    assert all(int(r["size"]) == (dst / r["file"]).stat().st_size for r in rows)
    assert sorted(p.name for p in dst.iterdir()) == ["notes.md", "split.csv", "test", "train", "val"]  # no journal
    assert _all_files(src) == source_files


@pytest.mark.parametrize("record", ["listed elsewhere", "no split.csv"])
def test_cli_overwrite_keeps_hand_placed_files_and_lists_them(src, tmp_path, capsys, record):
    dst = tmp_path / "flower_data"
    assert _run_main(["--src", str(src), "--dst", str(dst)], capsys)[0] == 0
    if record == "no split.csv":
        (dst / "split.csv").unlink()
    for i in range(12):  # more than the 10 a refusal lists
        _write_image(dst / "train" / "daisy" / f"only_copy_{i:02d}.png", seed=500 + i)
    before = _all_files(dst)

    refused = _run_cli("--src", str(src), "--dst", str(dst), "--overwrite")
    assert refused.returncode == 2
    err = refused.stderr
    assert err.startswith("error: --overwrite deletes only files an earlier split wrote") and err.count("\n") == 1
    hand_placed = 12 if record == "listed elsewhere" else 12 + NUM_IMAGES
    assert f"because {hand_placed} file(s)" in err and f"and {hand_placed - 10} more" in err
    assert ("Not in split.csv: train/daisy/only_copy_00.png" in err) == (record == "listed elsewhere")
    assert len(re.findall(r"\.(?:png|jpg)\b", err)) == 10  # the files listed
    assert refused.stdout == ""  # refused before the plan was even printed
    assert _all_files(dst) == before  # nothing touched


def test_cli_overwrite_refuses_a_file_changed_since_the_split(src, tmp_path, capsys):
    dst = tmp_path / "flower_data"
    assert _run_main(["--src", str(src), "--dst", str(dst)], capsys)[0] == 0
    changed = next(dst / r["file"] for r in read_split_csv(dst / "split.csv") if r["class"] == "rose")
    _write_image(changed, seed=777)  # edited in place (say, cropped by hand): the only copy of that version
    before = _all_files(dst)
    refused = _run_cli("--src", str(src), "--dst", str(dst), "--overwrite")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    rel = changed.relative_to(dst).as_posix()
    assert "because 1 file(s)" in refused.stderr and f"Differs from its source: {rel}." in refused.stderr
    assert _all_files(dst) == before


def test_cli_dry_run_writes_nothing(src, tmp_path):
    before = _all_files(src)
    dst = tmp_path / "flower_data"
    result = _run_cli("--src", str(src), "--dst", str(dst), "--dry-run", "--mode", "move")
    assert result.returncode == 0, result.stderr
    assert "Dry run: would move 28 file(s)" in result.stdout
    assert f"total {NUM_IMAGES} " in " ".join(result.stdout.split())
    assert not dst.exists()
    assert _all_files(src) == before


def test_cli_copies_under_several_labels_explain_the_empty_val(tmp_path):
    picture = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    for name in ("cat", "dog"):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(picture).save(tmp_path / "src" / name / f"{i}.png")
    result = _run_cli("--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "copies or near duplicates of pictures in other classes (1 group(s)" in result.stderr
    assert not (tmp_path / "dst").exists()


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    result = _run_cli("--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr == f"error: --src {tmp_path / 'missing'} does not exist or is not a folder\n"
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- cut short, finished, undone
# SPLIT_DATASET_KILL_AT=EVENT:N makes the script SIGKILL itself at its Nth EVENT (utils.split_files._crash_hook):
# a real kill -9, at a point the test chooses.

KILLED = -signal.SIGKILL


def _files_in_splits(dst: Path) -> list[Path]:
    return sorted(p for s in SPLITS for p in (dst / s).rglob("*") if p.is_file() and p.suffix != ".partial")


def test_cli_move_killed_midway_is_finished_by_the_same_command(src, tmp_path):
    images = _image_hashes(src)
    plan = _expected_plan(src)
    split_of = {Path(a.path).relative_to(src).as_posix(): a.split for a in plan.assignments}
    dst = tmp_path / "flower_data"
    args = ("--src", str(src), "--dst", str(dst), "--mode", "move")
    assert _run_cli(*args, env={"SPLIT_DATASET_KILL_AT": "placed:5"}).returncode == KILLED
    assert (dst / "split.journal.json").is_file() and len(read_split_csv(dst / "split.csv")) == NUM_IMAGES
    moved = [rel for rel in images if (dst / split_of[rel] / rel).exists()]
    assert len(moved) == 5 and not any((src / rel).exists() for rel in moved)
    # a move across filesystems killed between its copy and deleting the source leaves the file twice
    shutil.copy2(dst / split_of[moved[0]] / moved[0], src / moved[0])
    before = _all_files(dst)

    other = _run_cli("--src", str(src), "--dst", str(dst), "--mode", "move", "--seed", "1")
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert "holds an unfinished split" in other.stderr and "run that same command again" in other.stderr
    dry = _run_cli(*args, "--dry_run")
    assert dry.returncode == 0 and "5 of 28 file(s) are in place, 23 would be placed" in dry.stdout
    assert _all_files(dst) == before

    finished = _run_cli(*args)
    assert finished.returncode == 0, finished.stderr
    assert "5 of 28 file(s) were already in place, 23 placed now" in finished.stdout
    for rel, sha1 in images.items():  # every file exactly once, where the plan put it, byte for byte
        places = [p for p in (src / rel, dst / split_of[rel] / rel) if p.exists()]
        assert places == [dst / split_of[rel] / rel] and _sha1(places[0]) == sha1, rel
    assert len(_files_in_splits(dst)) == NUM_IMAGES
    assert not (dst / "split.journal.json").exists()


@pytest.mark.parametrize("rerun", [[], ["--overwrite", "--seed", "1"]], ids=["same command", "overwrite"])
def test_cli_copy_killed_mid_file_leaves_a_partial_that_a_rerun_cleans(src, tmp_path, rerun):
    before = _all_files(src)
    dst = tmp_path / "flower_data"
    killed = _run_cli("--src", str(src), "--dst", str(dst), env={"SPLIT_DATASET_KILL_AT": "partial:4"})
    assert killed.returncode == KILLED
    (partial,) = list(dst.rglob("*.partial"))
    assert len(_files_in_splits(dst)) == 3

    finished = _run_cli("--src", str(src), "--dst", str(dst), *rerun)
    assert finished.returncode == 0, finished.stderr
    if not rerun:
        assert "removed 1 leftover .partial file(s)" in finished.stdout
    assert not list(dst.rglob("*.partial")) and not (dst / "split.journal.json").exists()
    seed = int(rerun[-1]) if rerun else 0
    expected = {Path(a.path).relative_to(src).as_posix(): a.split for a in _expected_plan(src, seed=seed).assignments}
    assert _split_files(dst) == expected
    assert _all_files(src) == before


@pytest.mark.parametrize("kill_after", [0, 7], ids=["finished move", "killed move"])
def test_cli_undo_restores_the_source_tree_byte_identical(src, tmp_path, kill_after):
    before = _all_files(src)  # skipped files included: they must not be touched either
    dst = tmp_path / "flower_data"
    env = {"SPLIT_DATASET_KILL_AT": f"placed:{kill_after}"} if kill_after else None
    first = _run_cli("--src", str(src), "--dst", str(dst), "--mode", "move", env=env)
    assert first.returncode == (KILLED if kill_after else 0)
    assert _all_files(src) != before

    undone = _run_cli("--dst", str(dst), "--undo")
    assert undone.returncode == 0, undone.stderr
    assert f"moved {kill_after or NUM_IMAGES} file(s) back to their source" in undone.stdout
    assert _all_files(src) == before
    assert list(dst.iterdir()) == []  # split folders, split.csv and the journal: all gone


def test_cli_a_foreign_file_at_a_planned_target_stops_the_rerun_and_survives_undo(src, tmp_path):
    before = _all_files(src)
    dst = tmp_path / "flower_data"
    args = ("--src", str(src), "--dst", str(dst), "--mode", "move")
    assert _run_cli(*args, env={"SPLIT_DATASET_KILL_AT": "placed:3"}).returncode == KILLED
    unplaced = next(dst / r["file"] for r in read_split_csv(dst / "split.csv") if not (dst / r["file"]).exists())
    _write_image(unplaced, seed=321)  # someone else's file where the plan puts one
    mine = _sha1(unplaced)
    stopped = _run_cli(*args)
    assert stopped.returncode == 2 and stopped.stderr.count("\n") == 1
    assert f"nothing was changed: {unplaced} exists and is not the file planned there" in stopped.stderr
    undone = _run_cli("--dst", str(dst), "--undo")
    assert undone.returncode == 0, undone.stderr
    assert _all_files(src) == before
    assert _all_files(dst) == {unplaced.relative_to(dst).as_posix(): mine}  # left alone, not deleted


def test_undo_of_a_copy_split_deletes_only_the_copies(src, tmp_path, capsys):
    before = _all_files(src)
    dst = tmp_path / "o"
    assert _run_main(["--src", str(src), "--dst", str(dst), "--mode", "symlink"], capsys)[0] == 0
    (dst / "notes.md").write_text("mine")
    code, out, err = _run_main(["--dst", str(dst), "--undo"], capsys)
    assert code == 0, err
    assert f"deleted {NUM_IMAGES} copies/links" in out
    assert _all_files(src) == before
    assert [p.name for p in dst.iterdir()] == ["notes.md"]


def test_cli_undo_refuses_when_a_source_path_is_taken(src, tmp_path):
    dst = tmp_path / "flower_data"
    assert _run_cli("--src", str(src), "--dst", str(dst), "--mode", "move").returncode == 0
    taken = Path(read_split_csv(dst / "split.csv")[3]["source"])
    _write_image(taken, seed=901)  # a new, different image where the original was
    before_dst, before_src = _all_files(dst), _all_files(src)

    refused = _run_cli("--dst", str(dst), "--undo")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("error: --undo changed nothing, because of 1 file(s)")
    assert f"{taken} is taken by a different file" in refused.stderr
    assert _all_files(dst) == before_dst and _all_files(src) == before_src


# ----------------------------------------------------------------------------- permissions (as a user, even under root)


@pytest.mark.parametrize("where", ["dst", "its parent"])
def test_cli_read_only_dst_is_one_line(src, tmp_path, where):
    folder = tmp_path / "read_only"
    folder.mkdir()
    dst = folder if where == "dst" else folder / "flower_data"
    folder.chmod(0o555)
    try:
        result = _run_cli("--src", str(src), "--dst", str(dst), as_user=True)
    finally:
        folder.chmod(0o755)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"error: --dst {dst}") and "is not writable" in result.stderr
    assert result.stderr.count("\n") == 1
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    "unreadable, message",
    [("daisy", "cannot read folder {}"), ("daisy/sub", "cannot read folder {}"), ("rose/rose_2.jpg", "cannot read {}")],
)
def test_cli_unreadable_source_is_named_with_the_os_error(src, tmp_path, unreadable, message):
    path = src / unreadable
    path.chmod(0)
    try:
        result = _run_cli("--src", str(src), "--dst", str(tmp_path / "o"), as_user=True)
    finally:
        path.chmod(0o755)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("error: " + message.format(path) + " (Permission denied)")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_train_side_in_memory_split_uses_the_same_planner(src):
    from utils.data import scan_dataset  # the call train.py makes on an unsplit tree

    shutil.rmtree(src / "empty")
    scan = scan_dataset(src, val_ratio=0.2, seed=0)
    plan = plan_split(scan_source(src).files, val_ratio=0.2, test_ratio=0.0, seed=0)
    assert scan.split_on_the_fly
    for split in ("train", "val"):
        expected = sorted(a.path for a in plan.assignments if a.split == split)
        assert sorted(path for path, _ in scan.splits[split]) == expected
