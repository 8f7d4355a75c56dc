"""The one preprocessing definition, shared by training, evaluation, infer.py and the UI.

A `Preprocess` (stored in every checkpoint) says how an RGB uint8 image becomes model input:
    1. resize to `input_size` (H, W) by `resize_mode`:
         crop       resize so the image covers input_size / crop_pct, then centre crop
         letterbox  resize to fit inside input_size keeping aspect ratio, pad with the mean colour
         stretch    resize straight to input_size (aspect ratio not kept)
    2. (training only) augmentation on the uint8 tensor
    3. normalise with mean/std, batched on the device (`normalize_batch`): cheaper than per image
       in the DataLoader workers, and the DataLoader moves 4x fewer bytes as uint8.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F

from utils.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("crop", "letterbox", "stretch")
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")  # what resizing uint8 tensors supports
AUGMENTS = ("none", "basic", "randaugment", "trivialaugment", "autoaugment", "augmix")
TRAIN_CACHE_MARGIN = 1.25  # cached training images keep 25% more than the input size (see build_cache_transform)
DEFAULT_INPUT_SIDE = 224  # the one default input size (train.py, infer.py, export.py, the registry)
MAX_INPUT_SIDE = 4096  # a model input side beyond this is a mistake: 64 images of 4096^2 take 12 GiB as floats
# Crop mode enlarges the short side to the input size; an extreme strip would then grow to millions
# of pixels along its long side. No side of that intermediate image exceeds this many input sides.
MAX_RESIZE_FACTOR = 4


@dataclass
class Preprocess:
    """How to turn an image into model input; saved as a plain dict in the checkpoint."""

    input_size: list[int] = field(default_factory=lambda: [DEFAULT_INPUT_SIDE, DEFAULT_INPUT_SIDE])  # [H, W]
    resize_mode: str = "crop"
    crop_pct: float = 0.875  # crop mode: the centre crop keeps this fraction of the resized side
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> Preprocess:
        """The stored record (a checkpoint's "preprocess"), every field checked: a malformed one
        is a UsageError naming it (std 0 would give NaN probabilities, a huge input_size an
        out-of-memory kill). Missing fields take the defaults; unknown ones are ignored."""
        if not isinstance(values, Mapping):
            raise UsageError(f"field 'preprocess' must be a dict, got {type(values).__name__}")
        known = {name: value for name, value in values.items() if name in cls.__dataclass_fields__}
        for name, value in known.items():
            problem = _field_problem(name, value)
            if problem:
                raise UsageError(f"field 'preprocess.{name}' must be {problem}, got {value!r}")
        return cls(**{name: list(v) if isinstance(v, (list, tuple)) else v for name, v in known.items()})


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value: object, count: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == count and all(_is_number(v) for v in value)


def _field_problem(name: str, value: object) -> Optional[str]:
    """What stored preprocess field `name` must be, when `value` is not that; None when it is fine."""
    if name == "input_size":
        fine = _numbers(value, 2) and all(isinstance(side, int) and 1 <= side <= MAX_INPUT_SIDE for side in value)
        return None if fine else f"[height, width], whole numbers from 1 to {MAX_INPUT_SIDE}"
    if name == "crop_pct":
        return None if _is_number(value) and 0 < value <= 1 else "a number above 0 and at most 1"
    if name == "mean":
        return None if _numbers(value, 3) else "3 numbers (one per RGB channel)"
    if name == "std":
        return None if _numbers(value, 3) and min(value) > 0 else "3 positive numbers (one per RGB channel)"
    choices = {"resize_mode": RESIZE_MODES, "interpolation": INTERPOLATIONS}[name]
    return None if isinstance(value, str) and value in choices else f"one of {', '.join(choices)}"


def parse_input_shape(values: Sequence[int]) -> list[int]:
    """`--input_shape 224` -> [224, 224]; `--input_shape 224 160` -> [224, 160] (H, W)."""
    if len(values) not in (1, 2) or min(values) < 1 or max(values) > MAX_INPUT_SIDE:
        raise UsageError(f"--input_shape takes one or two sizes from 1 to {MAX_INPUT_SIDE} (H [W]), "
                         f"got {' '.join(map(str, values))}")
    return [values[0], values[0]] if len(values) == 1 else list(values)


def _interpolation(name: str) -> T.InterpolationMode:
    return T.InterpolationMode(name)


class ResizeCover(torch.nn.Module):
    """Resize keeping aspect ratio so the image covers `size` / `crop_pct`; then centre crop.

    Only the centre of a long image survives the crop, so where resizing all of it would make a
    side longer than MAX_RESIZE_FACTOR input sides, the part the crop never reaches is cut off
    first (`working_region`): a 1 x 20000 strip resizes 4 x 1 source pixels, not all 20000.
    """

    def __init__(self, size: Sequence[int], crop_pct: float, interpolation: T.InterpolationMode):
        super().__init__()
        self.size, self.crop_pct, self.interpolation = list(size), crop_pct, interpolation
        # the smallest source that still covers size / crop_pct: larger JPEGs may be decoded
        # smaller (utils.data.read_rgb's min_size); every eval transform has this attribute
        self.source_min_size = [math.ceil(side / crop_pct) for side in self.size]

    def working_region(self, height: int, width: int) -> tuple[list[int], list[int]]:
        """([source H, W] kept around the centre, [H, W] it is resized to before the centre crop)."""
        scale = max(self.size[0] / height, self.size[1] / width) / self.crop_pct
        kept, resized = [], []
        for side, target in zip((height, width), self.size):
            limit = MAX_RESIZE_FACTOR * target
            keep = side if round(side * scale) <= limit else min(side, math.ceil(limit / scale))
            if (side - keep) % 2:  # the same parity as the side keeps the cut exactly centred
                keep += 1 if keep == 1 else -1  # down: still 3+ input sides, well beyond the crop
            kept.append(keep)
            resized.append(max(target, round(keep * scale)))
        return kept, resized

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        kept, resized = self.working_region(*image.shape[-2:])
        if kept != list(image.shape[-2:]):
            image = F.center_crop(image, kept)
        image = F.resize(image, resized, interpolation=self.interpolation, antialias=True)
        return F.center_crop(image, self.size)


class Letterbox(torch.nn.Module):
    """Resize to fit inside `size` keeping aspect ratio, pad the rest with `fill` (the mean colour)."""

    def __init__(self, size: Sequence[int], fill: Sequence[int], interpolation: T.InterpolationMode):
        super().__init__()
        self.size, self.fill, self.interpolation = list(size), list(fill), interpolation
        self.source_min_size = list(self.size)  # fits inside size: no larger source is needed

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        scale = min(self.size[0] / height, self.size[1] / width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        image = F.resize(image, [new_h, new_w], interpolation=self.interpolation, antialias=True)
        top, left = (self.size[0] - new_h) // 2, (self.size[1] - new_w) // 2
        padding = [left, top, self.size[1] - new_w - left, self.size[0] - new_h - top]
        return F.pad(image, padding, fill=self.fill)


class Stretch(T.Resize):
    """Resize straight to `size`, aspect ratio not kept."""

    def __init__(self, size: Sequence[int], interpolation: T.InterpolationMode):
        super().__init__(list(size), interpolation=interpolation, antialias=True)
        self.source_min_size = list(size)


class ShrinkToCover(torch.nn.Module):
    """Shrink (never enlarge) keeping aspect ratio so the image still covers `size` x `margin`."""

    def __init__(self, size: Sequence[int], margin: float, interpolation: T.InterpolationMode):
        super().__init__()
        self.size, self.margin, self.interpolation = list(size), margin, interpolation
        self.source_min_size = [math.ceil(side * margin) for side in self.size]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        scale = max(self.size[0] / height, self.size[1] / width) * self.margin
        if scale >= 1:
            return image
        new_size = [max(1, round(height * scale)), max(1, round(width * scale))]
        return F.resize(image, new_size, interpolation=self.interpolation, antialias=True)


class RandomResizedCrop(T.RandomResizedCrop):
    """torchvision's RandomResizedCrop that can also draw its box before the image is decoded.

    `read(path, reader)` draws the box from the size in the JPEG's header (the same draws
    torchvision makes), then asks the reader (utils.data.read_rgb) for the image at the smallest
    size where the box still keeps the output size. A large JPEG is then decoded at 1/2, 1/4 or
    1/8 of its size wherever the box keeps twice that after the reduction: for 12 MP photos and a
    224 px input, most boxes (bench/bench_reduced_decode.py). The box is scaled with the image
    (`scale_box`): the same part of the picture, up to half a pixel of the reduced image.
    """

    def draw_box(self, height: int, width: int) -> dict:
        """{top, left, height, width}: torchvision's draw for an image of this size, no pixels needed."""
        size_only = torch.empty((), dtype=torch.uint8).expand(1, height, width)
        draw = getattr(self, "make_params", None) or self._get_params  # named so since torchvision 0.21
        return draw([size_only])

    def read(self, path: str, reader: Callable) -> torch.Tensor:
        drawn: list[tuple[int, int, dict]] = []

        def source_min_size(height: int, width: int) -> list[int]:
            box = self.draw_box(height, width)
            drawn.append((height, width, box))
            return [math.ceil(self.size[0] * height / box["height"]), math.ceil(self.size[1] * width / box["width"])]

        image = torch.from_numpy(reader(path, source_min_size)).permute(2, 0, 1)
        if not drawn:  # not a JPEG: decoded in full, the box is drawn now
            return self(image)
        height, width, box = drawn[0]
        scale = [image.shape[-2] / height, image.shape[-1] / width]
        if abs(scale[0] - scale[1]) > 0.1 * scale[1]:  # Pillow and OpenCV read a broken EXIF orientation apart
            return self(image)
        return F.resized_crop(image, *scale_box(box, scale, image.shape[-2:]), self.size,
                              interpolation=self.interpolation, antialias=True)


