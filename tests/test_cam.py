"""Grad-CAM support: the model -> original pixel mapping for every resize mode (issue 14)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from utils.transforms import Preprocess, build_eval_transform, model_to_original, original_to_model_axes


@pytest.mark.parametrize("mode", ["crop", "letterbox", "stretch"])
@pytest.mark.parametrize("shape", [(90, 160), (200, 70), (64, 64)])
def test_model_point_maps_back_to_the_original_pixel(mode, shape):
    """A bright square (big enough to survive the downscale) at a known place: after the eval
    transform, its brightest model pixel maps back onto it (within a model pixel of original pixels)."""
    pre = Preprocess(input_size=[32, 48], resize_mode=mode)
    height, width = shape
    for centre_y, centre_x in ((height // 2, width // 2), (height * 3 // 7, width * 4 // 7)):
        image = torch.zeros(3, height, width, dtype=torch.uint8)
        half = max(3, max(shape) // 20)
        image[:, centre_y - half:centre_y + half, centre_x - half:centre_x + half] = 255
        model_input = build_eval_transform(pre)(image).float().mean(0)
        y, x = divmod(int(model_input.argmax()), model_input.shape[1])
        ox, oy = model_to_original(x + 0.5, y + 0.5, (height, width), pre)
        per_pixel = max(height / 32, width / 48)  # original pixels one model pixel spans, at most
        assert abs(ox - centre_x) <= per_pixel + half and abs(oy - centre_y) <= per_pixel + half, (mode, ox, oy)
        assert 0 <= ox < width and 0 <= oy < height


@pytest.mark.parametrize("model_name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16"])
def test_a_heat_map_per_family(model_name):
    """Forward + CAM at 32 px: a finite map of the input's size, its peak inside the original image."""
    from inference.cam import HeatMaps
    from models.registry import create_model

    torch.manual_seed(0)
    pre = Preprocess(input_size=[32, 32], resize_mode="stretch")
    model = create_model(model_name, 3, (32, 32)).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    methods = ["gradcam", "eigencam"] if model_name in ("resnet18", "vit_b_16") else ["gradcam"]
    for method in methods:
        heat = HeatMaps(model, model_name, pre, torch.device("cpu"), method)
        maps = heat(images, [0, 2])
        assert maps.shape == (2, 32, 32) and (maps >= 0).all() and (maps <= 1).all(), method
        x, y = heat.peak(maps[0], (64, 96))
        assert 0 <= x < 96 and 0 <= y < 64 if maps[0].max() > 0 else math.isnan(x) and math.isnan(y)
    blank = heat.peak(np.zeros((32, 32), dtype=np.float32), (64, 96))  # nothing raised the score: no place
    assert math.isnan(blank[0]) and math.isnan(blank[1])


def test_clear_errors_for_a_wrong_layer_or_method():
    from inference.cam import HeatMaps
    from models.registry import create_model
    from utils.errors import UsageError

    pre = Preprocess(input_size=[32, 32])
    model = create_model("resnet18", 3, (32, 32)).eval()
    with pytest.raises(UsageError, match="--cam_layer layer9: resnet18 has no such layer"):
        HeatMaps(model, "resnet18", pre, torch.device("cpu"), layer_name="layer9")
    with pytest.raises(UsageError, match="--cam_method must be one of"):
        HeatMaps(model, "resnet18", pre, torch.device("cpu"), method="scorecam")
    with pytest.raises(UsageError, match="needs a PyTorch model"):
        HeatMaps(object(), "resnet18", pre, torch.device("cpu"))  # type: ignore[arg-type]
    assert HeatMaps(model, "resnet18", pre, torch.device("cpu"), layer_name="layer3").layer_name == "layer3"
    vit = create_model("vit_b_16", 3, (32, 32)).eval()  # its patch convolution gives no tokens to reshape
    with pytest.raises(UsageError, match="--cam_layer conv_proj: its output is not a map .* for vit_b_16"):
        HeatMaps(vit, "vit_b_16", pre, torch.device("cpu"), layer_name="conv_proj")
    googlenet = create_model("googlenet", 3, (64, 64)).eval()  # its auxiliary heads run in training only
    with pytest.raises(UsageError, match="--cam_layer aux1: the layer does not run in googlenet's forward pass"):
        HeatMaps(googlenet, "googlenet", Preprocess(input_size=[64, 64]), torch.device("cpu"), layer_name="aux1")


