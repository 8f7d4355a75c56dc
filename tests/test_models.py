"""Every MODEL_CLASSES entry builds, and trains one step, at its smallest input."""

from __future__ import annotations

import pytest
import torch

from models.registry import MODEL_CLASSES, create_model, has_aux_logits, min_input_size
from utils.checkpoint import load_model_weights
from utils.engine import compute_loss
from utils.errors import UsageError

REQUIRED = (
    ["alexnet", "googlenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "squeezenet1_0",
     "squeezenet1_1", "resnext50_32x4d", "wide_resnet50_2", "efficientnet_v2_s", "efficientnet_v2_m",
     "efficientnet_v2_l", "swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b", "inception_v3"]
    + [f"vgg{n}{bn}" for n in (11, 13, 16, 19) for bn in ("", "_bn")]
    + [f"resnet{n}" for n in (18, 34, 50, 101, 152)]
    + [f"densenet{n}" for n in (121, 161, 169, 201)]
    + [f"mnasnet{n}" for n in ("0_5", "0_75", "1_0", "1_3")]
    + [f"shufflenet_v2_x{n}" for n in ("0_5", "1_0", "1_5", "2_0")]
    + [f"regnet_{k}_{s}" for k in "xy" for s in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")]
    + ["regnet_y_128gf"]
    + [f"efficientnet_b{n}" for n in range(8)]
    + [f"vit_{n}" for n in ("b_16", "b_32", "l_16", "l_32", "h_14")]
    + [f"convnext_{n}" for n in ("tiny", "small", "base", "large")]
)


def test_registry_covers_the_original_families():
    missing = [name for name in REQUIRED if name not in MODEL_CLASSES]
    assert not missing


@pytest.mark.parametrize("name", sorted(MODEL_CLASSES))
def test_forward_and_backward_at_smallest_input(name):
    torch.manual_seed(0)
    side = min_input_size(name)
    model = create_model(name, num_classes=3, input_size=(side, side))
    model.train()
    outputs = model(torch.randn(2, 3, side, side))
    loss, logits = compute_loss(outputs, torch.tensor([0, 2]), torch.nn.CrossEntropyLoss())
    assert logits.shape == (2, 3)
    assert isinstance(outputs, torch.Tensor) != has_aux_logits(name)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


# One model per torchvision module (the whole catalogue was checked once by hand: 65 built on the
# meta device, the 15 RegNets for real, all computing the same outputs).
ONE_PER_MODULE = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
                  "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
                  "resnet18", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t", "swin_v2_t", "vgg11_bn", "vit_b_32"]


@pytest.mark.parametrize("name", ONE_PER_MODULE)
def test_a_model_built_for_loaded_weights_computes_what_the_source_does(name):
    """weights_follow=True builds on the meta device (RegNet for real): every tensor must come from the weights."""
    side = min_input_size(name)
    source = create_model(name, num_classes=3, input_size=(side, side)).eval()
    built = create_model(name, num_classes=3, input_size=(side, side), weights_follow=True)
    assert next(built.parameters()).is_meta != name.startswith("regnet")  # no random initialisation to throw away
    load_model_weights(built, {key: value.half() for key, value in source.state_dict().items()}, "test")
    assert all(p.dtype == torch.float32 or not p.is_floating_point() for p in built.state_dict().values())
    source.load_state_dict(built.state_dict())  # the same fp16-rounded weights in both
    images = torch.randn(2, 3, side, side)
    with torch.inference_mode():
        assert torch.equal(built.eval()(images), source(images))


def test_unknown_model_suggests_close_names():
    with pytest.raises(UsageError, match="Did you mean: resnet18"):
        create_model("resnet19x", 2)


def test_input_too_small_is_a_clear_error():
    with pytest.raises(UsageError, match="too small for inception_v3"):
        create_model("inception_v3", 2, (160, 160))


def test_vit_is_built_for_the_requested_size_or_refuses():
    model = create_model("vit_b_32", 4, (64, 64))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    with pytest.raises(UsageError, match="square"):
        create_model("vit_b_32", 4, (64, 96))
    with pytest.raises(UsageError, match="multiple of its patch size 32"):
        create_model("vit_b_32", 4, (100, 100))
