"""How close does a training epoch of ours come to the model's own speed, and to the reference recipe?

    python bench/bench_train.py            # full: 3 models x 64/224 px + the digits demo (< 10 min on 2 cores)
    python bench/bench_train.py --quick    # smoke test: resnet18 at 64 px + digits (< 1 min)

For each model and input size, in images/s:
  (a)  ceiling: the pure train step (forward, loss, backward, SGD step) on synthetic tensors
       already normalised, in our memory layout; (a') the same in NCHW (the layout gain).
  (b)  ours: a train epoch over real image files, wired the way train.py wires it:
       utils.data.ImageDataset + build_train_transform + create_dataloader, utils.engine.train_one_epoch;
       (b+) the same with --cache ram (utils.cache; the one-time fill is timed apart).
  (c)  reference: the torchvision reference-script way: ImageFolder + PIL + transforms v1
       (RandomResizedCrop, flip, ToTensor, Normalize in the workers), NCHW, same model, batch,
       optimizer, workers and threads.
The contenders alternate round by round and each number is a median, so load from other
processes hits them alike. Data: photo-like 500x375 JPEGs written to a temp folder, and the
digits demo (32x32 PNGs) with train.py's demo settings.

Then the whole-run row (bench/whole_run.py): `python train.py` as a user runs it against the
torchvision-style reference script (bench/reference_train.py), both as subprocesses timed from
launch to exit, on 64 px JPEGs and on 500x375 photos: wall ratio, the share of the wall spent in
training compute, and the time each takes to reach the reference's final accuracy.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import benchlib  # noqa: F401  (puts the repository root on sys.path)
import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as T1
import whole_run
from benchlib import (
    fmt,
    interleaved,
    machine_description,
    markdown_table,
    matmul_peak_gflops,
    medians,
    ratio,
)

from models.registry import create_model
from utils.cache import cache_datasets
from utils.data import ImageDataset, available_cores, create_dataloader, default_workers, scan_dataset
from utils.demo import make_digits_dataset
from utils.device import default_channels_last
from utils.engine import StepSettings, train_one_epoch
from utils.memory import keep_freed_memory
from utils.optim import create_optimizer, create_scheduler
from utils.transforms import Preprocess, build_train_transform, normalize_batch

TARGET_VS_REFERENCE = 1.3
TARGET_CACHE_VS_CEILING = 0.9
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4
DEVICE = torch.device("cpu")


@dataclass
class Case:
    data: str  # "photos" or "digits"
    model: str
    size: int
    batch: int
    hflip: float = 0.5
    crop_scale: float = 0.08  # train.py's defaults; the digits demo uses 0 and 0.5


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI smoke test: one small model, short epochs (< 1 min)")
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 224])
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers for ours and the reference (default: what train.py picks for a "
                             "dataset of thousands of images on this machine)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per contender (default 3; quick 1)")
    parser.add_argument("--case_seconds", type=float, default=None,
                        help="time to spend per model and size; sets the epoch length (default 55; quick 12)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run; cases shrink to fit when the machine is slow (default 540)")
    parser.add_argument("--no_digits", action="store_true", help="skip the digits demo row")
    parser.add_argument("--whole_run", choices=("yes", "no", "only"), default="yes",
                        help="also (yes), never (no) or only (only) run the whole-run row")
    parser.add_argument("--whole_run_epochs", type=int, default=None, help="epochs of each whole run (default 15; quick 2)")
    parser.add_argument("--whole_run_images", type=int, default=None,
                        help="training images of each whole-run dataset, a quarter more for val (default 240; quick 48)")
    parser.add_argument("--whole_run_rounds", type=int, default=None,
                        help="rounds of train.py + reference per dataset (default 2; quick 1)")
    args = parser.parse_args()
    if args.quick:
        args.models, args.sizes = ["resnet18"], [64]
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.case_seconds = args.case_seconds or (12 if args.quick else 55)
    args.budget = args.budget or (60 if args.quick else 540)
    args.workers = default_workers(10**6) if args.workers is None else args.workers
    args.whole_run_epochs = args.whole_run_epochs or (2 if args.quick else 15)
    args.whole_run_images = args.whole_run_images or (48 if args.quick else 240)
    args.whole_run_rounds = args.whole_run_rounds or (1 if args.quick else 2)
    return args


# ---- what each contender runs -----------------------------------------------------------------

def our_layout(case: Case) -> bool:
    """channels_last exactly when train.py would use it."""
    return default_channels_last(DEVICE, (case.size, case.size))


def new_model(case: Case, classes: int, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(case.model, classes, (case.size, case.size))
    return model.to(memory_format=torch.channels_last) if channels_last else model


def train_flops_per_image(case: Case) -> float:
    """FLOPs of one train step per image: 3x the forward pass (backward ~ 2x forward), the forward
    counted by torch.utils.flop_counter. Its own backward count is not used: it ignores the groups
    of depthwise convolutions (mobilenet_v2 came out at 20x its forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = new_model(case, 10, channels_last=False).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, case.size, case.size))
    return 3 * counter.get_total_flops()