def test_default_layer_keeps_a_map_of_at_least_7x7():
    """At 64 px ResNet's layer4 is 2x2 (no location): the default moves to layer2 (8x8) and says so;
    at 224 px layer4 (7x7) stays; --cam_layer is taken as given, once its output is a map."""
    from inference.cam import MIN_MAP_SIDE, choose_layer, find_target_layer
    from models.registry import create_model
    from utils.errors import UsageError

    cpu = torch.device("cpu")
    model = create_model("resnet18", 3, (64, 64)).eval()
    name, size, why = choose_layer(model, "resnet18", (64, 64), cpu)
    assert (name, size) == ("layer2", (8, 8)) and min(size) >= MIN_MAP_SIDE
    assert "layer4 gives only 2x2 at the 64x64 input" in why
    assert choose_layer(model, "resnet18", (224, 224), cpu)[:2] == ("layer4", (7, 7))
    assert choose_layer(model, "resnet18", (64, 64), cpu, "layer4")[:2] == ("layer4", (2, 2))
    with pytest.raises(UsageError, match="--cam_layer layer4: its map is 1x1 at the 32x32 input"):
        choose_layer(model, "resnet18", (32, 32), cpu, "layer4")
    assert find_target_layer(model, "resnet18", input_size=(64, 64))[1] is model.layer2
    with pytest.raises(UsageError, match=r"--cam_layer fc: its output \(1, 3\) is not a map"):
        choose_layer(model, "resnet18", (64, 64), cpu, "fc")
    mobile = create_model("mobilenet_v3_small", 3, (64, 64)).eval()
    name, size, _ = choose_layer(mobile, "mobilenet_v3_small", (64, 64), cpu)
    assert name.startswith("features.") and min(size) >= MIN_MAP_SIDE


