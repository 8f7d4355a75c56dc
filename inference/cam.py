"""Where did the model look? Class activation maps with the pytorch-grad-cam package.

    heat = HeatMaps(model, "resnet18", preprocess, device, "gradcam")  # layer chosen per family and size
    maps = heat(images_uint8_nchw, predicted_classes)    # (N, H, W) in [0, 1], model-input pixels
    x, y = heat.peak(maps[0], original_size)            # the hottest point in ORIGINAL image pixels
    picture = overlay_on_original(original, maps[0], preprocess)  # the original image with its heat map

The target layer is the last convolutional stage of a CNN, or an earlier stage where that one's
map is smaller than MIN_MAP_SIDE at the checkpoint's input size (found with one dry forward pass);
for transformers the token sequence is reshaped back into a grid (ViT: drop the class token; Swin:
channels-last to channels-first; MaxViT's blocks are already channels-first).
`--cam_layer NAME` (a name from `model.named_modules()`) overrides the choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from inference.options import CAM_METHODS
from utils.errors import UsageError
from utils.transforms import (
    DEFAULT_INPUT_SIDE,
    Preprocess,
    model_to_original,
    normalize_batch,
    original_to_model_axes,
)

MAX_OVERLAY_SIDE = 2048  # cam/<name>.jpg is the original image, shrunk to this long side at most (memory, disk)


def _method_class(method: str) -> type:
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus

    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}
    if method not in classes:
        raise UsageError(f"--cam_method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    return classes[method]


def _vit_reshape(input_size: Sequence[int], patch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    grid_h, grid_w = input_size[0] // patch, input_size[1] // patch

    def reshape(tokens: torch.Tensor) -> torch.Tensor:  # (B, 1 + h*w, D) -> (B, D, h, w)
        grid = tokens[:, 1:, :].reshape(tokens.shape[0], grid_h, grid_w, tokens.shape[2])
        return grid.permute(0, 3, 1, 2)
    return reshape


def _channels_last_to_first(tokens: torch.Tensor) -> torch.Tensor:  # Swin stages give (B, H, W, C)
    return tokens.permute(0, 3, 1, 2)


def reshape_for(model_name: str, input_size: Sequence[int]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """How a layer's output of this family becomes (B, C, H, W); None when it already is."""
    if model_name.startswith("vit_"):
        return _vit_reshape(input_size, int(model_name.rsplit("_", 1)[1]))
    if model_name.startswith("swin_"):
        return _channels_last_to_first
    return None


MIN_MAP_SIDE = 7  # a heat map coarser than 7x7 says little about where (ResNet's layer4 is 7x7 at 224 px)


def default_layer_name(model: nn.Module, model_name: str) -> str:
    """The family's usual layer: the last convolutional stage (CNNs), the last encoder block's first
    norm (ViT), the last stage (Swin, MaxViT, ConvNeXt, MobileNet, EfficientNet...), else the last
    Conv2d. `choose_layer` moves to an earlier stage where this one's map is too coarse."""
    names = dict(model.named_modules())
    if model_name.startswith("vit_"):
        return f"encoder.layers.encoder_layer_{len(model.encoder.layers) - 1}.ln_1"
    for candidate in ("layer4", "features", "blocks", "trunk_output", "Mixed_7c", "inception5b"):
        if isinstance(names.get(candidate), nn.ModuleList):  # MaxViT's blocks: a list is never called itself
            return f"{candidate}.{len(names[candidate]) - 1}"
        if candidate in names:
            return candidate
    convolutions = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise UsageError(f"--cam: {model_name} has no convolutional layer to take; name one with --cam_layer")
    return convolutions[-1]


def map_sizes(model: nn.Module, names: Sequence[str], input_size: Sequence[int], device: torch.device,
              reshape: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, Optional[tuple[int, ...]]]:
    """The output shape of each named module (after `reshape`) in one forward pass of a zero image,
    in the order the modules finished; None where the output is no tensor or `reshape` does not fit
    it; a module that did not run is absent. Cheap: one image."""
    modules, shapes = dict(model.named_modules()), {}

    def recorder(name: str) -> Callable:
        def record(module: nn.Module, inputs: object, output: object) -> None:
            shape = None
            if isinstance(output, torch.Tensor):
                try:
                    shape = tuple((reshape(output) if reshape else output).shape)
                except (RuntimeError, IndexError, ValueError):  # a layer the family's reshape does not fit
                    shape = None
            shapes.pop(name, None)  # a module run twice (ResNet's shared ReLU) counts where it last finished
            shapes[name] = shape
        return record

    handles = [modules[name].register_forward_hook(recorder(name)) for name in names]
    dtype = next(model.parameters()).dtype
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, *input_size, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _spatial(shape: Optional[tuple[int, ...]]) -> Optional[tuple[int, int]]:
    return (shape[2], shape[3]) if shape is not None and len(shape) == 4 else None