def ceiling(case: Case, classes: int, images: int, channels_last: bool,
            amp: Optional[torch.dtype] = None, optimizer_type: str = "sgd") -> Callable[[], float]:
    """(a) the pure train step on synthetic, already-normalised tensors (optionally under autocast);
    SGD as the per-epoch rows use, or "adamw" with train.py's defaults (the whole-run row)."""
    model = new_model(case, classes, channels_last).train()
    optimizer = create_optimizer(model, "sgd", LR, MOMENTUM, WEIGHT_DECAY) if optimizer_type == "sgd" else \
        create_optimizer(model, optimizer_type, 1e-3, MOMENTUM, 0.01)
    criterion = nn.CrossEntropyLoss()
    pixels = torch.randint(0, 256, (case.batch, 3, case.size, case.size), dtype=torch.uint8)
    inputs = normalize_batch(pixels, Preprocess(input_size=[case.size, case.size]), channels_last=channels_last)
    targets = torch.randint(0, classes, (case.batch,))
    steps = max(1, images // case.batch)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                loss = criterion(model(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return steps * case.batch / (time.perf_counter() - start)

    return run


def ours(case: Case, root: Path, workers: int, cache: str) -> tuple[Callable[[], float], float]:
    """(b) our epoch, wired as train.py wires it. Returns (run, seconds the cache fill took)."""
    scan = scan_dataset(root)
    preprocess = Preprocess(input_size=[case.size, case.size])
    channels_last = our_layout(case)
    train_set = ImageDataset(scan.splits["train"], build_train_transform(preprocess, "basic", case.hflip, 0.0,
                                                                         case.crop_scale))
    start = time.perf_counter()
    cache_datasets(cache, preprocess, train_set, [], workers=workers)
    fill_seconds = time.perf_counter() - start if cache != "none" else float("nan")
    generator = torch.Generator()
    loader = create_dataloader(train_set, case.batch, True, workers, DEVICE, generator)
    model = new_model(case, len(scan.class_names), channels_last)
    optimizer = create_optimizer(model, "sgd", LR, MOMENTUM, WEIGHT_DECAY)
    scheduler = create_scheduler(optimizer, "constant", 1, len(loader))
    settings = StepSettings(DEVICE, preprocess, None, channels_last)
    epoch = 0

    def run() -> float:
        nonlocal epoch
        epoch += 1
        generator.manual_seed(epoch)  # as train.py does each epoch
        stats = train_one_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, scheduler, settings,
                                show_progress=False)
        return stats["images_per_s"]

    return run, fill_seconds


