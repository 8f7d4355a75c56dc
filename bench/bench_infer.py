"""Folder inference speed: infer.py's batched DataLoader path against a one-image-at-a-time loop.

    python bench/bench_infer.py            # 300 JPEGs of 500x375, mobilenet_v3_small at 224
    python bench/bench_infer.py --quick    # CI smoke test, well under a minute
    python bench/bench_infer.py --model resnet18 --images 200

Every row uses the same Predictor (model loaded once, eval, inference_mode, channels_last for
CNNs) and the same reader and preprocessing, so the rows differ in batching, decoding workers
and threads only:
  per-image loop              for each path: read_rgb -> resize -> normalise -> forward a batch
                              of one, with torch's default threads (one per core): the baseline
  per-image loop, 1 thread    the same on one thread (full run only; see below)
  batched, 0 workers          Predictor.predict_paths without DataLoader workers
  batched, N workers          what infer.py runs: workers decode, the model gets the other cores
The checkpoint holds random weights (nothing is downloaded); speed does not depend on them.

A second table compares backends on the same decoded, resized uint8 images (no file reading):
  torch eager, batch 1 / 64        Predictor.predict_batch (normalise, forward, softmax)
  onnxruntime fp32, batch 1 / 64   the checkpoint exported in-process (inference.export), run by
                                   Predictor.from_file on the .onnx, CPU provider
  onnxruntime int8, batch 1 / 64   full run only, and only when export.py would keep it (>= 5% faster)
each as images/s and as a fraction of the ceiling: torch's forward pass alone at batch 64 on
already-normalised float input, measured in the same interleaved rounds.

On a CPU that other processes also use, torch's one-thread-per-core default is slow for small
batches: every layer waits for a descheduled thread. The 1-thread loop row shows how much of
the speed-up comes from not oversubscribing rather than from batching. The variants run
interleaved for --rounds rounds; the table shows each one's median and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inference.predictor import PathDataset, Predictions, Predictor, inference_workers  # noqa: E402
from models.registry import create_model  # noqa: E402
from utils.checkpoint import CHECKPOINT_FORMAT, save_checkpoint  # noqa: E402
from utils.data import read_rgb  # noqa: E402
from utils.transforms import Preprocess, normalize_batch  # noqa: E402
from utils.visualize import save_rgb  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cpu_model, interleaved, markdown_table, photo_like  # noqa: E402

CLASS_NAMES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Batched folder inference vs a per-image loop (images/s).")
    parser.add_argument("--quick", action="store_true", help="few images, one round: a smoke test")
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--images", type=int, default=300, help="JPEGs in the folder (the loop times a third)")
    parser.add_argument("--image_size", "--image-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    parser.add_argument("--input_shape", "--input-shape", type=int, default=224)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="default: what infer.py picks")
    parser.add_argument("--rounds", type=int, default=3)
    return parser


def make_photos(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """Photo-like JPEGs (benchlib.photo_like, the generator bench_train uses), `size` = (W, H)."""
    rng = np.random.default_rng(seed)
    width, height = size
    return [str(save_rgb(folder / f"photo_{i:04d}.jpg", photo_like(rng, height, width), quality=90))
            for i in range(count)]


def make_checkpoint(path: Path, model_name: str, input_size: int) -> Path:
    torch.manual_seed(0)
    model = create_model(model_name, len(CLASS_NAMES), (input_size, input_size))
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model": model_name, "class_names": CLASS_NAMES,
                     "state_dict": model.state_dict(),
                     "preprocess": Preprocess(input_size=[input_size, input_size]).to_dict(), "epoch": 0}, path)
    return path


def run_loop(predictor: Predictor, paths: list[str]) -> float:
    """The baseline a first script would write: one image at a time. Returns images/s."""
    started = time.perf_counter()
    for path in paths:
        predictor.predict_arrays([read_rgb(path)])
    return len(paths) / (time.perf_counter() - started)


def run_loop_one_thread(predictor: Predictor, paths: list[str]) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_loop(predictor, paths)
    finally:
        torch.set_num_threads(before)


def run_batched(predictor: Predictor, paths: list[str], batch_size: int, workers: int) -> float:
    """What infer.py does (worker start-up included). Returns images/s."""
    started = time.perf_counter()
    results = Predictions.collect(predictor.predict_paths(paths, batch_size, workers), predictor.class_names)
    assert len(results) == len(paths) and not results.unreadable()
    return len(paths) / (time.perf_counter() - started)


def load_average() -> str:
    try:
        return " ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.images, args.rounds = 64, 1
    workers = inference_workers(args.images, torch.device("cpu")) if args.workers is None else args.workers
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as temp:
        folder = Path(temp)
        paths = make_photos(folder, args.images, tuple(args.image_size))
        loop_paths = paths[: 4 if args.quick else len(paths) // 3]  # the loop is slow; its rate is per image
        checkpoint = make_checkpoint(folder / "random.pth", args.model, args.input_shape)
        predictor = Predictor.from_checkpoint(str(checkpoint), device="cpu")
        run_loop(predictor, paths[:4])  # warm-up: first-call allocations and kernel selection
        run_batched(predictor, paths[:8], args.batch_size, 0)
        variants = {"per-image loop (batch 1)": lambda: run_loop(predictor, loop_paths)}
        if not args.quick:  # a loop on one thread dodges OpenMP's waits on a busy CPU: shown for fairness
            variants["per-image loop (batch 1), 1 thread"] = lambda: run_loop_one_thread(predictor, loop_paths)
        if workers:  # shows what batching alone gives, before parallel decoding
            variants[f"batched, batch {args.batch_size}, 0 workers"] = \
                lambda: run_batched(predictor, paths, args.batch_size, 0)
        variants[f"batched, batch {args.batch_size}, {workers} worker{'' if workers == 1 else 's'} (infer.py)"] = \
            lambda: run_batched(predictor, paths, args.batch_size, workers)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for round_index in range(args.rounds):
            for name in names[round_index % len(names):] + names[: round_index % len(names)]:  # rotate the order
                rates[name].append(variants[name]())
        backend_rates, backend_table = bench_backends(predictor, checkpoint, paths, args)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    layout = "channels_last" if predictor.channels_last else "NCHW"
    print(f"Folder inference, {args.model} ({layout}) at {args.input_shape}x{args.input_shape}, "
          f"{args.image_size[0]}x{args.image_size[1]} JPEGs, CPU {cpu_model()} ({torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores), torch {torch.__version__}; median of {args.rounds} interleaved round(s); "
          f"load average {load_average()}")
    print_table(medians, {name: len(loop_paths) if name.startswith("per-image") else len(paths) for name in names})
    print(f"\nBackends on decoded {args.input_shape}x{args.input_shape} uint8 images (no file reading), "
          f"median of {args.rounds} interleaved round(s); ceiling: torch forward only, batch 64, float input\n")
    print(backend_table)
    return {**medians, **backend_rates}


def decoded_images(predictor: Predictor, paths: list[str], count: int) -> torch.Tensor:
    """`count` uint8 [3, H, W] images, read and resized as infer.py does (PathDataset), repeated as needed."""
    dataset = PathDataset(paths, predictor.preprocess)
    return torch.stack([dataset[i % len(paths)][0] for i in range(count)])


def images_per_second(predict, images: torch.Tensor, batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        predict(images[start:start + batch])
    return len(images) / (time.perf_counter() - started)


def backend_runs(predictor: Predictor, checkpoint: Path, images: torch.Tensor, int8: bool) -> dict:
    """name -> (batch, predict function): torch eager, onnxruntime fp32 (and int8 when it is kept)."""
    from inference.export import export_onnx, load_source
    from inference.quantize import FASTER_BY, milliseconds_per_image, quantize_int8

    onnx_path = checkpoint.with_suffix(".onnx")
    export_onnx(load_source(checkpoint), None, None, onnx_path)
    onnx_predictor = Predictor.from_file(str(onnx_path), device="cpu")
    models = {"torch eager": predictor, "onnxruntime fp32": onnx_predictor}
    if int8:
        int8_path = checkpoint.with_suffix(".int8.onnx")
        quantize_int8(onnx_predictor.backend.onnx_model, int8_path, images[:64].numpy(), "bench photos")
        int8_predictor = Predictor.from_file(str(int8_path), device="cpu")
        fp32_ms, int8_ms = milliseconds_per_image([onnx_predictor.backend.onnx_model,
                                                   int8_predictor.backend.onnx_model], images[:64].numpy())
        if int8_ms <= fp32_ms * (1 - FASTER_BY):
            models["onnxruntime int8"] = int8_predictor
        else:
            print(f"note: int8 not kept (export.py's rule): {int8_ms:.2f} vs fp32 {fp32_ms:.2f} ms/image")
    return {f"{name}, batch {batch}": (batch, model.predict_batch) for name, model in models.items() for batch in (1, 64)}


def bench_backends(predictor: Predictor, checkpoint: Path, paths: list[str],
                   args: argparse.Namespace) -> tuple[dict[str, float], str]:
    images = decoded_images(predictor, paths, 64 if args.quick else 128)
    model, device = predictor.model, predictor.device
    normalised = normalize_batch(images[:64], predictor.preprocess, channels_last=predictor.channels_last)

    @torch.inference_mode()
    def ceiling() -> float:
        started = time.perf_counter()
        for _ in range(0, len(images), 64):
            model(normalised.to(device))
        return len(images) / (time.perf_counter() - started)

    runs = {name: (lambda p=predict, b=batch: images_per_second(p, images, b))
            for name, (batch, predict) in backend_runs(predictor, checkpoint, images, not args.quick).items()}
    ceiling_name = "ceiling: torch forward only, batch 64"
    samples = interleaved({ceiling_name: ceiling, **runs}, args.rounds)
    rates = {name: statistics.median(values) for name, values in samples.items()}
    rows = [(name, len(images), f"{rate:.1f}", f"{1000 / rate:.2f}",
             f"{statistics.median(a / b for a, b in zip(samples[name], samples[ceiling_name])):.2f}")
            for name, rate in rates.items()]
    return rates, markdown_table(["backend", "images", "images/s", "ms/image", "of ceiling"], rows)


def print_table(medians: dict[str, float], counts: dict[str, int]) -> None:
    baseline = next(iter(medians.values()))
    print()
    print("| path | images | images/s | ms/image | speed-up |")
    print("|------|-------:|---------:|---------:|---------:|")
    for name, rate in medians.items():
        print(f"| {name} | {counts[name]} | {rate:.1f} | {1000 / rate:.1f} | {rate / baseline:.2f}x |")


if __name__ == "__main__":
    main()
