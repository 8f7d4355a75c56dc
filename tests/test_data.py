"""The image reader, the dataset scan and the transforms, on real files of every awkward kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_class_tree, write_image
from PIL import Image

from utils.data import ImageDataset, read_rgb, scan_dataset
from utils.errors import UsageError
from utils.transforms import (
    Preprocess,
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


def test_dataset_skips_a_file_that_breaks_after_the_scan(tmp_path):
    good = write_image(tmp_path / "good.png", np.zeros((8, 8, 3), np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"broken")
    dataset = ImageDataset([(str(bad), 1), (str(good), 0)], build_eval_transform(Preprocess(input_size=[4, 4])))
    with pytest.warns(UserWarning, match="bad.png"):
        image, label = dataset[0]
    assert image.shape == (3, 4, 4) and label == 0


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
