"""Predict images with a trained checkpoint: one image, a folder, a glob or a .txt list of paths.

    python infer.py --weights logs/<run>/best.pth --image_path photos/
    python infer.py --weights logs/<run>/best.pth --image_path photo.jpg --show
    python infer.py --weights other.pth --image_path photos/ --model resnet50 --categories daisy,rose

The checkpoint says which model, classes and preprocessing to use. Results go to a new folder
SAVE_DIR/<YYYYmmdd-HHMMSS>_<model>/ (never over an earlier run): predictions.txt (the original
template's format), predictions.csv, predictions.json and pictures. A folder laid out as
<class>/<images> with the checkpoint's class names is also evaluated: metrics, per-class table,
confusion matrix, misclassified.csv. See README "Predicting: infer.py".
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from inference.inputs import ImageInputs, Labels, add_bare_state_dict_args, find_labels, resolve_inputs
from inference.options import add_cam_args, add_min_confidence_arg, check_min_confidence
from inference.options import resolve_min_confidence as shared_resolve_min_confidence

# Only torch-free modules at the top: the flags and --image_path are checked before torch loads
# (seconds), so a typo fails at once. The functions below import what they need.
from utils.cli import run_cli
from utils.errors import UsageError
from utils.files import check_output_dir
from utils.memory import keep_freed_memory, let_waiting_threads_sleep

if TYPE_CHECKING:
    import numpy as np
    from tqdm import tqdm

    from inference.cam import HeatMaps
    from inference.predictor import PredictionBatch, Predictions, Predictor

MAX_LISTED = 20  # unreadable files printed to the console; all of them are in the output files
ANNOTATED_MIN_SIDE = 320  # a single image smaller than this is enlarged so its label is readable


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Predict images with a checkpoint from train.py (or a bare state_dict).",
        add_help=add_help)
    parser.add_argument("--weights", required=True,
                        help="checkpoint (logs/<run>/best.pth), a bare state_dict file, or an .onnx from export.py "
                             "(run by onnxruntime)")
    parser.add_argument("--image_path", "--image-path", nargs="+", required=True, metavar="PATH",
                        help="image file(s), folder(s) (searched recursively), glob(s) such as 'photos/*.jpg', "
                             "or a .txt file with one image path per line")
    add_bare_state_dict_args(parser)
    speed = parser.add_argument_group("speed")
    speed.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; default %(default)s")
    speed.add_argument("--batch_size", "--batch-size", type=int, default=64, help="images per forward pass; default %(default)s")
    speed.add_argument("--workers", type=int, default=None,
                       help="processes that decode images (DataLoader workers); default: 0 on the CPU, where threads of "
                            "this process decode one batch ahead of the model, sized from the first batch's timing; "
                            "on a GPU by image count and cores")
    speed.add_argument("--amp", action="store_true", help="mixed precision (fp16/bf16 on GPU; bf16 on CPUs that have it)")
    output = parser.add_argument_group("output")
    output.add_argument("--topk", "--top_k", "--top-k", type=int, default=5,
                        help="classes per image in predictions.csv/json and on the console; default %(default)s")
    output.add_argument("--save_dir", "--save-dir", default="results",
                        help="results go to SAVE_DIR/<time>_<model>/, a new folder each run; default %(default)s")
    output.add_argument("--num_show", "--num-show", type=int, default=5,
                        help="images in the sample grid and in the worst-mistakes grid, 0 for none; default %(default)s")
    add_min_confidence_arg(output)
    output.add_argument("--cam", action="store_true",
                        help="heat maps (pytorch-grad-cam) of where the model looked for its predicted class: "
                             "cam/<name>.jpg per image and cam_x, cam_y (the peak, original pixels) in predictions.csv/json")
    add_cam_args(output, "with --cam")
    output.add_argument("--seed", type=int, default=0, help="picks the sample grid's images; default %(default)s")
    output.add_argument("--show", action="store_true",
                        help="also open the picture in a window (only where a display exists)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag, smallest in (("batch_size", 1), ("topk", 1), ("num_show", 0), ("workers", 0)):
        value = getattr(args, flag)
        if value is not None and value < smallest:
            raise UsageError(f"--{flag} must be at least {smallest}, got {value}")
    check_output_dir(args.save_dir, "--save_dir")  # now, not after the model ran on every image
    if not Path(args.weights).is_file():  # before torch loads (seconds): a typo fails at once
        raise UsageError(f"checkpoint {args.weights} does not exist (--weights)")
    check_min_confidence(args.min_confidence)


def resolve_min_confidence(args: argparse.Namespace, predictor: Predictor) -> Optional[float]:
    """--min_confidence as a number; 'auto' reads the checkpoint's suggested_min_confidence."""
    return shared_resolve_min_confidence(args.min_confidence, predictor.checkpoint_info, args.weights)


