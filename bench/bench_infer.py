"""Folder inference speed: infer.py against a one-image-at-a-time loop, and against the model's ceiling.

    python bench/bench_infer.py            # whole processes, then the in-process and backend tables
    python bench/bench_infer.py --quick    # smoke test: 128 + 32 images, one round (minutes on 2 busy cores)
    python bench/bench_infer.py --model resnet18 --images 200

Whole processes (issue 18), first: infer.py as a user runs it (a subprocess, a labelled tree, so
it also writes the metrics, plots and pictures) against bench/per_image_loop.py (a subprocess:
load once, then read, preprocess and forward one image at a time), on --small_images 64 px JPEGs
(--small_model at 64 px) and --large_images 500x375 JPEGs (--model at --input_shape). Per round,
the forward pass alone on already-normalised batches (same model, batch, layout, threads: the
ceiling) is measured in this process right before and right after infer.py (the mean of the two). Reported: whole-process speed-up, infer.py's
prediction phase (its "Predicted ... in" line) as a share of the ceiling, and the seconds infer.py
spends on metrics and files and on pictures (its "Time:" line) against predicting. Each round also
runs infer.py on the same files hard-linked into one folder without class folders: the loop's own
job (predictions only, no metrics or plots), the like-for-like speed-up. Goals: speed-up >= 2x on
the small images, prediction >= 90% of the ceiling and files + pictures <= predicting on both.

Then, in one process:

Every row uses the same Predictor (model loaded once, eval, inference_mode, channels_last for
CNNs) and the same reader and preprocessing, so the rows differ in batching, decoding workers
and threads only:
  per-image loop              for each path: read_rgb -> resize -> normalise -> forward a batch
                              of one, with torch's default threads (one per core): the baseline
  per-image loop, 1 thread    the same on one thread (full run only; see below)
  batched, 1 worker process   Predictor.predict_paths with a DataLoader worker (infer.py before
                              issue 18: the model got the cores the worker left free)
  batched, decode threads     what infer.py runs on the CPU: threads decode one batch ahead, the
                              model keeps all its threads
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
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inference.predictor import PathDataset, Predictions, Predictor  # noqa: E402
from models.registry import create_model  # noqa: E402
from utils.checkpoint import CHECKPOINT_FORMAT, save_checkpoint  # noqa: E402
from utils.data import available_cores, read_rgb  # noqa: E402
from utils.memory import keep_freed_memory  # noqa: E402
from utils.transforms import Preprocess, normalize_batch  # noqa: E402
from utils.visualize import save_rgb  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, cpu_model, interleaved, markdown_table, photo_like  # noqa: E402

CLASS_NAMES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Batched folder inference vs a per-image loop (images/s).")
    parser.add_argument("--quick", action="store_true", help="few images, one round: a smoke test")
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--images", type=int, default=300, help="JPEGs in the folder (the loop times a third)")
    parser.add_argument("--image_size", "--image-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    parser.add_argument("--input_shape", "--input-shape", type=int, default=224)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small_images", "--small-images", type=int, default=900,
                        help="64 px JPEGs for the whole-process rows; default %(default)s")
    parser.add_argument("--small_model", "--small-model", default="resnet18", help="model at 64 px for them")
    parser.add_argument("--large_images", "--large-images", type=int, default=150,
                        help="500x375 JPEGs for the whole-process rows (--model at --input_shape); default %(default)s")
    parser.add_argument("--skip_in_process", "--skip-in-process", action="store_true",
                        help="whole-process rows only")
    return parser


def make_photos(folder: Path, count: int, size: tuple[int, int], seed: int = 0, labelled: bool = False) -> list[str]:
    """Photo-like JPEGs (benchlib.photo_like, the generator bench_train uses), `size` = (W, H);
    `labelled`: in class folders (CLASS_NAMES, round robin), so infer.py evaluates them."""
    rng = np.random.default_rng(seed)
    width, height = size
    for name in CLASS_NAMES if labelled else []:
        (folder / name).mkdir(parents=True, exist_ok=True)
    return [str(save_rgb(folder / (CLASS_NAMES[i % len(CLASS_NAMES)] if labelled else "") / f"photo_{i:04d}.jpg",
                         photo_like(rng, height, width), quality=90))
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
        args.images, args.rounds, args.small_images, args.large_images = 64, 1, 128, 32
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads), torch "
          f"{torch.__version__}; load average at start {load_average()}\n")
    whole = bench_whole_processes(args)
    if args.skip_in_process:
        return whole
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
        variants[f"batched, batch {args.batch_size}, 1 worker process (before)"] = \
            lambda: run_batched(predictor, paths, args.batch_size, 1)
        variants[f"batched, batch {args.batch_size}, decode threads (infer.py)"] = \
            lambda: run_batched(predictor, paths, args.batch_size, 0)
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
    return {**whole, **medians, **backend_rates}


PREDICTED = re.compile(r"Predicted (\d+) images in ([\d.]+) s")
TIMES = re.compile(r"Time: predicting ([\d.]+) s, metrics and files ([\d.]+) s, pictures ([\d.]+) s")


def timed_process(*command: str) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - started, result.stdout


def run_infer_process(checkpoint: Path, folder: Path, save_dir: Path, batch_size: int) -> dict[str, float]:
    """infer.py as a user runs it: wall seconds, and its own prediction / files / pictures seconds."""
    wall, out = timed_process("infer.py", "--weights", str(checkpoint), "--image_path", str(folder),
                              "--save_dir", str(save_dir), "--batch_size", str(batch_size))
    count, predicting = PREDICTED.search(out).groups()
    _, files, pictures = TIMES.search(out).groups()
    decoding = out.split("images/s; ", 1)[1].split(")", 1)[0].split(", ", 1)[1]  # after "batch N, "
    return {"wall": wall, "rate": int(count) / float(predicting), "predicting": float(predicting),
            "files": float(files), "pictures": float(pictures), "decoding": decoding}


def forward_ceiling(checkpoint: Path, paths: list[str], batch_size: int, batches: int) -> float:
    """Images/s of the forward pass alone: the same model, batch, layout and threads as infer.py,
    on images decoded and normalised beforehand."""
    predictor = Predictor.from_checkpoint(str(checkpoint), device="cpu")
    images = decoded_images(predictor, paths, batch_size)
    normalised = normalize_batch(images, predictor.preprocess, channels_last=predictor.channels_last)
    with torch.inference_mode():
        predictor.model(normalised)  # warm-up: oneDNN picks its kernels
        started = time.perf_counter()
        for _ in range(batches):
            predictor.model(normalised)
    return batches * batch_size / (time.perf_counter() - started)


def decode_core_seconds(checkpoint: Path, paths: list[str], most: int = 200) -> float:
    """CPU seconds one decode thread spends per image (read, decode, resize to the model's input),
    as infer.py's decode threads run it: torch on one thread."""
    dataset = PathDataset(paths[:most], Predictor.from_checkpoint(str(checkpoint), device="cpu").preprocess)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset[0]  # first-call costs (plugin imports, resize kernels) are not per image
        started = time.thread_time()
        for index in range(len(dataset)):
            dataset[index]
        return (time.thread_time() - started) / len(dataset)
    finally:
        torch.set_num_threads(threads)


def ceiling_share_cap(ceiling: float, decode_seconds: float) -> float:
    """The most of the forward ceiling any prediction can reach on this machine: per image, the
    forward pass takes 1/ceiling s on every core and decoding takes `decode_seconds` of one core,
    and together they cannot run faster than the cores allow."""
    forward = 1 / ceiling
    return forward / (forward + decode_seconds / available_cores())


def whole_process_round(case: dict, args: argparse.Namespace, save_dir: Path, loop_first: bool) -> dict[str, float]:
    """One round: the loop (first or last, alternating between rounds) and infer.py between two
    measurements of the ceiling."""
    def loop() -> float:
        return timed_process(str(REPO / "bench" / "per_image_loop.py"), str(case["checkpoint"]), str(case["folder"]))[0]

    batches = max(2, min(8, len(case["paths"]) // args.batch_size))
    loop_wall = loop() if loop_first else 0.0
    before = forward_ceiling(case["checkpoint"], case["paths"], args.batch_size, batches)
    infer = run_infer_process(case["checkpoint"], case["folder"], save_dir, args.batch_size)
    after = forward_ceiling(case["checkpoint"], case["paths"], args.batch_size, batches)
    # the loop's job exactly: the same files with no class folders, so no metrics and no plots
    unlabelled = run_infer_process(case["checkpoint"], case["flat"], save_dir, args.batch_size)
    loop_wall = loop_wall or loop()
    # the ceiling right before and right after infer.py: load that drifts during the run hits both
    ceiling = (before + after) / 2
    return {**infer, "loop_wall": loop_wall, "ceiling": ceiling, "unlabelled_wall": unlabelled["wall"],
            "decode_ms": case["decode_seconds"] * 1000, "cap": ceiling_share_cap(ceiling, case["decode_seconds"])}


def bench_whole_processes(args: argparse.Namespace) -> dict[str, float]:
    """infer.py and the per-image loop as subprocesses, on small and on large JPEGs, rounds alternated."""
    with tempfile.TemporaryDirectory(prefix="bench_infer_whole_") as temp:
        root = Path(temp)
        cases = {
            f"{args.small_images} x 64x64 JPEG, {args.small_model} at 64 px":
                (args.small_images, (64, 64), args.small_model, 64),
            f"{args.large_images} x {args.image_size[0]}x{args.image_size[1]} JPEG, {args.model} at "
            f"{args.input_shape} px": (args.large_images, tuple(args.image_size), args.model, args.input_shape),
        }
        prepared = {}
        for index, (name, (count, size, model, side)) in enumerate(cases.items()):
            folder = root / f"images_{index}"
            paths = make_photos(folder, count, size, seed=index, labelled=True)
            checkpoint = make_checkpoint(root / f"model_{index}.pth", model, side)
            flat = root / f"unlabelled_{index}"  # the same files, hard-linked side by side
            flat.mkdir()
            for path in paths:
                os.link(path, flat / f"{Path(path).parent.name}_{Path(path).name}")
            prepared[name] = {"folder": folder, "flat": flat, "paths": paths, "checkpoint": checkpoint,
                              "decode_seconds": decode_core_seconds(checkpoint, paths)}
        malloc_gain(prepared, args)  # then this process keeps freed memory too, as infer.py does
        samples: dict[str, list[dict]] = {name: [] for name in prepared}
        for round_index in range(args.rounds):
            for name, case in prepared.items():
                samples[name].append(whole_process_round(case, args, root / "results", round_index % 2 == 0))
    return print_whole_processes(samples, args)


def malloc_gain(prepared: dict[str, dict], args: argparse.Namespace) -> None:
    """The forward ceiling of each case with glibc's default malloc, then with utils/memory.py's
    settings (which infer.py and train.py apply at start). Applies them to this process, so the
    ceilings of the rounds that follow are measured as infer.py runs."""
    before = {name: forward_ceiling(case["checkpoint"], case["paths"], args.batch_size, 4)
              for name, case in prepared.items()}
    if not keep_freed_memory():
        print("malloc left as it is (not glibc, or the environment sets MALLOC_*_ or GLIBC_TUNABLES)\n")
        return
    for name, case in prepared.items():
        after = forward_ceiling(case["checkpoint"], case["paths"], args.batch_size, 4)
        print(f"Forward ceiling, {name}: {before[name]:.1f} images/s with glibc's default malloc, "
              f"{after:.1f} keeping freed memory (utils/memory.py): {after / before[name]:.2f}x")
    print()


def print_whole_processes(samples: dict[str, list[dict]], args: argparse.Namespace) -> dict[str, float]:
    rows, goals, summary = [], [], {}
    for index, (name, rounds) in enumerate(samples.items()):
        def median(key: str, rounds: list[dict] = rounds) -> float:
            return statistics.median(r[key] for r in rounds)
        speedup = statistics.median(r["loop_wall"] / r["wall"] for r in rounds)
        same_job = statistics.median(r["loop_wall"] / r["unlabelled_wall"] for r in rounds)
        of_ceiling = statistics.median(r["rate"] / r["ceiling"] for r in rounds)
        outputs = statistics.median((r["files"] + r["pictures"]) / r["predicting"] for r in rounds)
        rows.append((name, f"{median('loop_wall'):.1f}", f"{median('wall'):.1f}", f"{speedup:.2f}x",
                     f"{median('unlabelled_wall'):.1f}", f"{same_job:.2f}x",
                     f"{median('rate'):.1f}", f"{median('ceiling'):.1f}", f"{of_ceiling:.2f}",
                     f"{median('predicting'):.2f}", f"{median('files'):.2f}", f"{median('pictures'):.2f}",
                     f"{outputs:.2f}", rounds[-1]["decoding"]))
        if index == 0:
            goals.append(("whole process >= 2x the per-image loop, labelled tree (+ metrics, plots)", name,
                          speedup, speedup >= 2))
            goals.append(("whole process >= 2x the per-image loop, unlabelled (the loop's job)", name,
                          same_job, same_job >= 2))
        cap = median("cap")
        goals.append(("prediction >= 90% of the forward ceiling", name, of_ceiling, of_ceiling >= 0.9,
                      f" (at most {cap:.2f} on this machine: decoding takes {median('decode_ms'):.2f} core-ms per "
                      f"image beside {1000 * available_cores() / median('ceiling'):.2f} core-ms of forward pass)"))
        fixed, rate = median("files") + median("pictures"), median("rate")
        goals.append(("metrics, files and pictures <= predicting", name, outputs, outputs <= 1,
                      f" (they take {fixed:.2f} s, most of it whatever the number of images: predicting takes as "
                      f"long from about {fixed * rate:.0f} images at {rate:.0f} images/s)"))
        summary.update({f"{name}: speed-up": speedup, f"{name}: speed-up, same job": same_job, f"{name}: of ceiling": of_ceiling, f"{name}: outputs": outputs})
    print(f"Whole processes (infer.py on a labelled tree vs bench/per_image_loop.py), batch {args.batch_size}, "
          f"median of {len(next(iter(samples.values())))} alternated round(s); load average now {load_average()}\n")
    print(markdown_table(["images, model", "loop s", "infer.py s", "speed-up", "unlabelled s",
                          "speed-up, same job", "predicting img/s",
                          "ceiling img/s", "of ceiling", "predicting s", "metrics+files s", "pictures s",
                          "outputs / predicting", "infer.py decoding"], rows))
    print()
    for goal, name, value, met, *why in goals:
        print(f"Goal {goal} ({name}): {value:.2f} {'met' if met else 'MISSED'}{''.join(why)}")
    print()
    return summary


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
