"""Large JPEGs decoded at reduced size (utils.data.read_rgb's min_size) for evaluation and for
training's random crops: how much faster, and how much the model input and the predictions change.

    python bench/bench_reduced_decode.py                         # speed (about a minute on 2 cores)
    python bench/bench_reduced_decode.py --quick                 # smoke test (seconds)
    python bench/bench_reduced_decode.py --weights best.pth --data DATASET/val   # + predictions
    python bench/bench_reduced_decode.py --make_dataset DIR      # the textures dataset of RESULTS.md

Speed: images/s of ONE decode thread (as infer.py's decode threads and DataLoader workers run),
file -> model-sized uint8 tensor with the eval preprocessing at 224 px (crop), on generated
photo-like JPEGs of phone-camera sizes, full decode against reduced decode, rounds alternated,
medians. Also the factor read_rgb chose and the mean difference of the model input in grey levels.
Then the same for the training input (random resized crop, flip: utils.transforms.TrainTransform),
whose box is drawn before decoding, so the factor varies with the box: how often each was used.

Predictions (with --weights and --data, a folder of class folders named like the checkpoint's
classes, or any folder): every image predicted both ways with the checkpoint's own preprocessing;
accuracy of each (for a labelled folder), top-1 agreement, and the largest change of a probability.

--make_dataset writes DIR/{train,val}/<class>/*.jpg: 1024x768 JPEGs whose class is the direction of
a faint grating (0, 45, 90 or 135 degrees, +-25 degrees, so neighbours overlap) over enlarged crops
of scikit-learn's two sample photos, with noise: fine detail everywhere, and a model that is not
sure of every image, so that small input changes could show in its answers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import benchlib  # noqa: F401  (puts the repository root on sys.path)
import cv2
import numpy as np
import torch
from benchlib import fmt, interleaved, machine_description, markdown_table, medians, photo_like
from PIL import Image

from inference.predictor import Predictor
from utils.data import jpeg_reduction, read_rgb
from utils.files import list_images
from utils.memory import keep_freed_memory
from utils.transforms import Preprocess, build_eval_transform, build_train_transform

PHONE_SIZES = {"12 MP (4032x3024)": (3024, 4032), "2 MP (1920x1080)": (1080, 1920)}


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 images, one round")
    parser.add_argument("--images", type=int, default=None, help="JPEGs per size (default 12; quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; quick 1)")
    parser.add_argument("--weights", help="a checkpoint: also compare its predictions both ways")
    parser.add_argument("--data", help="with --weights: a folder of images (class folders give accuracy)")
    parser.add_argument("--make_dataset", metavar="DIR", help="write the textures dataset to DIR and stop")
    args = parser.parse_args()
    args.images = args.images or (2 if args.quick else 12)
    args.repeats = args.repeats or (1 if args.quick else 5)
    if bool(args.weights) != bool(args.data):
        parser.error("--weights and --data go together")
    return args


def make_dataset(root: Path, per_class: dict[str, int] | None = None, seed: int = 1) -> None:
    """root/{train,val}/c<angle>/*.jpg, see the module's docstring."""
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]  # 427 x 640
    height, width = 768, 1024
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for split, count in (per_class or {"train": 120, "val": 60}).items():
        for angle in (0, 45, 90, 135):
            folder = root / split / f"c{angle}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                theta, period = np.deg2rad(angle + rng.uniform(-25, 25)), rng.uniform(40, 140)
                grating = np.sin((x * np.cos(theta) + y * np.sin(theta)) * 2 * np.pi / period + rng.uniform(0, 6.3))
                photo, scale = photos[rng.integers(2)], rng.uniform(0.4, 1.0)
                crop_h, crop_w = int(427 * scale), int(640 * scale)
                top, left = rng.integers(0, 428 - crop_h), rng.integers(0, 641 - crop_w)
                background = cv2.resize(photo[top:top + crop_h, left:left + crop_w], (width, height),
                                        interpolation=cv2.INTER_CUBIC).astype(np.float32)
                alpha = rng.uniform(0.12, 0.3)
                image = (background * (1 - alpha) + alpha * 127 * (1 + grating[..., None])
                         + rng.normal(0, 8, (height, width, 3)))
                bgr = cv2.cvtColor(np.clip(image, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
                cv2.imwrite(str(folder / f"{i:03d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])


def eval_input(path: str, transform: torch.nn.Module, reduced: bool) -> torch.Tensor:
    """File -> the uint8 model input, as PathDataset makes it (reduced) or from a full decode."""
    array = read_rgb(path, transform.source_min_size if reduced else None)
    return transform(torch.from_numpy(array).permute(2, 0, 1))


def speed(args: argparse.Namespace, folder: Path) -> tuple[list[list[object]], list[list[object]]]:
    """Rows for the eval table and the training table."""
    transform = build_eval_transform(Preprocess(input_size=[224, 224]))
    train_transform = build_train_transform(Preprocess(input_size=[224, 224]))  # basic: crop, flip
    rng = np.random.default_rng(0)
    eval_rows: list[list[object]] = []
    train_rows: list[list[object]] = []
    for label, (height, width) in PHONE_SIZES.items():
        paths = []
        for i in range(args.images):
            path = folder / f"{height}_{i}.jpg"
            cv2.imwrite(str(path), cv2.cvtColor(photo_like(rng, height, width), cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 90])
            paths.append(str(path))

        def rate(reduced: bool, paths: list[str] = paths) -> float:
            started = time.perf_counter()
            for path in paths:
                eval_input(path, transform, reduced)
            return len(paths) / (time.perf_counter() - started)

        heights: list[int] = []  # of the reduced training decodes

        def train_rate(reduced: bool, paths: list[str] = paths, heights: list[int] = heights) -> float:
            torch.manual_seed(0)  # the same boxes both ways
            started = time.perf_counter()
            for path in paths:
                train_input(path, train_transform, reduced, heights if reduced else [])
            return len(paths) / (time.perf_counter() - started)

        rates = medians(interleaved({"full": lambda: rate(False), "reduced": lambda: rate(True),
                                     "train full": lambda: train_rate(False),
                                     "train reduced": lambda: train_rate(True)}, args.repeats))
        difference = np.mean([float((eval_input(p, transform, False).float() - eval_input(p, transform, True).float())
                                    .abs().mean()) for p in paths])
        megabytes = np.mean([Path(p).stat().st_size for p in paths]) / 2**20
        eval_rows.append([label, fmt(megabytes), f"1/{jpeg_reduction(width, height, transform.source_min_size)}",
                          fmt(rates["full"]), fmt(rates["reduced"]), f"{rates['reduced'] / rates['full']:.2f}x",
                          f"{difference:.2f}"])
        train_rows.append([label, factor_shares(height, heights), fmt(rates["train full"]),
                           fmt(rates["train reduced"]), f"{rates['train reduced'] / rates['train full']:.2f}x"])
    return eval_rows, train_rows


def train_input(path: str, transform: torch.nn.Module, reduced: bool, heights: list[int]) -> torch.Tensor:
    """File -> a training input (random crop, flip), as ImageDataset makes it (reduced) or from a
    full decode; the height of each decoded image is appended to `heights`."""
    def reader(path: str, min_size=None) -> np.ndarray:
        array = read_rgb(path, min_size if reduced else None)
        heights.append(array.shape[0])
        return array

    return transform.read(path, reader)


def factor_shares(full_height: int, heights: list[int]) -> str:
    """'1/2 40%, 1/4 60%': how often the training crop's box let each factor be used."""
    factors = [full_height // height for height in heights]
    return ", ".join(f"1/{f} {factors.count(f) / len(factors):.0%}" for f in sorted(set(factors)))


def predictions(weights: str, data: str) -> str:
    predictor = Predictor.from_file(weights, device="cpu")
    transform = build_eval_transform(predictor.preprocess)
    paths = list_images(data)
    names = {name: i for i, name in enumerate(predictor.class_names)}
    labels = [names.get(Path(p).parent.name, -1) for p in paths]
    probs = {}
    for reduced in (False, True):
        batches = [torch.stack([eval_input(p, transform, reduced) for p in paths[i:i + 64]])
                   for i in range(0, len(paths), 64)]
        probs[reduced] = torch.cat([predictor.predict_batch(batch) for batch in batches])
    top = {reduced: p.argmax(1) for reduced, p in probs.items()}
    change = (probs[True] - probs[False]).abs()
    reductions = [jpeg_reduction(*header_size(p), transform.source_min_size) for p in paths]
    lines = [f"{len(paths)} images from {data}; decoded smaller: {sum(r > 1 for r in reductions)} "
             f"(factors {sorted(set(reductions))})",
             f"top-1 agreement full vs reduced: {float((top[True] == top[False]).float().mean()):.4f}",
             f"probability change: mean {float(change.mean()):.5f}, largest {float(change.max()):.4f}"]
    if min(labels) >= 0:
        target = torch.tensor(labels)
        for reduced in (False, True):
            accuracy = float((top[reduced] == target).float().mean())
            lines.append(f"accuracy, {'reduced' if reduced else 'full'} decode: {accuracy:.4f}")
    return "\n".join(lines)


def header_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header, no pixels decoded."""
    with Image.open(path) as image:
        return image.size


def main() -> None:
    args = get_args()
    if args.make_dataset:
        make_dataset(Path(args.make_dataset))
        print(f"wrote {args.make_dataset}/train and /val (4 classes, 1024x768 JPEGs)")
        return
    keep_freed_memory()
    model_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one decode thread, as infer.py's decode threads and DataLoader workers run
    print(machine_description())
    with tempfile.TemporaryDirectory() as folder:
        eval_rows, train_rows = speed(args, Path(folder))
    print("\nOne decode thread, file -> 224 px eval input (crop), images/s, median of "
          f"{args.repeats} alternated rounds, {args.images} generated JPEGs per size:\n")
    print(markdown_table(["photo", "MB", "factor", "full decode", "reduced decode", "speed-up",
                          "input difference (grey levels)"], eval_rows))
    print("\nThe same, file -> 224 px training input (random resized crop at scale 0.08-1, flip), "
          "the same boxes both ways:\n")
    print(markdown_table(["photo", "factors the boxes allowed", "full decode", "reduced decode", "speed-up"],
                         train_rows))
    if args.weights:
        torch.set_num_threads(model_threads)
        print("\nPredictions, full decode against reduced decode:\n")
        print(predictions(args.weights, args.data))


if __name__ == "__main__":
    main()