def main(argv: Optional[list[str]] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    inputs = resolve_inputs(args.image_path)  # before the model loads: a typo fails in a second
    predictor = load_predictor(args)
    min_confidence = resolve_min_confidence(args, predictor)
    labels, labels_note = find_labels(inputs, predictor.class_names)
    print(f"Model: {predictor.describe()}  [{args.weights}{describe_epoch(predictor.checkpoint_info)}]")
    for note in ignored_flag_notes(args, predictor) + ([labels_note] if labels_note else []):
        print(f"note: {note}")
    if not inputs.single:
        print(describe_inputs(inputs, labels))
    for folder, reason in inputs.unreadable_folders:
        print(f"warning: cannot list folder {folder} ({reason}): its images are not predicted", file=sys.stderr)
    heat = load_heat_maps(args, predictor) if args.cam else None  # a wrong --cam_layer fails before predicting

    results, seconds = predict(predictor, inputs, labels, args)
    results.temperature, results.min_confidence = predictor.temperature, min_confidence
    if inputs.single and results.errors[0]:
        raise UsageError(results.errors[0])
    started = time.perf_counter()
    metrics = results.metrics()  # None unless a labelled tree
    run_dir, cam_pictures = write_outputs(results, metrics, inputs, predictor, args, heat)
    reported = time.perf_counter()
    if inputs.single:
        report_single(results, args.topk)
        draw_safely(save_single_picture, results, run_dir, args.show)
    else:
        report_many(results, metrics, seconds, args.batch_size, predictor.decoding)
        draw_safely(save_grids, results, run_dir, args.num_show, args.seed, args.show, cam_pictures)
    from inference.results import output_listing

    print(f"Results in {run_dir}:\n{output_listing(run_dir)}")
    print(f"Time: predicting {seconds:.2f} s, metrics and files {reported - started:.2f} s, "
          f"pictures {time.perf_counter() - reported:.2f} s")
    readable = int(results.readable.sum())
    if readable == 0:
        raise UsageError(f"none of the {len(results)} images could be read (listed in {run_dir / 'predictions.csv'})")
    return {"run_dir": str(run_dir), "count": len(results), "readable": readable,
            "metrics": {k: v for k, v in metrics.items() if k != "confusion"} if metrics else None}


def load_predictor(args: argparse.Namespace) -> Predictor:
    from inference.predictor import Predictor, parse_categories

    predictor = Predictor.from_file(args.weights, args.device, model_name=args.model,
                                    class_names=parse_categories(args.categories),
                                    input_shape=args.input_shape, amp=args.amp)
    if args.cam and predictor.model is None:  # refused before predicting, not after
        raise UsageError(f"--cam needs the PyTorch checkpoint: {args.weights} runs in onnxruntime, which has no "
                         "layers to read heat maps from; give the .pth it was exported from")
    return predictor


def describe_epoch(info: dict) -> str:
    return f", epoch {info['epoch']}" if info.get("epoch") is not None else ""


def ignored_flag_notes(args: argparse.Namespace, predictor: Predictor) -> list[str]:
    """A train.py checkpoint (or an .onnx from export.py) decides model and preprocessing; say so
    when flags ask otherwise."""
    from utils.transforms import parse_input_shape

    if not predictor.checkpoint_info.get("format"):
        return []
    notes = []
    if args.amp and predictor.backend.name == "onnxruntime":
        notes.append(f"--amp ignored: {args.weights} runs in onnxruntime in the precision it was exported in")
    if args.model and args.model != predictor.model_name:
        notes.append(f"--model {args.model} ignored: {args.weights} holds a {predictor.model_name}")
    if args.input_shape and parse_input_shape(args.input_shape) != list(predictor.preprocess.input_size):
        height, width = predictor.preprocess.input_size
        notes.append(f"--input_shape ignored: the checkpoint was trained at {height}x{width} and uses that")
    if args.categories:
        notes.append(f"--categories renames the checkpoint's classes to: {', '.join(predictor.class_names)}")
    return notes


def describe_inputs(inputs: ImageInputs, labels: Optional[Labels]) -> str:
    where = inputs.folder or ", ".join(inputs.sources[:3]) + (" ..." if len(inputs.sources) > 3 else "")
    tree = f" (labelled tree: {len(labels.class_folders)} class folders)" if labels else ""
    return f"Images: {len(inputs.paths)} from {where}{tree}"


def predict(predictor: Predictor, inputs: ImageInputs, labels: Optional[Labels],
            args: argparse.Namespace) -> tuple[Predictions, float]:
    """All images through Predictor.predict_paths in batches; returns (Predictions, seconds)."""
    from tqdm import tqdm

    from inference.predictor import Predictions, prediction_workers

    workers = args.workers if args.workers is not None else prediction_workers(len(inputs.paths), predictor.device)
    workers = min(workers, len(inputs.paths))
    started = time.perf_counter()
    batches = predictor.predict_paths(inputs.paths, args.batch_size, workers)
    show_bar = sys.stderr.isatty() and not inputs.single
    with tqdm(total=len(inputs.paths), desc="predicting", unit="img", disable=not show_bar) as bar:
        results = Predictions.collect(_counted(batches, bar), predictor.class_names,
                                      labels.indices if labels else None)
    return results, time.perf_counter() - started


def _counted(batches: Iterable[PredictionBatch], bar: tqdm) -> Iterator[PredictionBatch]:
    for batch in batches:
        bar.update(len(batch.paths))
        yield batch


def write_outputs(results: Predictions, metrics: Optional[dict], inputs: ImageInputs, predictor: Predictor,
                  args: argparse.Namespace, heat: Optional[HeatMaps] = None) -> tuple[Path, dict[int, Path]]:
    """predictions.txt/.csv/.json, and for a labelled tree the metrics files; with --cam the heat
    maps first. Returns (run folder, {image index: its cam/<name>.jpg})."""
    from inference.results import write_csv, write_json_report, write_misclassified, write_txt
    from utils.checkpoint import timestamp
    from utils.logger import new_run_dir

    run_dir = new_run_dir(args.save_dir, predictor.model_name, subdirs=(), flag="--save_dir")
    cam = add_heat_maps(results, predictor, heat, run_dir, args.batch_size) if heat else None
    write_txt(results, run_dir / "predictions.txt")
    write_csv(results, run_dir / "predictions.csv", args.topk)
    run = {"checkpoint": args.weights, "model": predictor.model_name, "inputs": inputs.sources,
           "device": str(predictor.device), "created": timestamp(), "topk": args.topk,
           "temperature": predictor.temperature, "min_confidence": results.min_confidence}
    if cam:
        run["cam"] = {key: cam[key] for key in ("method", "layer", "map_size")}
    write_json_report(results, run_dir / "predictions.json", args.topk, run, metrics)
    if metrics is not None:
        from utils.metrics import per_class_rows, plot_confusion_matrix, plot_curves, write_per_class_csv

        write_per_class_csv(per_class_rows(metrics["confusion"], results.class_names), run_dir / "per_class.csv")
        title = Path(inputs.folder or ".").name
        plot_confusion_matrix(metrics["confusion"], results.class_names, run_dir / "confusion_matrix.png",
                              title=f"{title} confusion matrix")
        log_probs, targets = results.evaluated_outputs()  # calibrated: undo T for the reliability diagram's "raw"
        plot_curves(log_probs * results.temperature, targets, results.class_names, run_dir, title=title,
                    temperature=results.temperature)  # roc.png, pr.png, reliability.png
        write_misclassified(results, run_dir / "misclassified.csv")
    return run_dir, cam["pictures"] if cam else {}


def load_heat_maps(args: argparse.Namespace, predictor: Predictor) -> HeatMaps:
    """The --cam method at its layer (inference.cam chooses one whose map is at least 7x7 unless
    --cam_layer names it), said on the console."""
    from inference.cam import HeatMaps

    heat = HeatMaps(predictor.model, predictor.model_name, predictor.preprocess, predictor.device,
                    args.cam_method, args.cam_layer)
    print(f"note: --cam: {args.cam_method} heat maps from layer {heat.description}")
    return heat


def add_heat_maps(results: Predictions, predictor: Predictor, heat: HeatMaps, run_dir: Path, batch_size: int) -> dict:
    """cam/<name>.jpg for every readable image (the ORIGINAL image with the heat map of its predicted
    class) and results.cam_points: each peak in original image pixels (inference.cam). Returns
    {"pictures": {image index: its cam/<name>.jpg}, "method", "layer", "map_size"}."""
    import torch

    from inference.cam import overlay_on_original
    from utils.data import read_rgb
    from utils.visualize import save_rgb

    _, predicted = results.top1()
    results.cam_points = torch.full((len(results), 2), float("nan"))
    folder, pictures, used = run_dir / "cam", {}, set()
    folder.mkdir()
    readable = results.readable.nonzero().flatten().tolist()
    for start in range(0, len(readable), batch_size):
        chosen = readable[start:start + batch_size]
        originals = [read_rgb(results.paths[i]) for i in chosen]
        views = torch.stack([predictor.transform(torch.from_numpy(a).permute(2, 0, 1)) for a in originals])
        maps = heat(views, [int(predicted[i]) for i in chosen])
        for i, original, heat_map in zip(chosen, originals, maps):
            results.cam_points[i] = torch.tensor(heat.peak(heat_map, original.shape[:2]))
            name = Path(results.paths[i]).stem
            name = name if name not in used else f"{name}_{i}"  # two folders may hold the same name
            used.add(name)
            pictures[i] = save_rgb(folder / f"{name}.jpg", overlay_on_original(original, heat_map, predictor.preprocess))
    return {"pictures": pictures, "method": heat.method, "layer": heat.layer_name, "map_size": list(heat.map_size)}


def report_single(results: Predictions, k: int) -> None:
    """The template's three lines, then the runners-up."""
    (pairs,) = results.topk(k)
    name, probability = pairs[0]
    (answer,) = results.answers()
    print(f"Image: {results.paths[0]}\nPredicted class: {answer}\nProbability: {probability:.2%}")
    if answer != name:
        print(f"Best guess: {name} (below --min_confidence {results.min_confidence:.2%})")
    if len(pairs) > 1:
        print(f"Top {len(pairs)}: " + ", ".join(f"{n} {p:.2%}" for n, p in pairs))


def report_many(results: Predictions, metrics: Optional[dict], seconds: float, batch_size: int,
                decoding: dict) -> None:
    rate = len(results) / seconds if seconds > 0 else float("inf")
    print(f"Predicted {len(results)} images in {seconds:.2f} s ({rate:.1f} images/s; batch {batch_size}, "
          f"{describe_decoding(decoding)})")
    report_unreadable(results.unreadable())
    if metrics is None:
        counts = Counter(answer for answer in results.answers() if answer is not None)
        if counts:
            print("Images per predicted class: " + ", ".join(f"{name}: {count}" for name, count in counts.most_common()))
        return
    from utils.metrics import format_metrics, format_per_class, per_class_rows

    print(f"Metrics over {metrics['count']} labelled images: {format_metrics(metrics)}  "
          f"ece_calibrated {metrics['ece_calibrated']:.4f} (temperature {results.temperature:.4g})")
    if results.min_confidence is not None:
        covered = metrics["covered_accuracy"]
        print(f"Unknown (top probability below {results.min_confidence:.2%}): {metrics['unknown']} of {metrics['count']}; "
              f"coverage {metrics['coverage']:.2%}, accuracy on the answered "
              + (f"{covered:.2%}" if covered is not None else "n/a"))
    print(format_per_class(per_class_rows(metrics["confusion"], results.class_names)))
    print(f"Misclassified: {len(results.mistakes())} of {metrics['count']}")


def describe_decoding(decoding: dict) -> str:
    """'2 decode threads, 2 torch threads' or '1 worker process, 1 torch thread'."""
    def count(number: int, what: str) -> str:
        return f"{number} {what}{'' if number == 1 else 's'}"

    workers = decoding.get("workers", 0)
    decoders = count(workers, "worker process") if workers else count(decoding.get("decode_threads", 0), "decode thread")
    return f"{decoders}, {count(decoding.get('torch_threads', 0), 'torch thread')}"


def report_unreadable(unreadable: list[tuple[str, str]]) -> None:
    if not unreadable:
        return
    print(f"warning: {len(unreadable)} unreadable image(s), listed in the outputs as unreadable:", file=sys.stderr)
    for _, error in unreadable[:MAX_LISTED]:
        print(f"  {error}", file=sys.stderr)
    if len(unreadable) > MAX_LISTED:
        print(f"  ... and {len(unreadable) - MAX_LISTED} more", file=sys.stderr)


def draw_safely(draw: Callable[..., None], *args: object) -> None:
    """Pictures come after the result files: a failure drawing them (a file changed meanwhile,
    a codec or font problem) is a warning, never a lost run."""
    try:
        draw(*args)
    except Exception as error:  # any drawing failure; the predictions are already saved
        print(f"warning: pictures not drawn: {type(error).__name__}: {error}", file=sys.stderr)


def save_single_picture(results: Predictions, run_dir: Path, show: bool) -> None:
    from utils.data import read_rgb
    from utils.visualize import annotate, caption_lines, save_rgb

    (pairs,) = results.topk(1)
    picture = annotate(read_rgb(results.paths[0]), caption_lines(*pairs[0]), min_side=ANNOTATED_MIN_SIDE)
    saved = save_rgb(run_dir / f"{Path(results.paths[0]).stem}_pred.jpg", picture)
    if show:
        show_picture(picture, saved)


def save_grids(results: Predictions, run_dir: Path, count: int, seed: int, show: bool,
               cam_pictures: dict[int, Path]) -> None:
    """samples.png: `count` random readable images; worst_mistakes.png: the most confident errors.
    With --cam, each image is its heat-map picture (cam/<name>.jpg, already written: not recomputed)."""
    if count == 0:
        return
    readable = results.readable.nonzero().flatten().tolist()
    if not readable:
        return
    chosen = sorted(random.Random(seed).sample(readable, min(count, len(readable))))
    samples = draw_grid(results, chosen, run_dir / "samples.png", cam_pictures)
    mistakes = results.mistakes()[:count]
    if mistakes:
        draw_grid(results, mistakes, run_dir / "worst_mistakes.png", cam_pictures)
    if show:
        show_picture(samples, run_dir / "samples.png")


def draw_grid(results: Predictions, indices: list[int], path: Path, cam_pictures: dict[int, Path]) -> np.ndarray:
    from utils.data import read_rgb
    from utils.visualize import GRID_TILE_SIDE, caption_colour, caption_lines, prediction_grid, save_rgb

    confidence, predicted = results.top1()
    images, captions, colours = [], [], []
    for i in indices:
        name = results.class_names[int(predicted[i])]
        truth = results.class_names[int(results.labels[i])] if results.labels is not None else None
        # a tile needs no more pixels than its side: large JPEGs are decoded smaller (read_rgb's min_size)
        images.append(read_rgb(cam_pictures.get(i, results.paths[i]), [GRID_TILE_SIDE, GRID_TILE_SIDE]))
        captions.append(caption_lines(name, float(confidence[i]), truth))
        colours.append(caption_colour(name, truth))
    grid = prediction_grid(images, captions, colours)
    save_rgb(path, grid)
    return grid


def show_picture(picture: np.ndarray, saved: Path) -> None:
    from utils.visualize import show_image

    why_not = show_image(picture, saved.name)
    if why_not:
        print(f"note: --show: {why_not}; the picture is saved as {saved}")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


if __name__ == "__main__":
    warnings.formatwarning = _one_line_warning  # library warnings as one line, like our errors
    keep_freed_memory()  # glibc keeps the memory a batch frees for the next one (utils/memory.py)
    let_waiting_threads_sleep()  # the decode threads and the forward pass share the cores
    run_cli(main, skip_teardown=True)
