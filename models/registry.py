"""MODEL_CLASSES: every torchvision classification backbone, by name, with a `num_classes` head.

    model = create_model("resnet18", num_classes=5, input_size=(224, 224))

Most backbones take any input size above a minimum (global pooling before the head). A few are
built for one size: ViT and MaxViT get the requested size at construction (ViT needs a square
multiple of its patch size). GoogLeNet and Inception-v3 return auxiliary logits in training
mode; utils/engine.py adds their loss terms.
"""

from __future__ import annotations

import difflib
import re
import warnings
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torchvision
from natsort import natsorted

from utils.errors import UsageError
from utils.transforms import DEFAULT_INPUT_SIDE

# Smallest square input each family accepts, found by a forward pass (tests/test_models.py
# runs every entry at this size). Families not listed work from 16 pixels. ViT needs one patch
# at least; MaxViT needs multiples of 224 (its 7x7 windows at strides 4..32); Inception-v3's
# auxiliary head needs its native 299 in training.
_MIN_INPUT = {
    "alexnet": 63, "inception_v3": 299, "squeezenet": 24, "vgg": 32, "convnext": 32, "densenet": 32,
    "maxvit": 224,
}
_AUX_LOGIT_MODELS = ("googlenet", "inception_v3")
_SET_BY_BUILD = ("weights", "num_classes", "input_size", "image_size", "aux_logits", "init_weights", "progress")


def _family(name: str) -> str:
    for prefix in ("inception_v3", "squeezenet", "maxvit", "convnext", "densenet", "vgg"):
        if name.startswith(prefix):
            return prefix
    return name


def _vit_patch(name: str) -> int:
    return int(name.rsplit("_", 1)[1])  # vit_b_16 -> 16


def min_input_size(name: str) -> int:
    """Smallest square side `name` accepts."""
    if name.startswith("vit_"):
        return _vit_patch(name)
    return _MIN_INPUT.get(_family(name), 16)


def _build(name: str, num_classes: int, input_size: tuple[int, int] = (DEFAULT_INPUT_SIDE, DEFAULT_INPUT_SIDE), **extra) -> nn.Module:
    kwargs: dict = {"weights": None, "num_classes": num_classes, **extra}
    if name in _AUX_LOGIT_MODELS:
        kwargs.update(aux_logits=True, init_weights=True)  # explicit: silences torchvision's warning
    if name.startswith("vit_"):
        kwargs["image_size"] = input_size[0]
    if name.startswith("maxvit"):
        kwargs["input_size"] = tuple(input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torchvision.models.get_model(name, **kwargs)


MODEL_CLASSES: dict[str, Callable[..., nn.Module]] = {
    name: partial(_build, name) for name in sorted(torchvision.models.list_models(module=torchvision.models))
}


def check_model_name(name: str) -> None:
    """Raise a did-you-mean UsageError for names not in MODEL_CLASSES."""
    if name in MODEL_CLASSES:
        return
    close = difflib.get_close_matches(name, MODEL_CLASSES, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UsageError(f"unknown --model {name!r}.{hint} (python train.py --list_models shows all)")


def check_input_size(name: str, input_size: tuple[int, int]) -> None:
    """Raise a UsageError when `name` cannot take `input_size` (H, W)."""
    height, width = input_size
    smallest = min_input_size(name)
    if min(height, width) < smallest:
        raise UsageError(f"--input_shape {height} {width} is too small for {name}: it needs at least {smallest}")
    if name.startswith("vit_"):
        patch = _vit_patch(name)
        if height != width or height % patch:
            raise UsageError(
                f"{name} needs a square --input_shape that is a multiple of its patch size {patch} "
                f"(e.g. {max(patch, round(height / patch) * patch)}), got {height} {width}"
            )
    if name.startswith("maxvit") and (height % 224 or width % 224):
        raise UsageError(f"{name} needs an --input_shape made of multiples of 224, got {height} {width}")


def create_model(name: str, num_classes: int, input_size: tuple[int, int] = (DEFAULT_INPUT_SIDE, DEFAULT_INPUT_SIDE),
                 *, weights_follow: bool = False, **model_kwargs) -> nn.Module:
    """Build registry model `name` with a fresh `num_classes` head for inputs of `input_size`.

    `model_kwargs` go to the torchvision builder (the checkpoint keeps them, e.g. the
    `transform_input=True` that GoogLeNet/Inception use with ImageNet weights).
    weights_follow=True: the caller loads every weight next (`utils.checkpoint.load_model_weights`),
    so the model is built on the meta device, without the random initialisation it would throw away
    (0.1 s for resnet18, 0.5 s for vit_b_16, and no second copy of the weights in memory).
    """
    check_model_name(name)
    check_input_size(name, input_size)
    reserved = sorted(set(model_kwargs) & set(_SET_BY_BUILD))
    if reserved:  # e.g. "weights" would make torchvision download ImageNet weights
        raise UsageError(f"model_kwargs may not set {', '.join(reserved)} (the registry sets them)")
    build = partial(MODEL_CLASSES[name], num_classes=num_classes, input_size=tuple(input_size), **model_kwargs)
    try:
        if weights_follow:
            try:
                with torch.device("meta"):
                    return build()
            except NotImplementedError:  # a constructor that reads its own tensors (RegNet's): build for real
                pass
        return build()
    except TypeError as error:
        if not model_kwargs:
            raise
        raise UsageError(f"model_kwargs {model_kwargs} do not fit {name}: {error}") from None


def has_aux_logits(name: str) -> bool:
    return name in _AUX_LOGIT_MODELS


def format_model_list() -> str:
    """The registry grouped by family, for `train.py --list_models`."""
    groups: dict[str, list[str]] = {}
    for name in MODEL_CLASSES:
        family = "wide_resnet" if name.startswith("wide_") else re.sub(r"[\d_].*$", "", name)
        groups.setdefault(family, []).append(name)
    lines = [f"{len(MODEL_CLASSES)} models (python train.py --model NAME):"]
    lines += [f"  {family:<13} {' '.join(natsorted(names))}" for family, names in groups.items()]
    return "\n".join(lines)
