"""Ablation of the training recipe (issue 17): each option on and off, several seeds, on the
digits demo and two harder variants of it made here:

    digits      the built-in demo (scikit-learn's 8x8 scans as 32 px PNGs), as train.py uses it
    noisy       the same, 20% of the training labels flipped to another class (val/test clean)
    imbalanced  the same, training classes thinned geometrically from 100% down to 10% (val/test whole)

Every run is `train.py` itself (in this process, --quiet), so the numbers are what a user gets.
The table gives test accuracy of best.pth (mean +- std over the seeds) and wall time per run.

    python bench/bench_recipe.py --threads 1     # 3 seeds, 6 epochs, 72 runs: ~55 CPU-minutes (bench/RESULTS.md)
    python bench/bench_recipe.py --quick --threads 1  # 2 seeds, 2 epochs, 8 cells: ~16 min on a busy 2-core box
    python bench/bench_recipe.py --out table.md  # also write the table to a file
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # noqa: F401  (puts the repository root on sys.path)
import torch
from benchlib import machine_description

import train
from utils.demo import make_digits_dataset

NOISE_SHARE = 0.2
SMALLEST_CLASS_SHARE = 0.1

# name -> extra train.py flags, and the datasets each option is measured on
OPTIONS = {
    "baseline": ([], ("digits", "noisy", "imbalanced")),
    "--ema": (["--ema", "0.999"], ("digits", "noisy", "imbalanced")),
    "--mixup 0.2": (["--mixup", "0.2"], ("digits", "noisy", "imbalanced")),
    "--cutmix 1.0": (["--cutmix", "1.0"], ("digits", "noisy", "imbalanced")),
    "--random_erase 0.25": (["--random_erase", "0.25"], ("digits", "noisy", "imbalanced")),
    "--augment autoaugment": (["--augment", "autoaugment"], ("digits", "noisy")),
    "--augment augmix": (["--augment", "augmix"], ("digits", "noisy")),
    "--label_smoothing 0.1": (["--label_smoothing", "0.1"], ("noisy",)),
    "--loss focal": (["--loss", "focal"], ("noisy", "imbalanced")),
    "--sampler balanced": (["--sampler", "balanced"], ("imbalanced",)),
    "--class_weights auto": (["--class_weights", "auto"], ("imbalanced",)),
}
# --quick: the main options on the harder two datasets only, where they are meant to help
QUICK_OPTIONS = {"baseline": ("noisy", "imbalanced"), "--ema": ("noisy", "imbalanced"), "--mixup 0.2": ("noisy",),
                 "--random_erase 0.25": ("noisy",), "--sampler balanced": ("imbalanced",),
                 "--loss focal": ("imbalanced",)}


def copy_split(source: Path, target: Path, keep=None, relabel=None) -> None:
    """Copy source/<class>/* to target/<relabel(class) or class>/*, the files for which
    keep(class index, file index, files in the class) is true (all without `keep`)."""
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    for class_index, name in enumerate(classes):
        files = sorted((source / name).iterdir())
        for index, path in enumerate(files):
            if keep is not None and not keep(class_index, index, len(files)):
                continue
            label = relabel(name, classes) if relabel else name
            (target / label).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / label / f"{name}_{path.name}")


def make_variants(root: Path) -> dict[str, Path]:
    """The three datasets under `root`: val/ and test/ are the demo's, only train/ differs."""
    digits = make_digits_dataset(root / "digits")
    variants = {"digits": digits}
    for variant in ("noisy", "imbalanced"):
        target = root / variant
        for split in ("val", "test"):
            shutil.copytree(digits / split, target / split)
        variants[variant] = target
    flips = random.Random(0)

    def flip(name: str, classes: list[str]) -> str:
        if flips.random() >= NOISE_SHARE:
            return name
        return flips.choice([c for c in classes if c != name])

    copy_split(digits / "train", root / "noisy" / "train", relabel=flip)
    classes = len([p for p in (digits / "train").iterdir() if p.is_dir()])

    def thin(class_index: int, index: int, count: int) -> bool:  # class k keeps 0.1 ** (k / (C - 1))
        return index < max(2, round(count * SMALLEST_CLASS_SHARE ** (class_index / (classes - 1))))

    copy_split(digits / "train", root / "imbalanced" / "train", keep=thin)
    return variants


def run_once(dataset: Path, flags: list[str], seed: int, epochs: int, log_dir: Path) -> tuple[float, float, float]:
    """(test top1 of best.pth, wall seconds, CPU seconds of this process) of one train.py run. The CPU
    seconds compare the cost of options fairly on a shared machine, where wall time follows the load."""
    start, start_cpu = time.perf_counter(), time.process_time()
    results = train.main(["--dataset_path", str(dataset), "--input_shape", "32", "--hflip", "0", "--crop_scale", "0.5",
                          "--epochs", str(epochs), "--seed", str(seed), "--log_dir", str(log_dir), "--quiet",
                          "--workers", "0", *flags])
    return results["test"]["top1"], time.perf_counter() - start, time.process_time() - start_cpu


def format_cell(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2 seeds, 2 epochs, the main options on the noisy and imbalanced datasets only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 on a shared machine, where a waiting "
                             "thread team spins")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3; 2 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 6; 2 with --quick)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--options", nargs="+", default=None, metavar="NAME",
                        help="only these rows, by their name in the table without the dashes (e.g. baseline "
                             "ema 'mixup 0.2'); to split the ablation over several processes or sessions")
    options = parser.parse_args()
    seeds = options.seeds or (2 if options.quick else 3)
    epochs = options.epochs or (2 if options.quick else 6)
    names = QUICK_OPTIONS if options.quick else list(OPTIONS)
    if options.options:
        unknown = sorted(set(options.options) - {name.lstrip("-") for name in names})
        if unknown:
            parser.error(f"--options: unknown {unknown}; choose from {[name.lstrip('-') for name in names]}")
        names = [name for name in names if name.lstrip("-") in options.options]
    if options.threads:
        torch.set_num_threads(options.threads)
    print(machine_description(), flush=True)
    lines = [f"{seeds} seeds, {epochs} epochs, --model {options.model}, 32 px; test top1 % of best.pth "
             "(mean ± std over seeds), mean wall and CPU time per run", "",
             "| option | digits | noisy (20% flipped) | imbalanced (10:1) | wall s/run | CPU s/run |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as temp:
        variants = make_variants(Path(temp) / "data")
        for name in names:
            flags, datasets = OPTIONS[name]
            datasets = QUICK_OPTIONS[name] if options.quick else datasets
            cells, times, cpu_times = [], [], []
            for dataset in ("digits", "noisy", "imbalanced"):
                if dataset not in datasets:
                    cells.append("")
                    continue
                accuracies = []
                for seed in range(seeds):
                    top1, seconds, cpu_seconds = run_once(variants[dataset], ["--model", options.model, *flags], seed, epochs,
                                             Path(temp) / "logs")
                    accuracies.append(top1)
                    times.append(seconds)
                    cpu_times.append(cpu_seconds)
                cells.append(format_cell(accuracies))
            lines.append(f"| {name} | {' | '.join(cells)} | {statistics.mean(times):.0f} | "
                         f"{statistics.mean(cpu_times):.0f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if options.out:
        Path(options.out).write_text(table + "\n", encoding="utf-8")
        print(json.dumps({"written": options.out}))


if __name__ == "__main__":
    sys.exit(main())
