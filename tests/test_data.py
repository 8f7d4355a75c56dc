"""The image reader, the dataset scan and the transforms, on real files of every awkward kind."""

from __future__ import annotations

import os
import re
import sqlite3

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from conftest import make_class_tree, run_script_with_permissions, write_blank_png, write_image
from PIL import Image

from utils.cache import cache_datasets
from utils.data import (
    MAX_IMAGE_PIXELS,
    UNREADABLE,
    ImageDataset,
    ImageReadError,
    check_image,
    create_dataloader,
    read_rgb,
    scan_dataset,
)
from utils.engine import StepSettings, evaluate
from utils.errors import UsageError
from utils.metrics import ClassificationMetrics
from utils.transforms import (
    MAX_RESIZE_FACTOR,
    Preprocess,
    ResizeCover,
    build_eval_transform,
    build_train_transform,
    normalize_batch,
    parse_input_shape,
)


def _save_pil(image: Image.Image, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def test_every_image_kind_becomes_rgb_uint8(tmp_path):
    gray = _save_pil(Image.new("L", (10, 6), 77), tmp_path / "gray.png")
    rgba = _save_pil(Image.new("RGBA", (10, 6), (10, 20, 30, 0)), tmp_path / "rgba.png")
    palette = _save_pil(Image.new("RGB", (10, 6), (200, 10, 10)).convert("P"), tmp_path / "palette.gif")
    deep = _save_pil(Image.fromarray(np.full((6, 10), 65535, np.uint16)), tmp_path / "sixteen.png")
    cmyk = _save_pil(Image.new("CMYK", (10, 6), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    webp = _save_pil(Image.new("RGB", (10, 6), (0, 0, 250)), tmp_path / "blue.webp")
    for path in (gray, rgba, palette, deep, cmyk, webp):
        image = read_rgb(path)
        assert image.dtype == np.uint8 and image.shape == (6, 10, 3), path.name
    assert read_rgb(gray)[0, 0].tolist() == [77, 77, 77]
    assert read_rgb(deep)[0, 0].tolist() == [255, 255, 255]  # 16-bit white stays white, not clipped noise
    assert read_rgb(palette)[0, 0, 0] > 150 and read_rgb(palette)[0, 0, 2] < 60  # red stays red (RGB order)
    assert read_rgb(webp)[0, 0, 2] > 200 and read_rgb(webp)[0, 0, 0] < 30


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save_pil(image, tmp_path / "rotated.jpg", exif=exif)
    assert read_rgb(path).shape == (40, 20, 3)


def test_non_ascii_and_spaced_paths(tmp_path):
    path = write_image(tmp_path / "données é" / "花 朵.png", np.full((5, 7, 3), 9, np.uint8))
    assert read_rgb(path).shape == (5, 7, 3)


def test_unreadable_files_raise_a_named_error(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        read_rgb(bad)


def test_scan_reports_skips_and_orders_classes_naturally(tmp_path):
    root = make_class_tree(tmp_path / "ds", {"class10": 2, "class2": 2, "class1": 2})
    (root / "train" / "class2" / "broken.png").write_bytes(b"garbage")
    (root / "train" / "class2" / ".hidden.png").write_bytes(b"garbage")
    (root / "train" / "class2" / "notes.txt").write_text("not an image")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    scan = scan_dataset(root)
    assert scan.class_names == ["class1", "class2", "class10"]
    assert scan.counts("train") == [2, 2, 2] and scan.counts("val") == [2, 2, 2]
    assert [p for p, _ in scan.skipped] == [str(root / "train" / "class2" / "broken.png")]
    assert "broken.png" in scan.report() and "Skipped 1 file" in scan.report()


def test_val_may_lack_a_class_but_not_add_one(tmp_path):
    root = make_class_tree(tmp_path / "ds", {"a": 2, "b": 2}, splits=("train",))
    make_class_tree(root, {"a": 2}, splits=("validation",))
    scan = scan_dataset(root)
    assert scan.missing_classes == {"val": ["b"]} and "no images of: b" in scan.report()
    make_class_tree(root, {"a": 1, "b": 1, "zebra": 1}, splits=("test",))
    with pytest.raises(UsageError, match="zebra"):
        scan_dataset(root)


@pytest.mark.parametrize("layout, message", [
    ("no_val", "no val/"),
    ("empty_class", "empty class folder"),
    ("unsplit", "--val_ratio"),
    ("nothing", "neither train/"),
])
def test_layout_errors_are_clear(tmp_path, layout, message):
    root = tmp_path / "ds"
    if layout == "no_val":
        make_class_tree(root, {"a": 1}, splits=("train",))
    elif layout == "empty_class":
        make_class_tree(root, {"a": 1}, splits=("train", "val"))
        (root / "train" / "b").mkdir()
    elif layout == "unsplit":
        make_class_tree(tmp_path, {"a": 3}, splits=("ds",))
    else:
        root.mkdir()
    with pytest.raises(UsageError, match=message):
        scan_dataset(root)


def test_unsplit_tree_is_split_in_memory_without_copying(tmp_path):
    make_class_tree(tmp_path, {"a": 10, "b": 10}, splits=("ds",))
    before = sorted(p.name for p in (tmp_path / "ds").rglob("*"))
    scan = scan_dataset(tmp_path / "ds", val_ratio=0.2, seed=3)
    assert scan.split_on_the_fly and scan.counts("val") == [2, 2] and scan.counts("train") == [8, 8]
    assert sorted(p.name for p in (tmp_path / "ds").rglob("*")) == before
    assert scan_dataset(tmp_path / "ds", val_ratio=0.2, seed=3).splits == scan.splits


def truncated_jpeg(path, seed: int = 0):
    """A JPEG cut in half: its header is valid, so the pre-scan passes it, but it cannot be decoded."""
    noise = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", noise)[1].tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:len(data) // 2])
    return path


def test_training_replaces_an_image_that_breaks_after_the_scan_by_one_of_its_class(tmp_path):
    bad = truncated_jpeg(tmp_path / "bad.jpg")
    assert check_image(str(bad)) is None  # the scan cannot tell
    other = write_image(tmp_path / "other.png", np.zeros((8, 8, 3), np.uint8))
    same = write_image(tmp_path / "same.png", np.full((8, 8, 3), 255, np.uint8))
    dataset = ImageDataset([(str(bad), 1), (str(other), 0), (str(same), 1)],
                           build_eval_transform(Preprocess(input_size=[4, 4])))
    with pytest.warns(UserWarning, match="bad.jpg"):
        image, label = dataset[0]
    assert label == 1 and image.shape == (3, 4, 4) and int(image.min()) == 255  # same.png, not other.png
    lonely = ImageDataset([(str(bad), 1), (str(other), 0)], build_eval_transform(Preprocess(input_size=[4, 4])))
    with pytest.warns(UserWarning):
        assert lonely[0][1] == 0  # no other image of its class: another class rather than a dead epoch


@pytest.mark.parametrize("cache", ["none", "ram"])
def test_evaluation_leaves_out_an_image_that_breaks_after_the_scan(tmp_path, cache):
    """Metrics over the readable images only, each counted once; the unreadable one is counted apart."""
    root = make_class_tree(tmp_path / "ds", {"a": 3, "b": 3}, size=16, splits=("val",))
    truncated_jpeg(root / "val" / "a" / "a_9.jpg")
    samples = [(str(path), 0) for path in sorted((root / "val" / "a").iterdir())]
    samples += [(str(path), 1) for path in sorted((root / "val" / "b").iterdir())]
    pre = Preprocess(input_size=[8, 8])
    dataset = ImageDataset(samples, build_eval_transform(pre), eval_size=pre.input_size)
    if cache == "ram":
        train_set = ImageDataset(samples[:1], build_eval_transform(pre))
        cache_datasets("ram", pre, train_set, [dataset])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    loader = create_dataloader(dataset, 4, False, 0, torch.device("cpu"))  # batch 1 mixes both kinds
    settings = StepSettings(torch.device("cpu"), pre)
    with pytest.warns(UserWarning, match="left out of the metrics: .*a_9.jpg"):
        metrics = evaluate(model, loader, nn.CrossEntropyLoss(), settings, 2, show_progress=False)
    assert metrics["count"] == 6 and metrics["unreadable"] == 1 and int(metrics["confusion"].sum()) == 6
    assert samples[3][0].endswith("a_9.jpg") and dataset[3][1] == UNREADABLE
    readable = [i for i in range(len(samples)) if i != 3]
    images = torch.stack([dataset[i][0] for i in readable])
    expected = ClassificationMetrics(2)
    with torch.inference_mode():
        expected.update(model(normalize_batch(images, pre)), torch.tensor([samples[i][1] for i in readable]))
    assert torch.equal(metrics["confusion"], expected.compute()["confusion"])


@pytest.mark.parametrize("mode", ["crop", "letterbox", "stretch"])
def test_eval_and_train_transforms_give_the_input_shape(mode):
    pre = Preprocess(input_size=[48, 32], resize_mode=mode)
    image = torch.randint(0, 256, (3, 100, 37), dtype=torch.uint8)
    assert build_eval_transform(pre)(image).shape == (3, 48, 32)
    for augment in ("none", "basic", "randaugment", "trivialaugment"):
        out = build_train_transform(pre, augment, color_jitter=0.2)(image)
        assert out.shape == (3, 48, 32) and out.dtype == torch.uint8


def test_letterbox_pads_with_the_mean_colour_so_padding_normalises_to_zero():
    pre = Preprocess(input_size=[20, 20], resize_mode="letterbox")
    wide = torch.full((3, 10, 40), 255, dtype=torch.uint8)
    out = build_eval_transform(pre)(wide)
    normalised = normalize_batch(out.unsqueeze(0), pre)[0]
    assert normalised[:, 0, :].abs().max() < 0.02  # top rows are padding
    assert normalised[:, 10, :].min() > 1.5  # the white image itself


def test_normalize_batch_matches_the_formula():
    pre = Preprocess()
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    assert torch.allclose(normalize_batch(images, pre), expected, atol=1e-5)


def test_input_shape_parsing():
    assert parse_input_shape([224]) == [224, 224]
    assert parse_input_shape([224, 160]) == [224, 160]
    with pytest.raises(UsageError, match="--input_shape"):
        parse_input_shape([1, 2, 3])


# ---- size limits (issue 11, item 4) ------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # utils.data filters it; pytest resets that
def test_images_over_the_size_limits_are_refused_from_the_header(tmp_path):
    """A 30000 x 30000 PNG (110 KB, 2.7 GB decoded) and a 1 x 200000 strip: refused by the reader
    before decoding, and left out by the training pre-scan with the same reason."""
    root = make_class_tree(tmp_path / "ds", {"a": 2, "b": 2}, size=8)
    huge = write_blank_png(root / "train" / "a" / "huge.png", 30000, 30000)
    strip = write_blank_png(root / "val" / "b" / "strip.png", 200000, 1)
    largest = write_blank_png(tmp_path / "largest.png", MAX_IMAGE_PIXELS // 10000, 10000)  # just within
    with pytest.raises(ImageReadError, match=f"too large: 900,000,000 pixels, over the limit of {MAX_IMAGE_PIXELS:,}"):
        read_rgb(huge)
    with pytest.raises(ImageReadError, match="extreme aspect ratio: 200000x1, over 100:1"):
        read_rgb(strip)
    assert check_image(str(largest)) is None
    scan = scan_dataset(root)
    reasons = dict(scan.skipped)
    assert set(reasons) == {str(huge), str(strip)}
    assert reasons[str(huge)].startswith("too large") and reasons[str(strip)].startswith("extreme aspect ratio")
    assert scan.counts("train") == [2, 2] and scan.counts("val") == [2, 2]


def test_crop_mode_never_resizes_a_strip_to_millions_of_pixels():
    """Crop mode enlarges the short side; the part of a long image that the crop never reaches is cut
    off first, so no working side exceeds MAX_RESIZE_FACTOR input sides. Usual images are untouched."""
    cover = ResizeCover([224, 224], 0.875, T.InterpolationMode.BILINEAR)
    for height, width in [(1, 99), (2, 199), (40, 3960), (5000, 50)]:
        kept, resized = cover.working_region(height, width)
        assert max(resized) <= MAX_RESIZE_FACTOR * 224 and min(resized) >= 224
        assert cover(torch.zeros(3, height, width, dtype=torch.uint8)).shape == (3, 224, 224)
    big = ResizeCover([4096, 4096], 0.875, T.InterpolationMode.BILINEAR)
    assert max(big.working_region(1, 99)[1]) <= MAX_RESIZE_FACTOR * 4096  # was 4681 x 463,406
    image = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert cover.working_region(375, 500) == ([375, 500], [256, 341])
    whole = F.center_crop(F.resize(image, [256, 341], antialias=True), [224, 224])  # the rule, written out
    assert torch.equal(cover(image), whole)


@pytest.mark.parametrize("field, value, message", [
    ("input_size", [60000, 60000], "'preprocess.input_size' must be [height, width], whole numbers from 1 to 4096"),
    ("input_size", [0, 32], "whole numbers from 1 to 4096"),
    ("input_size", "224", "[height, width]"),
    ("std", [0, 0, 0], "'preprocess.std' must be 3 positive numbers"),
    ("std", [0.2, -0.2, 0.2], "3 positive numbers"),
    ("mean", [0.5, float("nan"), 0.5], "'preprocess.mean' must be 3 numbers"),
    ("crop_pct", 0, "'preprocess.crop_pct' must be a number above 0 and at most 1"),
    ("interpolation", "sideways", "'preprocess.interpolation' must be one of nearest, nearest-exact, bilinear"),
    ("resize_mode", ["crop"], "'preprocess.resize_mode' must be one of crop, letterbox, stretch"),
])
def test_stored_preprocessing_is_checked_field_by_field(field, value, message):
    record = {**Preprocess().to_dict(), field: value}
    with pytest.raises(UsageError, match=f"{re.escape(message)}.*, got "):
        Preprocess.from_dict(record)
    with pytest.raises(UsageError, match="field 'preprocess' must be a dict, got str"):
        Preprocess.from_dict("crop")
    assert Preprocess.from_dict({"input_size": (64, 48), "future_field": 1}).input_size == [64, 48]


def test_input_shape_has_an_upper_bound():
    assert parse_input_shape([4096]) == [4096, 4096]
    with pytest.raises(UsageError, match="--input_shape takes one or two sizes from 1 to 4096"):
        parse_input_shape([60000])


# ---- folders that cannot be listed (issue 11, item 8) ------------------------------------------

@pytest.mark.skipif(os.name == "nt", reason="chmod 000 does not lock a folder on Windows")
def test_training_names_a_class_folder_it_cannot_list(tmp_path):
    """Was "empty class folder(s) ...: add images": now the folder and the OS error, exit 2."""
    root = make_class_tree(tmp_path / "ds", {"a": 2, "b": 2}, size=8)
    locked = root / "train" / "b"
    locked.chmod(0)
    try:
        result = run_script_with_permissions("train.py", "--dataset_path", str(root), "--epochs", "1",
                                             "--log_dir", str(tmp_path / "logs"), locked=locked)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: cannot list folder {locked}: Permission denied\n"
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_the_pre_scan_caches_its_header_checks_and_checks_a_changed_file_again(tmp_path, monkeypatch):
    """A second scan of unchanged files opens none of them; a file rewritten since (new mtime and
    size) is checked again, and a broken one is left out although its old verdict was 'readable'."""
    import utils.data as data

    root = make_class_tree(tmp_path / "ds", {"a": 2, "b": 2}, size=16)  # train/ and val/: 8 files
    cache = tmp_path / "logs" / ".cache" / "image_hashes.sqlite"
    opened = []
    real_check = data.check_image
    monkeypatch.setattr(data, "check_image", lambda path: opened.append(path) or real_check(path))

    first = scan_dataset(root, check_cache=cache)
    assert len(opened) == 8 and not first.skipped and cache.is_file()
    opened.clear()
    second = scan_dataset(root, check_cache=cache)
    assert opened == [] and second.splits == first.splits

    changed = sorted((root / "train" / "a").iterdir())[0]
    changed.write_bytes(b"no longer an image")
    third = scan_dataset(root, check_cache=cache)
    assert opened == [str(changed)]
    assert [path for path, _ in third.skipped] == [str(changed)] and "unreadable image" in third.skipped[0][1]
    opened.clear()
    assert [path for path, _ in scan_dataset(root, check_cache=cache).skipped] == [str(changed)]
    assert opened == []  # the bad verdict is cached too


def test_the_stat_cache_stays_bounded_dropping_gone_files_first_then_the_oldest(tmp_path):
    from utils.stat_cache import StatCache, file_stat

    files = []
    for index in range(8):
        files.append(tmp_path / f"f{index}.txt")
        files[-1].write_text(str(index))
    cache = StatCache.open(tmp_path / "cache.sqlite", "facts", ["value"], version=1)
    cache.max_rows, cache.pruned_rows = 6, 4

    def kept() -> list[str]:
        values = cache.lookup([str(f) for f in files], [file_stat(f) or (0, 0) for f in files])
        return [f.name for f, value in zip(files, values) if value is not None]

    cache.store([(str(f), file_stat(f), [f.name]) for f in files[:6]])  # at the limit: nothing dropped
    assert kept() == [f"f{i}.txt" for i in range(6)]
    files[1].unlink()
    files[4].unlink()
    cache.store([(str(f), file_stat(f), [f.name]) for f in files[6:]])  # 8 entries: over the limit
    # the two gone files' entries go first; that leaves 6, still over 4: the two written longest ago go
    rows = {key for (key,) in sqlite3.connect(tmp_path / "cache.sqlite").execute("SELECT key FROM facts")}
    assert rows == {os.path.abspath(files[i]) for i in (3, 5, 6, 7)}, rows
    cache.store([(str(files[3]), file_stat(files[3]), ["again"])])  # rewritten: now the newest
    cache.max_rows, cache.pruned_rows = 3, 2
    cache.store([(str(files[0]), file_stat(files[0]), ["back"])])  # 5 entries: 5 and 6 written longest ago
    assert kept() == ["f0.txt", "f3.txt"]  # 5, 6 and 7 went; the rewritten 3 stayed, with its new value
    assert cache.lookup([str(files[3])], [file_stat(files[3])]) == [("again",)]
    cache.close()


def test_a_stopped_file_pool_drops_the_files_not_started():
    """Ctrl-C during a scan of many files: the pool finishes the running ones, not the whole queue
    (a plain `with ThreadPoolExecutor()` went on through all of them before the script could exit)."""
    import threading
    import time

    from utils.files import stoppable_thread_pool

    done = []
    lock = threading.Lock()

    def slow(item: int) -> int:
        time.sleep(0.01)
        with lock:
            done.append(item)
        return item

    with pytest.raises(KeyboardInterrupt), stoppable_thread_pool(2) as pool:
        results = pool.map(slow, range(300))  # held, as a progress bar holds it: not closed by the raise
        for result in results:
            if result == 3:
                raise KeyboardInterrupt
    assert 4 <= len(done) < 20, len(done)
    with stoppable_thread_pool(2) as pool:  # run to the end, it is a plain pool
        assert list(pool.map(slow, range(50))) == list(range(50))
