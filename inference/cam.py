"""Where did the model look? Class activation maps with the pytorch-grad-cam package.

    heat = HeatMaps(predictor, "gradcam")           # target layer chosen per model family
    maps = heat(images_uint8_nchw, predicted_classes)  # (N, H, W) in [0, 1], model-input pixels
    x, y = heat.peak(maps[0], original_size)         # the hottest point in ORIGINAL image pixels

The target layer is the last convolutional stage of a CNN; for transformers the token sequence
is reshaped back into a grid (ViT: drop the class token; Swin: channels-last to channels-first).
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
from utils.transforms import Preprocess, model_to_original, normalize_batch


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


def default_layer_name(model: nn.Module, model_name: str) -> str:
    """The last convolutional stage (CNNs), the last encoder block's first norm (ViT), the last
    stage (Swin, MaxViT, ConvNeXt, MobileNet, EfficientNet...), else the last Conv2d."""
    names = dict(model.named_modules())
    if model_name.startswith("vit_"):
        return f"encoder.layers.encoder_layer_{len(model.encoder.layers) - 1}.ln_1"
    for candidate in ("layer4", "features", "blocks", "trunk_output", "Mixed_7c", "inception5b"):
        if candidate in names:
            return candidate
    convolutions = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise UsageError(f"--cam: {model_name} has no convolutional layer to take; name one with --cam_layer")
    return convolutions[-1]


def find_target_layer(model: nn.Module, model_name: str, layer_name: Optional[str] = None) -> tuple[str, nn.Module]:
    """(name, module) of the layer the heat map is taken at: `layer_name`, or the family default."""
    names = dict(model.named_modules())
    name = layer_name or default_layer_name(model, model_name)
    if name not in names:
        shown = ", ".join(list(names)[-5:])
        raise UsageError(f"--cam_layer {name}: {model_name} has no such layer (names as in model.named_modules(), "
                         f"e.g. {shown})")
    return name, names[name]


class HeatMaps:
    """One CAM object for a torch model (Predictor.model); call it on uint8 batches."""

    def __init__(self, model: nn.Module, model_name: str, preprocess: Preprocess, device: torch.device,
                 method: str = "gradcam", layer_name: Optional[str] = None):
        if not isinstance(model, nn.Module):
            raise UsageError("--cam needs a PyTorch model (a .pth checkpoint); an exported model has no layers to read")
        self.preprocess, self.device = preprocess, device
        self.layer_name, layer = find_target_layer(model, model_name, layer_name)
        self.cam = _method_class(method)(model=model, target_layers=[layer],
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
        """The hottest model-input pixel's centre, in original image pixels (x, y)."""
        y, x = np.unravel_index(int(np.argmax(heat_map)), heat_map.shape)
        return model_to_original(x + 0.5, y + 0.5, original_size, self.preprocess)


def overlay(image: np.ndarray, heat_map: np.ndarray, strength: float = 0.45) -> np.ndarray:
    """An RGB uint8 image (the model's input view) with the heat map blended on in the jet colours."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255, heat_map, use_rgb=True, image_weight=1 - strength)