def scale_box(box: Mapping[str, int], scale: Sequence[float], bounds: Sequence[int]) -> list[int]:
    """[top, left, height, width] of a box drawn on a full-size image, on that image decoded at
    `scale` [y, x] of its size (`bounds` [H, W]): to the nearest pixel, so it moves by at most
    half a pixel of the smaller image, which for a random crop is as random a box."""
    top, left = round(box["top"] * scale[0]), round(box["left"] * scale[1])
    return [top, left, min(bounds[0] - top, max(1, round(box["height"] * scale[0]))),
            min(bounds[1] - left, max(1, round(box["width"] * scale[1])))]


class TrainTransform(T.Compose):
    """The training steps. `read(path, reader)` reads the file too, at the size the first step
    needs: the random crop's box (RandomResizedCrop.read), or the letterbox's output size."""

    def read(self, path: str, reader: Callable) -> torch.Tensor:
        first, *rest = self.transforms
        if isinstance(first, RandomResizedCrop):
            image = first.read(path, reader)
        else:
            image = first(torch.from_numpy(reader(path, getattr(first, "source_min_size", None))).permute(2, 0, 1))
        for step in rest:
            image = step(image)
        return image


def _mean_fill(pre: Preprocess) -> list[int]:
    return [round(m * 255) for m in pre.mean]  # pads to 0 after normalisation


