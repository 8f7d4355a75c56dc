"""Flags that infer.py and the viewer (runui.py) share: one definition, one check, one meaning.

    add_cam_args(parser, "with --cam")          # --cam_method, --cam_layer
    add_min_confidence_arg(parser)              # --min_confidence P|auto
    check_min_confidence(args.min_confidence)   # before the model loads: a typo fails at once
    resolve_min_confidence(args.min_confidence, predictor.checkpoint_info, args.weights)

Torch-free, like inference.inputs, so the scripts check their flags before torch loads.
"""

from __future__ import annotations

import argparse
from typing import Optional

from utils.errors import UsageError

CAM_METHODS = ("gradcam", "gradcam++", "eigencam")
AUTO = "auto"  # --min_confidence auto: the threshold train.py stored in the checkpoint


def add_cam_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, when: str) -> None:
    """--cam_method and --cam_layer; `when` says when they apply, e.g. "with --cam"."""
    parser.add_argument("--cam_method", "--cam-method", default="gradcam", choices=CAM_METHODS,
                        help=f"{when}: the heat-map method (pytorch-grad-cam); default %(default)s")
    parser.add_argument("--cam_layer", "--cam-layer", default=None,
                        help=f"{when}: the layer (a model.named_modules() name); default: chosen per model family")


def add_min_confidence_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--min_confidence", "--min-confidence", default=None, metavar="P|auto",
                        help="answer 'unknown' when the top (calibrated) probability is below P (0-1); auto: the "
                             "threshold train.py suggested from val (99%% of val's answers above it were right)")


def check_min_confidence(value: Optional[str]) -> None:
    """None, 'auto' or a probability in [0, 1]; anything else is one clear line."""
    if value in (None, AUTO):
        return
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 <= number <= 1:
        raise UsageError(f"--min_confidence must be a probability between 0 and 1 or 'auto', got {value}")


def resolve_min_confidence(value: Optional[str], checkpoint_info: dict, weights: str) -> Optional[float]:
    """--min_confidence as a number; 'auto' reads the checkpoint's suggested_min_confidence
    (Predictor.checkpoint_info), which train.py stores."""
    if value != AUTO:
        return None if value is None else float(value)
    suggested = checkpoint_info.get("suggested_min_confidence")
    if suggested is None:
        why = ("no threshold kept 99% of val's answers right" if "suggested_min_confidence" in checkpoint_info
               else "it has no suggested_min_confidence (trained before this was stored, or a bare state_dict)")
        raise UsageError(f"--min_confidence auto: {weights}: {why}; give a number such as --min_confidence 0.5")
    return float(suggested)