def _candidates(model: nn.Module, default: str) -> list[str]:
    """The default layer, its children and its siblings: the stages a smaller map can come from."""
    parent = default.rpartition(".")[0]  # "" for a top-level layer: get_submodule("") is the model
    children = [f"{default}.{name}" for name, _ in model.get_submodule(default).named_children()]
    siblings = [f"{parent}.{name}" if parent else name for name, _ in model.get_submodule(parent).named_children()]
    return [default, *children, *(name for name in siblings if name != default)]


def _named_layer_map(model: nn.Module, model_name: str, layer_name: str, input_size: Sequence[int],
                     device: torch.device, reshape: Optional[Callable]) -> tuple[int, int]:
    """--cam_layer's map (h, w), or a UsageError: no such layer, it does not run, or no map."""
    names = dict(model.named_modules())
    if layer_name not in names:
        shown = ", ".join(list(names)[-5:])
        raise UsageError(f"--cam_layer {layer_name}: {model_name} has no such layer (names as in "
                         f"model.named_modules(), e.g. {shown})")
    shapes = map_sizes(model, [layer_name], input_size, device, reshape)
    if layer_name not in shapes:
        raise UsageError(f"--cam_layer {layer_name}: the layer does not run in {model_name}'s forward pass")
    size = _spatial(shapes[layer_name])
    if size is None:
        shape = f" {shapes[layer_name]}" if shapes[layer_name] else ""
        raise UsageError(f"--cam_layer {layer_name}: its output{shape} is not a map (batch, channels, height, "
                         f"width) for {model_name}; name a stage such as {default_layer_name(model, model_name)}")
    if size == (1, 1):  # one value per channel: every method gives a blank map with no place in it
        raise UsageError(f"--cam_layer {layer_name}: its map is 1x1 at the {input_size[0]}x{input_size[1]} input, "
                         f"which has no place to point at; name an earlier stage (or leave --cam_layer out)")
    return size


def choose_layer(model: nn.Module, model_name: str, input_size: Sequence[int], device: torch.device,
                 layer_name: Optional[str] = None) -> tuple[str, tuple[int, int], str]:
    """(layer name, its map's (h, w) at `input_size`, a line saying why) for the heat maps.

    `layer_name` (--cam_layer) is taken as given, once its output is checked to be a map. Otherwise
    the family default, unless its map is smaller than MIN_MAP_SIDE (ResNet's layer4 is 2x2 at 64 px):
    then the last stage before it whose map is at least that large (the largest one if none is).
    ViT's map is its patch grid at every block, so its default stands."""
    reshape = reshape_for(model_name, input_size)
    if layer_name is not None:
        size = _named_layer_map(model, model_name, layer_name, input_size, device, reshape)
        return layer_name, size, f"{layer_name} (--cam_layer), a {size[0]}x{size[1]} map"
    default = default_layer_name(model, model_name)
    shapes = map_sizes(model, _candidates(model, default), input_size, device, reshape)
    sizes = {name: _spatial(shape) for name, shape in shapes.items() if _spatial(shape) is not None}
    if default not in sizes:
        raise UsageError(f"--cam: {model_name}'s layer {default} gives no map; name one with --cam_layer")
    if min(sizes[default]) >= MIN_MAP_SIDE or model_name.startswith("vit_"):
        return default, sizes[default], f"{default}, a {sizes[default][0]}x{sizes[default][1]} map"
    before = list(sizes)[:list(sizes).index(default)]  # in the order they finished: earlier stages first
    fine = [name for name in before if min(sizes[name]) >= MIN_MAP_SIDE]
    chosen = fine[-1] if fine else max(reversed(before or [default]), key=lambda name: min(sizes[name]))
    (height, width), (small_h, small_w) = sizes[chosen], sizes[default]
    if chosen == default:  # no earlier stage has a larger map
        return default, sizes[default], f"{default}, a {height}x{width} map (coarse: no earlier stage is larger)"
    return chosen, sizes[chosen], (f"{chosen}, a {height}x{width} map ({default} gives only {small_h}x{small_w} "
                                   f"at the {input_size[0]}x{input_size[1]} input; --cam_layer chooses another)")


def find_target_layer(model: nn.Module, model_name: str, layer_name: Optional[str] = None,
                      input_size: Sequence[int] = (DEFAULT_INPUT_SIDE, DEFAULT_INPUT_SIDE),
                      device: Optional[torch.device] = None) -> tuple[str, nn.Module]:
    """(name, module) of the layer the heat map is taken at (see `choose_layer`)."""
    device = device or next(model.parameters()).device
    name, _, _ = choose_layer(model, model_name, input_size, device, layer_name)
    return name, model.get_submodule(name)