def build_eval_transform(pre: Preprocess) -> Callable[[torch.Tensor], torch.Tensor]:
    """Deterministic resize of a uint8 CHW tensor to `pre.input_size` (eval, infer, UI).

    Its `source_min_size` is what a reader passes to utils.data.read_rgb as `min_size`, so that
    large JPEGs are decoded at a reduced size wherever this transform is used: train.py's
    evaluation, infer.py, the viewer and the audit all see the same pixels."""
    interpolation = _interpolation(pre.interpolation)
    if pre.resize_mode == "crop":
        return ResizeCover(pre.input_size, pre.crop_pct, interpolation)
    if pre.resize_mode == "letterbox":
        return Letterbox(pre.input_size, _mean_fill(pre), interpolation)
    if pre.resize_mode == "stretch":
        return Stretch(pre.input_size, interpolation)
    raise UsageError(f"--resize_mode must be one of {', '.join(RESIZE_MODES)}, got {pre.resize_mode!r}")


def build_cache_transform(pre: Preprocess) -> Callable[[torch.Tensor], torch.Tensor]:
    """What `--cache` stores for training images: the image shrunk to cover input_size x
    TRAIN_CACHE_MARGIN. The random crop then still has some room and detail; storing the full
    image would cost memory, and each epoch would resize more pixels."""
    return ShrinkToCover(pre.input_size, TRAIN_CACHE_MARGIN, _interpolation(pre.interpolation))


