"""Export a checkpoint to ONNX and/or TorchScript, with its preprocessing inside, checked against PyTorch.

    python export.py --weights logs/<run>/best.pth                      # -> logs/<run>/best.onnx
    python export.py --weights logs/<run>/best.pth --format all --check_images data/flowers/val
    python export.py --weights best.pth --int8 --check_images data/flowers/val
    python export.py --weights other.pth --model resnet50 --categories daisy,rose --input_shape 224

The exported model takes uint8 RGB images [N, 3, H, W] already resized by the checkpoint's rule
and returns probabilities [N, C]; class names and the resize rule travel in its metadata.
Each export is compared with PyTorch on images before it gets its name; when it disagrees the
script exits 1 and leaves no file. See docs/export.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

# Only torch-free modules at the top: flag mistakes fail before torch and onnx load (seconds).
from inference.inputs import add_bare_state_dict_args
from utils.cli import run_cli
from utils.errors import UsageError
from utils.memory import keep_freed_memory

if TYPE_CHECKING:
    import numpy as np

    from inference.check_images import CheckImages
    from inference.export import ExportResult, ExportSource

FORMAT_CHOICES = ("onnx", "torchscript", "all")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a checkpoint (or a bare state_dict) to ONNX/TorchScript with its preprocessing inside.",
        add_help=add_help)
    parser.add_argument("--weights", required=True, help="checkpoint (logs/<run>/best.pth) or a bare state_dict file")
    parser.add_argument("--format", default="onnx", help="onnx, torchscript or all; default %(default)s")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for the exported files; default: the checkpoint's folder. An existing file "
                             "is never replaced: a second export is named best-1.onnx")
    parser.add_argument("--opset", type=int, default=None, metavar="N",
                        help="ONNX opset; default: the exporter's (opsets below 18 use the TorchScript-based exporter)")
    parser.add_argument("--batch", default="dynamic", metavar="N|dynamic",
                        help="batch size the model takes: a number, or dynamic (any); default %(default)s")
    check = parser.add_argument_group("check and int8")
    check.add_argument("--check_images", "--check-images", default=None, metavar="DIR",
                       help="images to compare PyTorch and the export on (a <class>/<images> tree also gives "
                            "accuracy); default: the checkpoint's validation data, else generated images")
    check.add_argument("--check_limit", "--check-limit", type=int, default=200, metavar="N",
                       help="at most this many check images, spread evenly over the folder; default %(default)s")
    check.add_argument("--int8", action="store_true",
                       help="also write <name>.int8.onnx (onnxruntime static quantisation calibrated on the check "
                            "images) when it is faster than fp32; prints speed and accuracy change")
    add_bare_state_dict_args(parser)
    return parser


def check_args(args: argparse.Namespace) -> tuple[list[str], Optional[int]]:
    """Flag mistakes, before anything heavy loads. Returns (formats, fixed batch or None)."""
    if args.format not in FORMAT_CHOICES:
        raise UsageError(f"--format must be onnx, torchscript or all, got {args.format!r}")
    formats = ["onnx", "torchscript"] if args.format == "all" else [args.format]
    batch = None
    if args.batch != "dynamic":
        if not args.batch.isdigit() or int(args.batch) < 1:
            raise UsageError(f"--batch must be a positive number or dynamic, got {args.batch!r}")
        batch = int(args.batch)
    if args.opset is not None and args.opset < 7:
        raise UsageError(f"--opset must be 7 or higher, got {args.opset}")
    if args.check_limit < 1:
        raise UsageError(f"--check_limit must be at least 1, got {args.check_limit}")
    if args.int8 and "onnx" not in formats:
        raise UsageError("--int8 makes an ONNX model: use it with --format onnx or all")
    weights = Path(args.weights)
    if weights.is_dir():
        hint = f" such as {weights / 'best.pth'}" if (weights / "best.pth").is_file() else ""
        raise UsageError(f"--weights {weights} is a folder; give a checkpoint file{hint}")
    if not weights.exists():
        raise UsageError(f"--weights {weights} does not exist")
    if weights.name.endswith((".onnx", ".torchscript.pt")):
        raise UsageError(f"--weights {weights} is already an exported model; give the .pth it came from")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file, not a folder")
    return formats, batch


def prepare_out_dir(out: Optional[str], weights: str) -> tuple[Path, bool]:
    """The output folder, created if needed, proven writable by writing (and removing) a probe file.
    Returns (folder, whether this run created it)."""
    folder = Path(out) if out is not None else Path(weights).parent
    flag = f"--out {folder}" if out is not None else f"the checkpoint's folder {folder} (choose another with --out)"
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".export-probe-"):
            pass
    except OSError as error:
        raise UsageError(f"{flag} is not writable: {error.strerror or error}") from None
    return folder, created


def main(argv: Optional[list[str]] = None) -> dict:
    """Export, check and save; returns the saved files and parity numbers (for tests and callers)."""
    args = get_args_parser().parse_args(argv)
    formats, batch = check_args(args)
    from inference.check_images import choose_check_images
    from inference.export import load_source, reference_probabilities

    source = load_source(args.weights, args.model, args.categories, args.input_shape)
    check = choose_check_images(args.check_images, source.class_names, source.preprocess, source.train_args,
                                args.check_limit)
    if args.int8 and check.generated:
        raise UsageError("--int8 calibrates on real images: give --check_images DIR (a few hundred of your images)")
    print(describe_source(source))
    print(f"Check images: {check.describe()}")
    for note in check.notes:
        print(f"note: {note}")
    reference = reference_probabilities(source, check.images)
    out_dir, created = prepare_out_dir(args.out, args.weights)
    try:
        results = [export_one(fmt, source, check, reference, out_dir, batch, args.opset) for fmt in formats]
    except BaseException:  # a failed export (exit 1 or 2, Ctrl-C) leaves no empty folder of ours behind
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    summary: dict = {"files": {r.format: str(r.path) for r in results},
                     "parity": {r.format: {"max_delta": r.parity.max_delta, "agree": r.parity.agree,
                                           "count": r.parity.count} for r in results}}
    if args.int8:
        summary["int8"] = report_int8(results[0].path, check)
    return summary


def describe_source(source: ExportSource) -> str:
    """The model line: what is exported, and from which file (the hash prefix tells copies apart)."""
    height, width = source.preprocess.input_size
    return (f"Model: {source.model_name}, {len(source.class_names)} classes, input {height}x{width} "
            f"({source.preprocess.resize_mode}), temperature {source.temperature:g}  "
            f"[{source.path}, sha256 {source.sha256[:12]}]")


def export_one(fmt: str, source: ExportSource, check: CheckImages, reference: np.ndarray, out_dir: Path,
               batch: Optional[int], opset: Optional[int]) -> ExportResult:
    """One format: export, parity check, save; a disagreement is one line and exit 1, no file."""
    from inference.export import ParityError, export_checked

    try:
        result = export_checked(source, fmt, out_dir, check.images, reference, batch, opset)
    except ParityError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    size_mb = result.path.stat().st_size / 1024**2
    print(f"{fmt}: {result.exporter}; batch {batch or 'dynamic'}; exported in {result.seconds:.1f} s")
    print(f"{fmt}: parity with PyTorch on {result.parity.count} images: {result.parity.describe()} "
          f"[{result.check_seconds:.1f} s]")
    print(f"{fmt}: saved {result.path} ({size_mb:.1f} MB)")
    return result


def report_int8(fp32_path: Path, check: CheckImages) -> dict:
    """Quantise the checked fp32 file; print speed, agreement and accuracy, and whether it was kept."""
    from inference.quantize import FASTER_BY, export_int8

    report = export_int8(fp32_path, check.images.numpy(), check.labels, check.origin)
    print(f"int8: {report.describe_speed()}")
    print(f"int8: {report.describe_accuracy()}")
    if report.path is not None:
        print(f"int8: saved {report.path} ({report.path.stat().st_size / 1024**2:.1f} MB)")
    else:
        print(f"int8: not kept: not at least {FASTER_BY:.0%} faster than fp32 on this machine")
    return {"path": str(report.path) if report.path else None, "fp32_ms": report.fp32_ms,
            "int8_ms": report.int8_ms, "accuracy": report.accuracy, "agree": report.parity.agree}


if __name__ == "__main__":
    keep_freed_memory()  # glibc keeps the memory a batch frees for the next one (utils/memory.py)
    run_cli(main, skip_teardown=True)
