"""Grad-CAM support: the model -> original pixel mapping for every resize mode (issue 14)."""

from __future__ import annotations

import pytest
import torch

from utils.transforms import Preprocess, build_eval_transform, model_to_original


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
        assert 0 <= x < 96 and 0 <= y < 64


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
