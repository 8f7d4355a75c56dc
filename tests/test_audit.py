"""audit_dataset.py, inference/audit*.py and utils/image_hash.py on a generated dataset with planted
faults (tests/audit_fixtures.py): duplicates found, flipped labels ranked first, a report that
names real flags, nothing in the dataset touched, bad input as one line."""

from __future__ import annotations

import ast
import csv
import hashlib
import os
import re
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from audit_fixtures import make_faulty_dataset, scene, write_rgb
from conftest import REPO, run_script

import audit_dataset
import split_dataset
import train
import utils.image_hash as image_hash
from utils.cli import run_cli
from utils.image_hash import (
    DuplicateGroup,
    Link,
    crowding_limit,
    expected_unrelated_pairs,
    find_duplicate_groups,
    fingerprint_files,
    group_keys,
    hash_pairs,
    links_to_groups,
    popcount,
)
from utils.split import plan_split

# One OpenMP thread per process: on 2 shared cores a 2-thread team waits at every layer for its
# descheduled half (bench/RESULTS.md), which made the K-fold training 5-10x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
QUICK = ["--folds", "3", "--epochs", "3", "--input_shape", "32"]  # small and fast; the defaults are 5, 4, auto


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under root: (sha1, size, mtime_ns); equal snapshots = nothing modified."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            info = path.stat()
            files[str(path.relative_to(root))] = (hashlib.sha1(path.read_bytes()).hexdigest(), info.st_size,
                                                  info.st_mtime_ns)
    return files


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def grouped_pairs(rows: list[dict[str, str]]) -> set[frozenset]:
    members = defaultdict(list)
    for row in rows:
        members[row["group"]].append(row["path"])
    return {frozenset((a, b)) for paths in members.values() for a in paths for b in paths if a < b}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    root = tmp_path_factory.mktemp("faulty") / "data"
    planted = make_faulty_dataset(root)
    return root, planted, snapshot(root)