def reference(case: Case, root: Path, workers: int) -> Callable[[], float]:
    """(c) torchvision's reference-script recipe (references/classification/train.py + presets.py)."""
    normalize = T1.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    steps = [T1.RandomResizedCrop(case.size, scale=(case.crop_scale, 1.0))]
    if case.hflip > 0:
        steps.append(T1.RandomHorizontalFlip(case.hflip))
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), T1.Compose([*steps, T1.ToTensor(), normalize]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=case.batch, shuffle=True, num_workers=workers,
                                         pin_memory=torch.cuda.is_available())
    model = new_model(case, len(dataset.classes), channels_last=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    criterion = nn.CrossEntropyLoss()

    def run() -> float:
        model.train()
        seen, start = 0, time.perf_counter()
        for images, targets in loader:
            loss = criterion(output := model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            # the reference logs loss and top-1 every step (MetricLogger)
            _ = loss.item(), (output.argmax(1) == targets).float().mean().item()
            seen += targets.numel()
        return seen / (time.perf_counter() - start)

    return run


# ---- data -------------------------------------------------------------------------------------

def subset_tree(source_root: Path, samples: list[tuple[str, int]], class_names: list[str], target: Path) -> Path:
    """target/{train,val}/<class>/ holding `samples` as hard links (copies where links fail):
    a dataset of exactly this size for ImageFolder and for our scan alike."""
    for split in ("train", "val"):
        for path, label in samples if split == "train" else samples[:len(class_names)]:
            folder = target / split / class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            try:
                (folder / Path(path).name).hardlink_to(path)
            except OSError:
                shutil.copy2(path, folder / Path(path).name)
    return target


def balanced_head(samples: list[tuple[str, int]], count: int) -> list[tuple[str, int]]:
    """The first `count` samples taking the classes in turn (every class present)."""
    by_class: dict[int, list] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    picked, queues = [], [list(v) for _, v in sorted(by_class.items())]
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def epoch_images(case: Case, args: argparse.Namespace, available: int, epochs: int, seconds: float) -> int:
    """Epoch length: enough images that `epochs` epochs at the ceiling's speed fill `seconds`."""
    if args.quick:
        return case.batch  # one batch per epoch: a smoke test, not a measurement
    probe = ceiling(case, 4, 2 * case.batch, our_layout(case))
    probe()  # warm-up
    batches = int(probe() * seconds / epochs / case.batch)
    return max(1, min(batches, available // case.batch)) * case.batch


# ---- the run ----------------------------------------------------------------------------------

def measure(case: Case, source: Path, args: argparse.Namespace, work: Path, peak: float, seconds: float) -> dict:
    started = time.perf_counter()
    scan = scan_dataset(source)
    contenders = 6
    count = epoch_images(case, args, len(scan.splits["train"]), contenders * (args.repeats + 1), seconds)
    root = subset_tree(source, balanced_head(scan.splits["train"], count), scan.class_names,
                       work / f"{case.data}_{case.model}_{case.size}")
    classes = len(scan.class_names)
    ours_plain, _ = ours(case, root, args.workers, "none")
    ours_cached, fill_seconds = ours(case, root, args.workers, "ram")
    samples = interleaved({
        "a": ceiling(case, classes, count, our_layout(case)),
        "a_nchw": ceiling(case, classes, count, channels_last=False),
        # bf16 is far slower on most CPUs: a shorter run gives its rate without eating the time budget
        "a_bf16": ceiling(case, classes, max(case.batch, count // 8), our_layout(case), torch.bfloat16),
        "b": ours_plain,
        "b_ram": ours_cached,
        "c": reference(case, root, args.workers),
    }, args.repeats, warmup=not args.quick, seconds=seconds - (time.perf_counter() - started))
    rates = medians(samples)
    ratios = {f"{x}/{y}": ratio(samples, x, y) for x, y in
              (("b", "a"), ("b_ram", "a"), ("b", "c"), ("b_ram", "c"), ("a", "a_nchw"), ("a_bf16", "a"))}
    flops = train_flops_per_image(case)
    row = {"case": case, "images": count, "rounds": len(samples["a"]), "flops": flops, "fill": fill_seconds,
           **rates, **ratios, "gflops": flops * rates["b"] / 1e9, "peak_share": flops * rates["b"] / 1e9 / peak}
    print(f"  {case.data} {case.model} {case.size}px, {count} images, {time.perf_counter() - started:.0f} s: "
          + "; ".join(f"{k} " + " ".join(f"{v:.1f}" for v in values) for k, values in samples.items()), flush=True)
    return row


def report(rows: list[dict], peak: float, args: argparse.Namespace, elapsed: float) -> str:
    headers = ["data", "model", "px", "batch", "images", "rounds", "train GFLOP/img", "(a) ceiling", "(a') NCHW",
               "(b) ours", "(b+) ours --cache ram", "(c) reference", "(b)/(a)", "(b+)/(a)", "(b)/(c)", "(b+)/(c)",
               "(b) GFLOP/s", "of peak", "fill s"]
    table = [[r["case"].data, r["case"].model, r["case"].size, r["case"].batch, r["images"], r["rounds"],
              fmt(r["flops"] / 1e9, 2),
              fmt(r["a"]), fmt(r["a_nchw"]), fmt(r["b"]), fmt(r["b_ram"]), fmt(r["c"]), fmt(r["b/a"], 2),
              fmt(r["b_ram/a"], 2), fmt(r["b/c"], 2), fmt(r["b_ram/c"], 2), fmt(r["gflops"]), f"{r['peak_share']:.0%}",
              fmt(r["fill"], 2)] for r in rows]
    versus_reference = [max(r["b/c"], r["b_ram/c"]) for r in rows]
    versus_ceiling = [r["b_ram/a"] for r in rows]
    lines = [
        "## bench_train: images/s of a training epoch (CPU, fp32)", "",
        *(["**--quick: a smoke test (one batch per epoch, no warm-up); the numbers mean nothing.**", ""]
          if args.quick else []),
        machine_description(), "",
        f"Measured fp32 matmul peak: {peak:.1f} GFLOP/s. Workers: {args.workers} for ours and the reference; "
        f"layout (ours): train.py's default (utils.device.default_channels_last); medians of "
        f"up to {args.repeats} interleaved rounds after a warm-up round (fewer when a case runs out of its "
        f"{args.case_seconds:.0f} s or the run out of its {args.budget:.0f} s); {elapsed:.0f} s in all.", "",
        markdown_table(headers, table), "",
        _target_line(f"ours >= {TARGET_VS_REFERENCE}x reference (best of (b), (b+))", versus_reference,
                     TARGET_VS_REFERENCE),
        _target_line(f"ours --cache ram >= {TARGET_CACHE_VS_CEILING:.0%} of the ceiling", versus_ceiling,
                     TARGET_CACHE_VS_CEILING),
        "Layout gain, ceiling ours/NCHW (a)/(a'): " + ", ".join(
            f"{r['case'].model}@{r['case'].size}px {r['a/a_nchw']:.2f}x" for r in rows),
        "bf16 autocast vs fp32, ceiling: " + ", ".join(
            f"{r['case'].model}@{r['case'].size}px {r['a_bf16/a']:.2f}x" for r in rows),
        "Ratios are medians of per-round ratios (contenders of one round ran back to back).",
    ]
    return "\n".join(lines)


def _target_line(name: str, ratios: list[float], target: float) -> str:
    met = sum(ratio >= target for ratio in ratios)
    return (f"Target {name}: met in {met} of {len(ratios)} rows "
            f"(ratios {', '.join(f'{r:.2f}' for r in ratios)}){'' if met == len(ratios) else '  [MISSED in some rows]'}")


def main() -> None:
    args = get_args()
    started = time.perf_counter()
    kept = keep_freed_memory()  # as train.py does: every contender in this process runs with it
    print(f"bench_train: {'quick' if args.quick else 'full'} run on {available_cores()} cores, workers {args.workers}; "
          f"malloc keeps freed memory (utils/memory.py): {'yes' if kept else 'no (not glibc, or set by the environment)'}", flush=True)
    peak = matmul_peak_gflops()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        if args.whole_run != "only":
            rows = epoch_rows(args, Path(tmp), peak, started)
            print()
            print(report(rows, peak, args, time.perf_counter() - started))
        if args.whole_run != "no":
            print()
            print(whole_run_rows(args, Path(tmp)))
    print(f"\nlscpu model: {benchlib.cpu_model()}")


def epoch_rows(args: argparse.Namespace, work: Path, peak: float, started: float) -> list[dict]:
    """The per-epoch table's rows: every model and size on photos, and the digits demo."""
    small_batch = 16 if args.quick else 32
    cases = [Case("photos", model, size, batch=small_batch if size <= 64 else 8)
             for model in args.models for size in args.sizes]
    if not args.no_digits:  # train.py's demo settings
        cases.append(Case("digits", "resnet18", 32, batch=small_batch, hflip=0.0, crop_scale=0.5))
    most = 64 if args.quick else 512
    photos = benchlib.write_photo_dataset(work / "photos_all", train_images=most)
    digits = make_digits_dataset(work / "digits_all")
    rows = []
    for number, case in enumerate(cases):
        # a busy machine shortens the later cases rather than running past the budget
        left = args.budget - (time.perf_counter() - started)
        seconds = max(10.0, min(args.case_seconds, left / (len(cases) - number)))
        rows.append(measure(case, photos if case.data == "photos" else digits, args, work, peak, seconds))
    return rows


def whole_run_rows(args: argparse.Namespace, work: Path) -> str:
    """The whole-run table (bench/whole_run.py): resnet18 at 64 px, batch 32, on 64 px JPEGs and on photos."""
    settings = {"model": "resnet18", "size": 64, "epochs": args.whole_run_epochs, "batch": 32,
                "workers": args.workers}
    case = Case("small", settings["model"], settings["size"], settings["batch"])
    rate = ceiling(case, 3, 4 * case.batch if not args.quick else 2 * case.batch, our_layout(case),
                   optimizer_type="adamw")
    rate()  # warm-up
    ceiling_rate = statistics.median(rate() for _ in range(1 if args.quick else 3))
    images, val = args.whole_run_images, max(3, args.whole_run_images // 4)
    rows = []
    for name, side in (("64 px JPEGs", (64, 64)), ("500x375 photos", benchlib.PHOTO_SIZE)):
        data = whole_run.write_tinted_dataset(work / f"whole_{side[0]}", side, images, val)
        rows.append(whole_run.measure_dataset(name, data, work, settings, ceiling_rate, args.whole_run_rounds))
    return whole_run.report(rows, settings, ceiling_rate)


if __name__ == "__main__":
    sys.exit(main())
