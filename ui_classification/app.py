"""Command line and start-up of the viewer (runui.py is a thin wrapper around `main`).

Qt is imported only after the flags passed their checks, so a typo fails in a moment; torch only
after the window is on screen (its import takes seconds: the window shows "loading" meanwhile).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from inference.inputs import add_bare_state_dict_args
from inference.options import add_cam_args, add_min_confidence_arg, check_min_confidence
from ui_classification.strings import LANGUAGES
from utils.errors import UsageError

if TYPE_CHECKING:
    from ui_classification.window import ViewerOptions, ViewerWindow


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Desktop viewer: classify a folder image by image with a trained checkpoint and watch the metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", default=None, help="checkpoint to load (logs/<run>/best.pth) or an .onnx from export.py "
                        "(run by onnxruntime); or choose it in the window")
    parser.add_argument("--image_dir", "--image-dir", default=None,
                        help="folder of images (sub-folders included); images in a folder named after a class count toward the metrics")
    parser.add_argument("--save_dir", "--save-dir", default=None,
                        help="existing folder for annotated images and for Record's files (predictions.csv/.json, per_class.csv, log)")
    parser.add_argument("--title", default=None, help="window title; default: the checkpoint's model and classes")
    parser.add_argument("--lang", choices=LANGUAGES, default="en", help="language of the window's text")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=32,
                        help="images classified per batch, ahead of what is shown")
    parser.add_argument("--interval", type=float, default=1.0, help="autoplay: seconds per image")
    add_min_confidence_arg(parser)
    add_cam_args(parser, "heat-map toggle (H)")
    add_bare_state_dict_args(parser)
    return parser


DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags before a window opens: one line naming the flag."""
    if args.weights is not None and not os.path.isfile(args.weights):
        raise UsageError(f"--weights {args.weights} does not exist or is not a file")
    for flag, folder in (("--image_dir", args.image_dir), ("--save_dir", args.save_dir)):
        if folder is not None and not os.path.isdir(folder):
            raise UsageError(f"{flag} {folder} does not exist or is not a folder")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if not args.interval > 0:
        raise UsageError(f"--interval must be more than 0 seconds, got {args.interval}")
    if not DEVICE_NAME.fullmatch(args.device):  # its availability is checked with the model, in the window
        raise UsageError(f"--device {args.device!r} is not a device this project runs on "
                         "(use auto, cpu, cuda, cuda:N or mps)")
    check_min_confidence(args.min_confidence)
    if args.input_shape and not 1 <= len(args.input_shape) <= 2:
        raise UsageError(f"--input_shape takes H or H W, got {len(args.input_shape)} numbers")


def options_from_args(args: argparse.Namespace) -> ViewerOptions:
    from ui_classification.window import ViewerOptions

    return ViewerOptions(weights=args.weights, image_dir=args.image_dir, save_dir=args.save_dir, title=args.title,
                         lang=args.lang, device=args.device, batch_size=args.batch_size, interval=args.interval,
                         model=args.model, categories=args.categories, input_shape=args.input_shape,
                         cam_method=args.cam_method, cam_layer=args.cam_layer, min_confidence=args.min_confidence)


def keep_window_on_errors(window: ViewerWindow) -> None:
    """PyQt aborts on an exception escaping a slot; show it in the window instead and carry on."""

    def report(kind, error, tb) -> None:
        traceback.print_exception(kind, error, tb)
        window.show_message(window.text("err_unexpected", message=f"{kind.__name__}: {error}"))

    sys.excepthook = report


def preload_before_qt() -> None:
    """Triton (imported by torch when present) segfaults when first imported after Qt opened an X11
    window; it takes a second, unlike torch's ten, so it alone is loaded before Qt."""
    if importlib.util.find_spec("triton") is not None:
        importlib.import_module("triton")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    preload_before_qt()
    from PyQt5.QtWidgets import QApplication

    from ui_classification.window import ViewerWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    window = ViewerWindow(options_from_args(args))
    keep_window_on_errors(window)
    window.show()
    return app.exec_()