def audit(*args: str, out: Path) -> Path:
    result = run_script("audit_dataset.py", *args, "--out", str(out), "--log_dir", str(out.parent / "logs"),
                        env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert f"report: {out / 'report.md'}" in result.stdout
    return out


@pytest.fixture(scope="module")
def quick_audit(faulty, tmp_path_factory) -> Path:
    """The audit without --weights: K-fold training of resnet18 for the label issues."""
    return audit("--dataset_path", str(faulty[0]), *QUICK, out=tmp_path_factory.mktemp("quick") / "audit")


@pytest.fixture(scope="module")
def weights_audit(faulty, tmp_path_factory) -> Path:
    """A checkpoint trained on the faulty data by train.py, then the audit with --weights."""
    logs = tmp_path_factory.mktemp("train")
    result = run_script("train.py", "--dataset_path", str(faulty[0]), "--model", "resnet18", "--input_shape", "32",
                        "--resize_mode", "stretch", "--epochs", "3", "--hflip", "0", "--crop_scale", "0.8",
                        "--workers", "0", "--log_dir", str(logs), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    (weights,) = logs.glob("*/best.pth")
    return audit("--dataset_path", str(faulty[0]), "--weights", str(weights), out=logs / "audit")


# ---- acceptance: the planted faults are found -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("run", ["quick_audit", "weights_audit"])
def test_planted_duplicates_are_found_with_few_false_pairs(run, faulty, request):
    _, planted, _ = faulty
    rows = read_csv(request.getfixturevalue(run) / "duplicates.csv")
    assert list(rows[0]) == ["group", "path", "split", "class", "kind", "distance", "crosses_splits", "crosses_classes"]
    found = grouped_pairs(rows)
    planted_pairs = planted.duplicate_pairs
    assert len(found & planted_pairs) >= 0.75 * len(planted_pairs)  # 11 of 12 in practice
    assert len(found - planted_pairs) <= 2  # 0 in practice
    for how in ("resized", "recompressed", "cropped"):
        assert any(frozenset((a, b)) in found for a, b, kind in planted.near_pairs if kind == how), how
    kind_of = {row["path"]: row["kind"] for row in rows}
    assert all(kind_of[copy] == "exact" for _, copy in planted.exact_pairs)
    leaks = {row["path"] for row in rows if row["crosses_splits"] == "yes"}
    assert all(copy in leaks for _, copy in planted.exact_pairs)  # every planted copy sits in val
    assert not any(row["crosses_classes"] == "yes" for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("run, at_least", [("quick_audit", 5), ("weights_audit", 3)])
def test_flipped_labels_rank_at_the_top(run, at_least, faulty, request):
    """8 flips among 134 files: a random ranking puts about 1 of them in the top 16."""
    _, planted, _ = faulty
    rows = read_csv(request.getfixturevalue(run) / "label_issues.csv")
    assert list(rows[0]) == ["rank", "path", "split", "given", "suggested", "quality"]
    assert [int(row["rank"]) for row in rows] == list(range(1, len(rows) + 1))
    qualities = [float(row["quality"]) for row in rows]
    assert qualities == sorted(qualities)  # most suspect (lowest quality) first
    top = [row["path"] for row in rows[:2 * len(planted.flipped)]]
    assert sum(path in top for path in planted.flipped) >= at_least
    flipped_rows = [row for row in rows if row["path"] in planted.flipped]
    assert all(row["suggested"] != row["given"] for row in flipped_rows)
    assert not any(path in {row["path"] for row in rows} for path in planted.unreadable)


@pytest.mark.slow
def test_report_pictures_and_unreadable_files(quick_audit, weights_audit, faulty):
    root, planted, _ = faulty
    for out in (quick_audit, weights_audit):
        report = (out / "report.md").read_text(encoding="utf-8")
        for section in ("## Suggestions", "## Duplicates", "## Label issues", "## Images per class and split",
                        "## Image sizes, colour and formats", "### Unreadable files (2)", "## Timings"):
            assert section in report
        assert all(path in report for path in planted.unreadable)
        assert "empty file" in report and int(re.search(r"spanning splits \(leakage\): (\d+)", report)[1]) >= 9
        assert "duplicate group(s) span splits" in report  # the suggestion to fix the leak
        for picture in ("class_counts.png", "image_sizes.png", "duplicates.jpg", "label_issues.jpg"):
            image = cv2.imread(str(out / picture))
            assert image is not None and min(image.shape[:2]) > 100, picture
        assert [row["path"] for row in read_csv(out / "unreadable.csv")] == sorted(planted.unreadable)
    quick = (quick_audit / "report.md").read_text(encoding="utf-8")
    assert re.search(r"3-fold training of resnet18 from scratch \(3 epochs, input 32x32, .*\); took [\d.]+ s", quick)
    weights = (weights_audit / "report.md").read_text(encoding="utf-8")
    assert "5-fold logistic regression on the embeddings; took" in weights and "Embeddings: resnet18 from" in weights


@pytest.mark.slow
def test_the_dataset_is_never_modified(quick_audit, weights_audit, faulty):
    root, _, before = faulty
    assert snapshot(root) == before
    assert not (root / "logs").exists() and not list(root.rglob("*.sqlite"))


# ---- report suggestions name real flags ---------------------------------------------------------------


def _parser_flags(*parsers) -> set[str]:
    return {option for parser in parsers for action in parser._actions for option in action.option_strings}


def test_unsplit_wide_grey_imbalanced_tree_gets_real_flag_suggestions(tmp_path, capsys):
    """An unsplit tree of wide grayscale images, 6 vs 2 per class, duplicates and labels skipped."""
    rng = np.random.default_rng(1)
    for name, count in (("big", 6), ("small", 2)):
        for k in range(count):
            grey = cv2.resize(rng.integers(0, 256, (4, 8), dtype=np.uint8), (200, 80), interpolation=cv2.INTER_CUBIC)
            write_rgb(tmp_path / "data" / name / f"{k}.png", np.repeat(grey[..., None], 3, axis=2))
    run_cli(lambda: audit_dataset.main(["--dataset_path", str(tmp_path / "data"), "--no_labels",
                                        "--out", str(tmp_path / "out"), "--log_dir", str(tmp_path / "logs")]))
    assert "note: label issues: skipped (--no_labels)" in capsys.readouterr().out
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    tips = report.split("## Suggestions")[1].split("\n## ")[0]
    for expected in ("python split_dataset.py --src", "--class_weights auto", "--resize_mode letterbox",
                     "--input_shape 64 160", "--color_jitter", "Classes are imbalanced (3.0x)"):
        assert expected in tips, expected
    known = _parser_flags(train.get_args_parser(), split_dataset.get_args_parser(), audit_dataset.get_args_parser())
    used = set(re.findall(r"--[a-z_]+", tips))
    assert used and used <= known, used - known
    assert {row["split"] for row in read_csv(tmp_path / "out" / "duplicates.csv")} <= {"all"}
    assert read_csv(tmp_path / "out" / "label_issues.csv") == [] and not (tmp_path / "out" / "label_issues.jpg").exists()


# ---- utils/image_hash.py ----------------------------------------------------------------------------


def test_second_run_reads_the_hash_cache_and_rehashes_only_changed_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = [write_rgb(tmp_path / "images" / f"{k}.png", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
             for k in range(5)]
    cache = tmp_path / "cache" / "hashes.sqlite"
    first = fingerprint_files(paths, cache)
    computed = []
    real = image_hash.compute_fingerprint
    monkeypatch.setattr(image_hash, "compute_fingerprint", lambda path: computed.append(path) or real(path))
    assert fingerprint_files(paths, cache) == first and computed == []  # all from the cache
    write_rgb(Path(paths[2]), rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))  # new size and mtime
    again = fingerprint_files(paths, cache)
    assert computed == [paths[2]] and again[2].width == 20 and again[2].sha1 != first[2].sha1
    assert again[:2] == first[:2] and again[3:] == first[3:]


def test_a_damaged_cache_only_costs_speed(tmp_path):
    image = write_rgb(tmp_path / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    cache = tmp_path / "hashes.sqlite"
    cache.write_bytes(b"this is not an sqlite database" * 100)
    with pytest.warns(UserWarning, match="hash cache"):
        (fingerprint,) = fingerprint_files([image], cache)
    assert fingerprint.readable and fingerprint.grayscale and fingerprint.format == "PNG"


def test_unreadable_files_get_a_reason_not_an_exception(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    paths = [str(tmp_path / "empty.png"), str(tmp_path / "text.jpg"), str(tmp_path / "gone.png")]
    reasons = [fp.error for fp in fingerprint_files(paths)]
    assert reasons[0] == "empty file" and "unreadable image" in reasons[1] and "cannot read" in reasons[2]
    assert find_duplicate_groups(paths) == []  # unreadable files are never duplicates of each other


def test_hash_pairs_match_a_brute_force_count_in_any_block_size(monkeypatch):
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 300, dtype=np.uint64)
    hashes[10] = hashes[20] ^ np.uint64(0b1011)  # 3 bits apart
    bits = np.array([[bin(int(a) ^ int(b)).count("1") for b in hashes] for a in hashes])
    expected = {(i, j) for i in range(300) for j in range(i + 1, 300) if bits[i, j] <= 22}
    histogram = np.bincount(bits[np.triu_indices(300, 1)], minlength=65)
    for block in (1 << 22, 1000, 1):
        monkeypatch.setattr(image_hash, "PAIR_BLOCK_ELEMENTS", block)
        links, counts = hash_pairs(hashes, 22)
        assert {(link.first, link.second) for link in links} == expected and (10, 20, 3.0) in {
            (link.first, link.second, link.distance) for link in links}
        assert all(link.distance == bits[link.first, link.second] for link in links)
        assert (counts == histogram).all()
    assert (popcount(hashes) == [bin(int(h)).count("1") for h in hashes]).all()


def test_the_perceptual_limit_drops_where_unrelated_images_crowd_together():
    from math import comb

    pairs = 5000 * 4999 // 2
    independent = np.array([pairs * comb(64, d) / 2**64 for d in range(65)])  # random bits: nobody near
    assert crowding_limit(independent, 10, 5000) == 10 and expected_unrelated_pairs(independent, 10) < 1
    with_copies = independent.copy()
    with_copies[2] += 200  # many true near copies are no sign of crowding: the tail above 10 bits decides
    assert crowding_limit(with_copies, 10, 5000) == 10
    look_alike = np.array([10 ** (d / 4) for d in range(65)])  # x10 pairs every 4 bits closer: far too close
    assert 0.5 < expected_unrelated_pairs(look_alike, 10) / np.cumsum(look_alike)[10] < 2
    limit = crowding_limit(look_alike, 10, 5000)
    assert expected_unrelated_pairs(look_alike, limit, 10) <= 10 < expected_unrelated_pairs(look_alike, limit + 1, 10)
    assert -1 <= crowding_limit(look_alike, 10, 10) < limit  # 10 images tolerate 1 such pair, 5000 tolerate 10


def test_groups_are_connected_parts_and_members_keep_their_strongest_link():
    paths = [f"{name}.png" for name in "abcdef"]
    links = [Link(0, 1, "perceptual", 6), Link(1, 2, "embedding", 0.05), Link(0, 1, "exact", 0), Link(4, 5, "perceptual", 3)]
    groups = links_to_groups(paths, links)
    assert [g.paths for g in groups] == [["a.png", "b.png", "c.png"], ["e.png", "f.png"]]
    assert [(m.kind, m.distance) for m in groups[0].members] == [("exact", 0), ("exact", 0), ("embedding", 0.05)]
    assert groups[0].spans({"a.png": "train", "c.png": "val"}) and not groups[1].spans({"e.png": "train"})


def test_embedding_links_are_close_mutual_nearest_neighbours_with_close_hashes():
    from inference.audit import EMBEDDING_MAX_BITS, embedding_links

    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(8, 16)) + 100.0  # a large shared offset, as after a ReLU: centring removes it
    embeddings[1] = embeddings[0] + rng.normal(scale=0.01, size=16)  # row 1 ~ row 0, close hashes: linked
    embeddings[3] = embeddings[2] + rng.normal(scale=0.01, size=16)  # row 3 ~ row 2, hashes far apart: not
    hashes = np.array([0, 0b111, 0, 2**(EMBEDDING_MAX_BITS + 1) - 1, 0, 0, 0, 0], dtype=np.uint64)
    links = embedding_links(embeddings, list(range(10, 18)), 0.9, hashes)
    assert [(link.first, link.second, link.kind) for link in links] == [(10, 11, "embedding")]
    assert 0 <= links[0].distance < 0.01
    # a class embedded alike (all similarities above 0.99) with look-alike hashes: only mutual
    # nearest neighbours pair up, so nothing chains into one big group
    collapsed = np.ones((60, 16)) + rng.normal(scale=0.001, size=(60, 16))
    collapsed[:, 0] += np.repeat([0.0, 1.0], 30)  # two classes, so centring leaves a class direction
    links = embedding_links(collapsed, list(range(60)), 0.9, np.zeros(60, dtype=np.uint64))
    groups = links_to_groups([str(i) for i in range(60)], links)
    assert links and all(len(group.members) == 2 for group in groups)


def test_label_issues_from_embeddings_leave_out_single_image_classes():
    from inference.audit import AuditDataset, AuditItem, AuditOptions, label_issues

    rng = np.random.default_rng(0)
    names = ["cat", "dog", "rare"]
    labels = [0] * 30 + [1] * 30 + [2]
    items = [AuditItem(f"{i}.png", "train", names[label], label) for i, label in enumerate(labels)]
    centres = np.array([[4.0] * 8, [-4.0] * 8, [0.0] * 8])
    embeddings = centres[labels] + rng.normal(size=(61, 8))
    flipped = [3, 40]  # a cat filed as dog, a dog filed as cat
    for i in flipped:
        items[i] = AuditItem(items[i].path, "train", names[1 - labels[i]], 1 - labels[i])
    notes: list[str] = []
    result = label_issues(AuditDataset("root", names, items, True), list(range(61)), embeddings,
                          AuditOptions(folds=5), notes, 32)
    assert notes == ["label issues: left out class(es) with a single readable image: rare"]
    assert result is not None and 60 not in result.indices and result.probs.shape == (60, 3)
    assert sorted(result.indices[p] for p in result.issues[:2]) == flipped
    assert result.source == "5-fold logistic regression on the embeddings"
    one_class = [AuditItem(f"{i}.png", "train", "cat", 0) for i in range(10)] + [items[60]]
    assert label_issues(AuditDataset("root", names, one_class, True), list(range(11)), embeddings[:11],
                        AuditOptions(), notes, 32) is None
    assert notes[-1].startswith("label issues: fewer than two classes")


def test_api_for_split_planning_keeps_near_duplicates_in_one_split(faulty):
    """How split_dataset.py can use it: the group key as the 'hash' plan_split keeps together."""
    root, planted, _ = faulty
    files: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.*")):
        files[path.parent.name].append(str(path))
    groups = find_duplicate_groups([p for paths in files.values() for p in paths])
    assert all(isinstance(group, DuplicateGroup) for group in groups)
    plan = plan_split(files, val_ratio=0.3, seed=3, hashes=group_keys(groups))
    split_of = {item.path: item.split for item in plan.assignments}
    assert len(groups) >= 10 and not any(group.spans(split_of) for group in groups)


# ---- bad input ----------------------------------------------------------------------------------------


def fatal(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: audit_dataset.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line_and_exit_2(faulty, tmp_path, capsys):
    root = str(faulty[0])
    data = ["--dataset_path", root, "--log_dir", str(tmp_path / "logs")]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert "--dataset_path is required" in fatal([], capsys)
    assert "--dataset_path nope does not exist" in fatal(["--dataset_path", "nope"], capsys)
    assert "holds no class folders with images" in fatal(["--dataset_path", str(tmp_path / "empty")], capsys)
    assert "--folds must be at least 2, got 1" in fatal([*data, "--folds", "1"], capsys)
    assert "--phash_distance must be in -1..64" in fatal([*data, "--phash_distance", "65"], capsys)
    assert "--weights missing.pth does not exist" in fatal([*data, "--weights", "missing.pth"], capsys)
    assert "is not a readable PyTorch checkpoint" in fatal([*data, "--weights", str(tmp_path / "junk.pth"),
                                                            "--out", str(tmp_path / "o1")], capsys)
    assert "unknown --model 'resnet_18'" in fatal([*data, "--model", "resnet_18"], capsys)
    assert "already exists and is not an empty folder" in fatal([*data, "--out", str(tmp_path / "full")], capsys)
    assert "is inside the dataset" in fatal([*data, "--out", str(faulty[0] / "report")], capsys)
    assert "is inside the dataset" in fatal([*data, "--cache_dir", str(faulty[0] / "cache")], capsys)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (faulty[0] / "report").exists()


def test_the_script_itself_exits_2_with_one_line(tmp_path):
    result = run_script("audit_dataset.py", "--dataset_path", str(tmp_path / "nope"))
    assert result.returncode == 2 and result.stderr == f"error: --dataset_path {tmp_path / 'nope'} does not exist " \
                                                       "or is not a folder\n"


@pytest.mark.parametrize("doc", ["docs/audit.md", "docs/zh-CN/audit.md"])
def test_the_docs_name_every_flag_and_the_defaults_match_the_code(doc):
    from inference.audit import DEFAULT_MIN_SIMILARITY, AuditOptions
    from utils.image_hash import DEFAULT_MAX_DISTANCE

    text = (REPO / doc).read_text(encoding="utf-8")
    parser = audit_dataset.get_args_parser()
    flags = [next(o for o in a.option_strings if o.startswith("--")) for a in parser._actions if a.dest != "help"]
    assert [flag for flag in flags if f"`{flag}`" not in text] == []
    defaults = parser.parse_args([])
    assert (defaults.phash_distance, defaults.min_similarity) == (DEFAULT_MAX_DISTANCE, DEFAULT_MIN_SIMILARITY)
    options = AuditOptions()
    assert (defaults.folds, defaults.epochs, defaults.model, defaults.top) == (
        options.folds, options.epochs, options.model, options.top)


# ---- layering ---------------------------------------------------------------------------------------

FLOOR = {"utils": 1, "models": 2, "inference": 3}


@pytest.mark.parametrize("path, floor", [("utils/image_hash.py", 1), ("inference/audit.py", 3),
                                         ("inference/audit_report.py", 3)])
def test_imports_only_go_down(path, floor):
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    modules = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    ours = [m for m in modules if m.split(".")[0] in FLOOR or os.path.isfile(REPO / f"{m.split('.')[0]}.py")]
    assert all(FLOOR.get(m.split(".")[0], 4) <= floor for m in ours), ours


def test_a_large_jpeg_is_hashed_from_a_reduced_decode_with_its_full_size(tmp_path):
    """The hash shrinks every image to HASH_SIDE, so a large JPEG is decoded smaller for it; the
    fingerprint still records the size training sees (EXIF rotation applied) and the same pHash
    as a full decode. A 2048 x 1536 picture stored turned (EXIF orientation 6)."""
    from PIL import Image

    from utils.data import read_rgb
    from utils.image_hash import compute_fingerprint, perceptual_hash

    rng = np.random.default_rng(3)
    picture = cv2.resize(scene(rng, 1, side=64), (1536, 2048), interpolation=cv2.INTER_CUBIC)
    picture = np.clip(picture.astype(np.int16) + rng.integers(-8, 9, picture.shape), 0, 255).astype(np.uint8)
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(picture, 1)))  # 2048 wide, 1536 tall on disk
    exif = stored.getexif()
    exif[0x0112] = 6  # shown a quarter turn clockwise: 1536 wide, 2048 tall
    path = tmp_path / "turned photo é.jpg"
    stored.save(path, exif=exif.tobytes(), quality=90)
    assert read_rgb(path, [128, 128]).shape == (512, 384, 3)  # what the hash decodes: 1/4
    fingerprint = compute_fingerprint(str(path))
    assert (fingerprint.width, fingerprint.height) == (1536, 2048)
    assert fingerprint.phash == perceptual_hash(read_rgb(path))
