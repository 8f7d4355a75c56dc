"""Which image reader and which transform pipeline should a DataLoader worker run?

    python bench/bench_data.py            # full (under a minute on 2 cores)
    python bench/bench_data.py --quick    # smoke test (seconds)

Images/s of ONE worker (one process, one thread, as a DataLoader worker runs) on photo-like
500x375 JPEGs:
  readers     file -> RGB uint8: OpenCV (utils.data.read_rgb), Pillow, torchvision.io.decode_image
  pipelines   file -> the tensor a worker hands to the DataLoader, at 64 and 224 px:
              v1 PIL (the reference recipe: RandomResizedCrop, flip, ToTensor, Normalize),
              v2 on uint8 tensors after each reader, and ours (utils.data.ImageDataset with
              utils.transforms presets, train and eval), also from a --cache ram cache.
Contenders alternate round by round; each number is a median.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import benchlib  # noqa: F401  (puts the repository root on sys.path)
import cv2
import numpy as np
import torch
import torchvision.io as tvio
import torchvision.transforms as T1
import torchvision.transforms.v2 as T2
from benchlib import fmt, interleaved, machine_description, markdown_table, medians
from PIL import Image

from utils.cache import cache_datasets
from utils.data import ImageDataset, read_rgb
from utils.transforms import Preprocess, build_eval_transform, build_train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI smoke test: few images, one round")
    parser.add_argument("--images", type=int, default=None, help="JPEG files per round (default 128; quick 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; quick 1)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 224])
    args = parser.parse_args()
    args.images = args.images or (8 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 7)
    return args


# ---- readers: file -> RGB uint8 ---------------------------------------------------------------

def read_pillow(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")  # what ImageFolder's default loader does


def read_torchvision(path: str) -> torch.Tensor:
    return tvio.decode_image(tvio.read_file(path), mode=tvio.ImageReadMode.RGB)


def opencv_tensor(path: str) -> torch.Tensor:
    return torch.from_numpy(read_rgb(path)).permute(2, 0, 1)


READERS: dict[str, Callable[[str], object]] = {
    "OpenCV (ours: utils.data.read_rgb)": read_rgb,
    "Pillow (Image.open + convert RGB)": lambda path: np.asarray(read_pillow(path)),
    "torchvision.io.decode_image": read_torchvision,
}


# ---- pipelines: file -> what a worker returns --------------------------------------------------

def pipelines(size: int, paths: list[str]) -> dict[str, Callable[[int], object]]:
    """index -> the sample a worker would return, for each contender."""
    v1 = T1.Compose([T1.RandomResizedCrop(size), T1.RandomHorizontalFlip(), T1.ToTensor(), T1.Normalize(MEAN, STD)])
    v2 = T2.Compose([T2.RandomResizedCrop(size, antialias=True), T2.RandomHorizontalFlip()])
    preprocess = Preprocess(input_size=[size, size])
    samples = [(path, 0) for path in paths]
    ours_train = ImageDataset(samples, build_train_transform(preprocess))
    ours_eval = ImageDataset(samples, build_eval_transform(preprocess))
    cached_train = ImageDataset(samples, build_train_transform(preprocess))
    cached_eval = ImageDataset(samples, build_eval_transform(preprocess))
    cache_datasets("ram", preprocess, cached_train, [cached_eval])
    return {
        "v1 PIL + Normalize (reference)": lambda i: v1(read_pillow(paths[i])),
        "v2 uint8 after Pillow": lambda i: v2(T2.functional.pil_to_tensor(read_pillow(paths[i]))),
        "v2 uint8 after torchvision.io": lambda i: v2(read_torchvision(paths[i])),
        "v2 uint8 after OpenCV": lambda i: v2(opencv_tensor(paths[i])),
        "ours train (read_rgb + presets)": lambda i: ours_train[i],
        "ours eval (read_rgb + presets)": lambda i: ours_eval[i],
        "ours train, --cache ram": lambda i: cached_train[i],
        "ours eval, --cache ram": lambda i: cached_eval[i],
    }


def rate_of(work: Callable, items: list, count: int) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        for item in items[:count]:
            work(item)
        return count / (time.perf_counter() - start)

    return run


def main() -> None:
    args = get_args()
    torch.set_num_threads(1)  # one DataLoader worker: one thread (the DataLoader does the same)
    cv2.setNumThreads(1)
    started = time.perf_counter()
    print(f"bench_data: {'quick' if args.quick else 'full'} run, {args.images} images per round", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = benchlib.write_photo_dataset(Path(tmp), train_images=args.images, val_images=0)
        paths = sorted(str(p) for p in root.rglob("*.jpg"))
        size_kb = np.mean([Path(p).stat().st_size for p in paths]) / 1024
        reader_rates = medians(interleaved({name: rate_of(read, paths, len(paths))
                                            for name, read in READERS.items()}, args.repeats))
        pipeline_rates = {}
        for size in args.sizes:
            contenders = pipelines(size, paths)
            indices = list(range(len(paths)))
            pipeline_rates[size] = medians(interleaved({name: rate_of(work, indices, len(indices))
                                                        for name, work in contenders.items()}, args.repeats))
            _check_same_decode(paths[0])
    print()
    print(report(reader_rates, pipeline_rates, size_kb, args, time.perf_counter() - started))


def _check_same_decode(path: str) -> None:
    """The readers are only comparable if they decode to (nearly) the same pixels."""
    ours = read_rgb(path).astype(np.int16)
    for name, other in (("Pillow", np.asarray(read_pillow(path))),
                        ("torchvision.io", read_torchvision(path).permute(1, 2, 0).numpy())):
        difference = np.abs(ours - other.astype(np.int16)).mean()
        if difference > 2:
            print(f"warning: {name} decodes {path} differently from OpenCV (mean |diff| {difference:.2f})")


def report(readers: dict[str, float], pipelines_by_size: dict[int, dict[str, float]], size_kb: float,
           args: argparse.Namespace, elapsed: float) -> str:
    best_reader = max(readers, key=readers.get)
    reference = "v1 PIL + Normalize (reference)"
    lines = ["## bench_data: decode + augment, images/s of one worker (one thread)", "", machine_description(), "",
             f"{args.images} photo-like 500x375 JPEGs ({size_kb:.0f} KB on average); medians of {args.repeats} "
             f"interleaved round(s); {elapsed:.0f} s in all.", "",
             markdown_table(["reader (file -> RGB uint8)", "images/s", "vs OpenCV"],
                            [[name, fmt(rate), fmt(rate / readers["OpenCV (ours: utils.data.read_rgb)"], 2)]
                             for name, rate in readers.items()]), "",
             f"Fastest reader: {best_reader}.", ""]
    for size, rates in pipelines_by_size.items():
        fastest = max((n for n in rates if "cache" not in n and "eval" not in n), key=rates.get)
        lines += [markdown_table([f"pipeline at {size} px (file -> worker output)", "images/s", "vs reference"],
                                 [[name, fmt(rate), fmt(rate / rates[reference], 2)] for name, rate in rates.items()]),
                  "", f"Fastest train pipeline from files at {size} px: {fastest}; ours train is "
                      f"{rates['ours train (read_rgb + presets)'] / rates[reference]:.2f}x the reference, and "
                      f"{rates['ours train, --cache ram'] / rates[reference]:.1f}x with --cache ram.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