@pytest.mark.parametrize("mode", ["crop", "letterbox", "stretch"])
@pytest.mark.parametrize("shape", [(90, 160), (200, 70)])
def test_heat_map_lands_on_the_original_pixels(mode, shape):
    """A heat map hot at one model pixel, moved onto the original image: its hottest point is where
    model_to_original puts that pixel (the peak in cam_x/cam_y); what the model never saw is 0."""
    from inference.cam import heat_map_on_original

    pre = Preprocess(input_size=[32, 48], resize_mode=mode)
    height, width = shape
    per_pixel = max(height / 32, width / 48) if mode != "crop" else min(height / 32, width / 48) / pre.crop_pct
    (scale_x, offset_x), (scale_y, offset_y) = original_to_model_axes(shape, pre)
    for share_x, share_y in ((0.5, 0.5), (0.6, 0.4)):  # original points the model sees in every mode
        x, y = int(width * share_x * scale_x + offset_x), int(height * share_y * scale_y + offset_y)
        model_map = torch.zeros(32, 48)
        model_map[y, x] = 1.0
        picture = heat_map_on_original(model_map.numpy(), shape, pre)
        assert picture.shape == shape
        py, px = divmod(int(picture.argmax()), width)
        ox, oy = model_to_original(x + 0.5, y + 0.5, shape, pre)
        assert abs(px + 0.5 - ox) <= per_pixel and abs(py + 0.5 - oy) <= per_pixel, (mode, px, py, ox, oy)
    everywhere = heat_map_on_original(torch.ones(32, 48).numpy(), shape, pre, picture_size=(height // 2, width // 2))
    assert everywhere.shape == (height // 2, width // 2)
    if mode == "crop":  # the centre crop cut one axis: the cut-off ends are 0, the middle is 1
        assert everywhere.min() == 0 and everywhere[height // 4, width // 4] == 1
    else:  # stretch and letterbox show the whole image (the letterbox padding is dropped)
        assert everywhere.min() == 1


@pytest.mark.parametrize("model_name,side", [("swin_t", 32), pytest.param("maxvit_t", 224, marks=pytest.mark.slow)])
def test_a_heat_map_for_swin_and_maxvit(model_name, side):
    """Swin's stages are channels-last (B, H, W, C): reshaped to a grid; MaxViT's blocks are already
    (B, C, H, W). At their smallest inputs a finite map of the input's size comes out."""
    from inference.cam import MIN_MAP_SIDE, HeatMaps
    from models.registry import MODEL_CLASSES, create_model

    if model_name not in MODEL_CLASSES:
        pytest.skip(f"{model_name} is not in this torchvision")
    torch.manual_seed(0)
    pre = Preprocess(input_size=[side, side], resize_mode="stretch")
    model = create_model(model_name, 3, (side, side)).eval()
    heat = HeatMaps(model, model_name, pre, torch.device("cpu"))
    assert min(heat.map_size) >= MIN_MAP_SIDE, heat.description
    maps = heat(torch.randint(0, 256, (1, 3, side, side), dtype=torch.uint8), [1])
    assert maps.shape == (1, side, side) and bool(torch.isfinite(torch.from_numpy(maps)).all())
    assert maps.max() > 0  # a map with something in it, not all zeros from a wrong reshape


OBJECT_COLOURS = {"red": (230, 40, 40), "blue": (40, 80, 230)}  # the third class, "none", is noise only


def make_object_images(root, count: int, seed: int, side: int = 48, half: int = 4) -> dict:
    """<root>/<class>/<i>.png: grey noise with one small square whose colour decides the class, at a
    random place; "none" has no square, so both colours must be found (neither is "the other one").
    Returns {path: (x, y) of the square's centre} for the squares."""
    from conftest import write_image

    rng = np.random.default_rng(seed)
    centres = {}
    for name in (*OBJECT_COLOURS, "none"):
        for i in range(count):
            image = rng.integers(70, 186, size=(side, side, 3)).astype(np.uint8)
            path = root / name / f"{name}_{i}.png"
            if name in OBJECT_COLOURS:
                x, y = (int(v) for v in rng.integers(half, side - half, size=2))
                image[y - half:y + half, x - half:x + half] = OBJECT_COLOURS[name]
                centres[str(write_image(path, image))] = (x, y)
            else:
                write_image(path, image)
    return centres


@pytest.mark.slow
def test_heat_map_peak_finds_the_object_that_decides_the_class(tmp_path):
    """The acceptance test of issue 14: after a short real training (train.py), infer.py --cam puts
    the heat map's peak (cam_x, cam_y, original pixels of 48 px images seen at 32 px) on or near the
    square that decides the class, for most correctly classified held-out images: far above chance."""
    from conftest import run_script

    make_object_images(tmp_path / "data" / "train", 100, seed=0)
    make_object_images(tmp_path / "data" / "val", 20, seed=1)
    centres = make_object_images(tmp_path / "heldout", 20, seed=2)  # "none" images have no square to find
    trained = run_script("train.py", "--dataset_path", str(tmp_path / "data"), "--model", "resnet18",
                         "--input_shape", "32", "--resize_mode", "stretch", "--augment", "none", "--epochs", "3",
                         "--batch_size", "16", "--seed", "0", "--workers", "0", "--no_audit",
                         "--log_dir", str(tmp_path / "logs"))
    assert trained.returncode == 0, trained.stderr
    (run,) = [p for p in (tmp_path / "logs").iterdir() if p.is_dir() and not p.name.startswith(".")]
    result = run_script("infer.py", "--weights", str(run / "best.pth"), "--image_path", str(tmp_path / "heldout"),
                        "--cam", "--workers", "0", "--save_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "heat maps from layer layer1, a 8x8 map (layer4 gives only 1x1" in result.stdout
    (out,) = (tmp_path / "out").iterdir()
    rows = list(csv.DictReader((out / "predictions.csv").open(encoding="utf-8")))
    assert len(rows) == 60 and len(list((out / "cam").iterdir())) == 60
    correct = [row for row in rows if row["correct"] == "1" and row["path"] in centres]
    assert len(correct) >= 0.7 * len(centres), f"the model did not learn ({len(correct)} of {len(centres)} right)"
    radius, side = 9, 48
    near = [math.dist((float(row["cam_x"]), float(row["cam_y"])), centres[row["path"]]) <= radius for row in correct]
    chance = math.pi * radius ** 2 / side ** 2  # a peak thrown at random lands this often within the radius
    rate = sum(near) / len(near)
    assert rate >= max(0.75, 3 * chance), f"peak on the object for {rate:.0%} of right answers (chance {chance:.0%})"