class HeatMaps:
    """One CAM object for a torch model (Predictor.model); call it on uint8 batches."""

    def __init__(self, model: nn.Module, model_name: str, preprocess: Preprocess, device: torch.device,
                 method: str = "gradcam", layer_name: Optional[str] = None):
        if not isinstance(model, nn.Module):
            raise UsageError("--cam needs a PyTorch model (a .pth checkpoint); an exported model has no layers to read")
        self.preprocess, self.device = preprocess, device
        cam_class = _method_class(method)  # a wrong --cam_method fails before the dry forward pass
        self.method = method
        self.layer_name, self.map_size, self.description = choose_layer(
            model, model_name, preprocess.input_size, device, layer_name)
        self.cam = cam_class(model=model, target_layers=[model.get_submodule(self.layer_name)],
                                         reshape_transform=reshape_for(model_name, preprocess.input_size))

    def __call__(self, images: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
        """uint8 NCHW batch at the input size and the class per image -> (N, H, W) maps in [0, 1]."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        inputs = normalize_batch(images.to(self.device), self.preprocess).float()
        with torch.enable_grad():
            try:
                return self.cam(input_tensor=inputs, targets=[ClassifierOutputTarget(int(c)) for c in classes])
            except (RuntimeError, ValueError, IndexError) as error:
                raise UsageError(f"--cam at layer {self.layer_name} does not apply here ({type(error).__name__}: "
                                 f"{error}); try another --cam_method or --cam_layer") from None

    def release(self) -> None:
        """Take the hooks off the model. While they are on, every forward pass of the model keeps a
        copy of the layer's output (pytorch-grad-cam), so a model that goes on classifying (the
        viewer's) must release them after each heat map."""
        self.cam.activations_and_grads.release()
        self.cam.activations_and_grads.activations = []

    def peak(self, heat_map: np.ndarray, original_size: Sequence[int]) -> tuple[float, float]:
        """The hottest model-input pixel's centre, in original image pixels (x, y); NaN for a blank
        map (nothing raised the class's score: there is no place to name)."""
        if not heat_map.max() > 0:
            return float("nan"), float("nan")
        y, x = np.unravel_index(int(np.argmax(heat_map)), heat_map.shape)
        return model_to_original(x + 0.5, y + 0.5, original_size, self.preprocess)


def overlay(image: np.ndarray, heat_map: np.ndarray, strength: float = 0.45) -> np.ndarray:
    """An RGB uint8 image with a heat map of its own (h, w) blended on in the jet colours."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255, heat_map, use_rgb=True, image_weight=1 - strength)


def _axis_samples(length: int, original_per_pixel: float, scale: float, offset: float,
                  map_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis of the picture: for each pixel, the two heat-map pixels around the point it
    shows, the weight of the second, and whether the model saw that point at all."""
    centres = (np.arange(length) + 0.5) * original_per_pixel * scale + offset  # in model pixels
    seen = (centres >= 0) & (centres <= map_length)
    position = np.clip(centres - 0.5, 0, map_length - 1)
    first = np.floor(position).astype(np.int64)
    return first, np.minimum(first + 1, map_length - 1), (position - first).astype(np.float32), seen


def heat_map_on_original(heat_map: np.ndarray, original_size: Sequence[int], preprocess: Preprocess,
                         picture_size: Optional[Sequence[int]] = None) -> np.ndarray:
    """The model-input heat map (h, w) moved onto the ORIGINAL image's pixels, or onto a picture of it
    scaled to `picture_size` (H, W): undoes the stretch, letterbox or crop (bilinear, one axis at a
    time, so memory is a few picture-sized arrays). What the model never saw (outside a centre crop)
    is 0; a letterbox's padding is dropped."""
    height, width = original_size
    picture_h, picture_w = picture_size or original_size
    (scale_x, offset_x), (scale_y, offset_y) = original_to_model_axes(original_size, preprocess)
    left, right, weight_x, seen_x = _axis_samples(picture_w, width / picture_w, scale_x, offset_x, heat_map.shape[1])
    top, bottom, weight_y, seen_y = _axis_samples(picture_h, height / picture_h, scale_y, offset_y, heat_map.shape[0])
    columns = heat_map[:, left] * (1 - weight_x) + heat_map[:, right] * weight_x  # (h, picture_w)
    picture = columns[top] * (1 - weight_y)[:, None] + columns[bottom] * weight_y[:, None]
    return (picture * (seen_y[:, None] & seen_x[None, :])).astype(np.float32)


def overlay_on_original(original: np.ndarray, heat_map: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """The ORIGINAL RGB image with the model-input heat map blended on where it belongs: what
    cam/<name>.jpg and the --cam grids show. Shrunk to MAX_OVERLAY_SIDE at most; an image smaller
    than the model input is enlarged to its size (nearest pixels), so the map keeps its detail."""
    import cv2

    height, width = original.shape[:2]
    longest = max(height, width)
    scale = min(MAX_OVERLAY_SIDE / longest, max(1.0, max(preprocess.input_size) / longest))
    picture = original
    if scale != 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        picture = cv2.resize(original, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)
    return overlay(picture, heat_map_on_original(heat_map, (height, width), preprocess, picture.shape[:2]))
