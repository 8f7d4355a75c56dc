"""Surgery on a built model for fine-tuning: fit weights into it, find its head, freeze the rest.

    report = load_matching_weights(model, state_dict, source="best.pth", model_name="resnet18")
    format_load_report(report)            # "pretrained: loaded 265 of 267 tensors of the model" ...
    head = head_parameter_names(model, report["reinitialised"])
    set_backbone_trainable(model, False, head)   # --freeze_backbone
    set_frozen_norm_eval(model)                  # after model.train(): frozen BatchNorms keep their statistics

Where the weight files come from (download, cache, verify) is models/pretrained.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from typing import Optional

import torch
import torch.nn as nn

from models.pretrained import WeightsError
from utils.checkpoint import with_module_versions

_HEAD_NAMES = ("fc", "classifier", "heads", "head")  # torchvision's names for the classifier module


# --- loading into a model --------------------------------------------------------------------------


def _add_pre_hook(module: nn.Module, hook):
    if hasattr(module, "register_load_state_dict_pre_hook"):  # public from torch 2.5
        return module.register_load_state_dict_pre_hook(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


def load_matching_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "the weights",
                          model_name: Optional[str] = None) -> dict:
    """Copy into `model` every tensor of `state_dict` whose name and shape fit; the rest stays as built.

    Goes through nn.Module.load_state_dict, so torchvision's per-module upgrades of old files (ViT
    MLP names, MNASNet v1 stems) still apply; tensors of another shape (the classifier head when the
    class count differs) are dropped just before their module loads.
    Returns {"loaded": model keys filled from the file, "reinitialised": model keys left as built,
    "unexpected": file keys not used (mismatched ones included), "mismatched": [[key, file shape,
    model shape], ...]}. "loaded" and "reinitialised" leave out integer buffers (BatchNorm's
    num_batches_tracked): counters, not weights, whose names every model with BatchNorm shares.
    Raises WeightsError, naming `source` and `model_name`, when no weight fits (another model's weights).
    """
    mismatched: list[list] = []

    def drop_misfits(module, state, prefix, *_):
        for name, tensor in chain(module._parameters.items(), module._buffers.items()):
            key = prefix + name
            if tensor is None or key not in state or nn.parameter.is_lazy(tensor):
                continue
            if state[key].shape != tensor.shape:
                mismatched.append([key, list(state[key].shape), list(tensor.shape)])
                del state[key]

    target = model_name or type(model).__name__
    handles = [_add_pre_hook(module, drop_misfits) for module in model.modules()]
    try:
        result = model.load_state_dict(with_module_versions(state_dict, model), strict=False)
    except (RuntimeError, ValueError) as error:
        raise WeightsError(f"{source} does not load into {target}: "
                           f"{str(error).strip().splitlines()[-1].strip()}") from None
    finally:
        for handle in handles:
            handle.remove()
    missing = set(result.missing_keys)
    own = model.state_dict()
    weights = [key for key, tensor in own.items() if tensor.is_floating_point() or tensor.is_complex()]
    loaded = [k for k in weights if k not in missing]
    if not loaded:
        counters = sum(1 for key in own if key not in missing and key not in weights)
        shared = f" (only {counters} BatchNorm step counters share their names)" if counters else ""
        raise WeightsError(f"none of the {len(state_dict)} tensors in {source} fit {target}{shared}: they are the "
                           f"weights of another model; use the --model they were made for, or weights of a {target}")
    return {"loaded": loaded, "reinitialised": [k for k in weights if k in missing],
            "unexpected": list(result.unexpected_keys) + [m[0] for m in mismatched], "mismatched": mismatched}


def _some(names: Sequence[str], limit: int) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def format_load_report(report: Mapping, limit: int = 6) -> str:
    """A few console lines: how much was loaded, what was re-initialised and why, what was unused."""
    loaded, reinit = report["loaded"], report["reinitialised"]
    lines = [f"pretrained: loaded {len(loaded)} of {len(loaded) + len(reinit)} tensors of the model"]
    if reinit:
        lines.append(f"  re-initialised {len(reinit)}: {_some(reinit, limit)}")
    mismatched = report.get("mismatched", [])
    if mismatched:
        shapes = [f"{key} {file} -> {model}" for key, file, model in mismatched]
        lines.append(f"  shape differs (file -> model): {_some(shapes, limit)}")
    mismatched_keys = {m[0] for m in mismatched}
    unused = [k for k in report["unexpected"] if k not in mismatched_keys]
    if unused:
        lines.append(f"  not in the model, unused: {len(unused)}: {_some(unused, limit)}")
    return "\n".join(lines)


# --- freezing the backbone -------------------------------------------------------------------------


def _classifier_layer(model: nn.Module) -> Optional[str]:
    """Name of the last layer with parameters inside the model's fc/classifier/heads/head module."""
    found = [(name.count("."), _HEAD_NAMES.index(name.rsplit(".", 1)[-1]), name, module)
             for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in _HEAD_NAMES]
    if not found:
        return None
    _, _, head_name, head = min(found, key=lambda item: item[:2])  # the outermost wins (ViT: heads)
    layers = [sub for sub, module in head.named_modules() if next(module.parameters(recurse=False), None) is not None]
    if not layers:
        return None
    return f"{head_name}.{layers[-1]}" if layers[-1] else head_name


def head_parameter_names(model: nn.Module, reinitialised: Iterable[str] = ()) -> list[str]:
    """Parameter names of the classifier head, the part --freeze_backbone leaves trainable.

    The head is the last layer of torchvision's fc / classifier / heads / head module (so VGG's
    hidden classifier layers count as backbone), plus every parameter left re-initialised by
    load_matching_weights (what did not fit, e.g. Inception's auxiliary classifiers).
    """
    params = dict(model.named_parameters())
    names = {key for key in reinitialised if key in params}
    layer = _classifier_layer(model)
    if layer is not None:
        names.update(key for key in params if key.startswith(layer + "."))
    if not names:
        raise WeightsError(f"cannot tell the classifier head of {type(model).__name__} (no fc, classifier, "
                           "heads or head module), so --freeze_backbone cannot be used with it")
    return sorted(names)


def set_backbone_trainable(model: nn.Module, trainable: bool, head_names: Iterable[str]) -> tuple[int, int]:
    """Set requires_grad of every parameter outside `head_names` (the head always trains).

    Returns (trainable, total) parameter counts for the console. Build the optimiser over all
    parameters: frozen ones get no gradient and are skipped, and --unfreeze_epoch needs no rebuild.
    """
    head = set(head_names)
    params = dict(model.named_parameters())
    unknown = head - params.keys()
    if unknown:
        raise ValueError(f"not parameters of the model: {sorted(unknown)[:3]}")
    for name, param in params.items():
        param.requires_grad_(trainable or name in head)
    return (sum(p.numel() for p in params.values() if p.requires_grad),
            sum(p.numel() for p in params.values()))


def set_frozen_norm_eval(model: nn.Module) -> int:
    """Put every BatchNorm whose parameters are all frozen in eval mode; return how many.

    requires_grad=False stops the optimiser, not BatchNorm's running statistics, which keep drifting
    towards the new data in train mode; a linear probe wants fixed features. Call after model.train().
    """
    count = 0
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            module.eval()
            count += 1
    return count


def train_mode(model: nn.Module) -> None:
    """model.train(), except that BatchNorms frozen by --freeze_backbone stay in eval mode."""
    model.train()
    set_frozen_norm_eval(model)