def build_train_transform(
    pre: Preprocess,
    augment: str = "basic",
    hflip: float = 0.5,
    color_jitter: float = 0.0,
    crop_scale: float = 0.08,
    random_erase: float = 0.0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Training augmentation on uint8 CHW tensors.

    none:           the eval resize only (no randomness)
    basic:          random resized crop (crop/stretch modes) or letterbox + random scale/shift,
                    horizontal flip, optional colour jitter
    randaugment / trivialaugment / autoaugment (the ImageNet policy) / augmix:
                    basic + that policy (torchvision's implementations)
    random_erase:   then, with this probability, erase a random rectangle to the mean colour
                    (Zhong et al. 2017; 0 after normalisation, as the torchvision references do)
    """
    if augment not in AUGMENTS:
        raise UsageError(f"--augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if augment == "none":
        return build_eval_transform(pre)
    interpolation = _interpolation(pre.interpolation)
    if pre.resize_mode == "letterbox":
        steps: list = [
            Letterbox(pre.input_size, _mean_fill(pre), interpolation),
            T.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.75, 1.0), fill=_mean_fill(pre)),
        ]
    else:
        ratio = pre.input_size[1] / pre.input_size[0]
        steps = [
            RandomResizedCrop(
                pre.input_size,
                scale=(crop_scale, 1.0),
                ratio=(ratio * 3 / 4, ratio * 4 / 3),
                interpolation=interpolation,
                antialias=True,
            )
        ]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if augment == "randaugment":
        steps.append(T.RandAugment(interpolation=interpolation))
    elif augment == "trivialaugment":
        steps.append(T.TrivialAugmentWide(interpolation=interpolation))
    elif augment == "autoaugment":
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, interpolation=interpolation))
    elif augment == "augmix":
        steps.append(T.AugMix(interpolation=interpolation))
    if color_jitter > 0:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    if random_erase > 0:
        steps.append(T.RandomErasing(random_erase, value=_mean_fill(pre)))
    return TrainTransform(steps)


def build_batch_mix(mixup: float, cutmix: float, num_classes: int) -> Optional[Callable]:
    """MixUp (alpha `mixup`) and/or CutMix (alpha `cutmix`) on a normalised batch, one of the two
    picked per batch when both are on (as the torchvision references do); None when both are 0.

    Called as `images, soft_targets = mix(images, class_indices)`: the soft targets are the
    mixing weights of the two labels of each image (each row sums to 1).
    """
    mixes = [kind(alpha=alpha, num_classes=num_classes)
             for kind, alpha in ((T.MixUp, mixup), (T.CutMix, cutmix)) if alpha > 0]
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else T.RandomChoice(mixes)


def normalize_batch(
    images: torch.Tensor,
    pre: Preprocess,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 NCHW batch (already on the device) -> normalised float model input."""
    mean = torch.tensor(pre.mean, device=images.device, dtype=dtype).view(1, -1, 1, 1) * 255
    std = torch.tensor(pre.std, device=images.device, dtype=dtype).view(1, -1, 1, 1) * 255
    images = (images.to(dtype) - mean) / std
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images



def _centre_offset(side: int, cropped: int) -> int:
    return int(round((side - cropped) / 2.0))  # as torchvision's center_crop places its window


def original_to_model_axes(original_size: Sequence[int], pre: Preprocess) -> tuple[tuple[float, float], tuple[float, float]]:
    """How `build_eval_transform(pre)` moves points, per axis: ((scale_x, offset_x), (scale_y, offset_y))
    with model = original * scale + offset (pixel units, x right, y down; pixel i covers [i, i+1)).
    Every resize mode is a scale and a shift per axis: the stretch; the letterbox scale and its
    padding; the crop's resize (of ResizeCover's working region) and its centre cut."""
    height, width = original_size
    size_h, size_w = pre.input_size
    if pre.resize_mode == "stretch":
        return (size_w / width, 0.0), (size_h / height, 0.0)
    if pre.resize_mode == "letterbox":
        scale = min(size_h / height, size_w / width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        top, left = (size_h - new_h) // 2, (size_w - new_w) // 2
        return (new_w / width, float(left)), (new_h / height, float(top))
    cover = ResizeCover(pre.input_size, pre.crop_pct, _interpolation(pre.interpolation))
    kept, resized = cover.working_region(height, width)
    axes = []
    for side, keep, grown, target in ((width, kept[1], resized[1], size_w), (height, kept[0], resized[0], size_h)):
        scale = grown / keep  # centre-cut to `keep`, resize to `grown`, centre-crop to `target`
        axes.append((scale, -_centre_offset(side, keep) * scale - _centre_offset(grown, target)))
    return axes[0], axes[1]


def model_to_original(x: float, y: float, original_size: Sequence[int], pre: Preprocess) -> tuple[float, float]:
    """A point of the model input (pixel units) back to the ORIGINAL image it was made from by
    `build_eval_transform(pre)` (the inverse of `original_to_model_axes`), clamped inside the
    original image [0, W) x [0, H)."""
    height, width = original_size
    (scale_x, offset_x), (scale_y, offset_y) = original_to_model_axes(original_size, pre)
    ox, oy = (x - offset_x) / scale_x, (y - offset_y) / scale_y
    return min(max(ox, 0.0), width - 1e-3), min(max(oy, 0.0), height - 1e-3)
