"""bench_train.py's whole-run row: `python train.py ...` as a user runs it against the torchvision-style
reference script (bench/reference_train.py), each a subprocess timed from launch to exit.

For each dataset (64 px JPEGs, and photo-sized 500x375 JPEGs; 3 learnable classes, trained at 64 px):
  wall ratio       reference wall / train.py wall (> 1: train.py finishes first); same model, epochs,
                   batch and workers; train.py otherwise with its defaults (the leakage check on, its
                   cache in the run's LOG_DIR: the first round runs it cold, later rounds warm)
  compute share    images x epochs / ceiling rate / wall: how much of the whole process was training
                   compute, the ceiling being the pure train step (synthetic tensors, AdamW, train.py's
                   layout) measured in the same run
  time to accuracy the reference's final val accuracy: when (seconds after launch, from the time each
                   epoch line reached the benchmark) the reference first reached it, and when train.py
                   did (history.csv's val_acc); their ratio, reference / train.py
Rounds alternate the two contenders; numbers are medians over rounds.
"""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from benchlib import REPO, fmt, markdown_table, photo_like

CLASS_TINTS = ((60, -30, -30), (-30, 60, -30), (-30, -30, 60))  # what makes the classes learnable
TARGET_WALL = 1.0  # goal 1 of issue 18: train.py's wall <= the reference's (small images)
TARGET_COMPUTE_SHARE = 0.9  # ... and training compute >= 90% of the wall


@dataclass
class RunResult:
    wall: float  # seconds from launch to exit
    epoch_times: list[float] = field(default_factory=list)  # seconds from launch at which each epoch line arrived
    accuracies: list[float] = field(default_factory=list)  # val accuracy after each epoch
    first_step: float = 0.0  # seconds from launch to train.py's last line before its first epoch

    def outside_epochs(self) -> float:
        """Seconds before the first epoch began and after the last epoch's line: start-up and final report."""
        return self.first_step + self.wall - self.epoch_times[-1]


def write_tinted_dataset(root: Path, side: tuple[int, int], train: int, val: int, seed: int = 0) -> Path:
    """root/{train,val}/class_<k>/*.jpg: photo-like JPEGs (quality 90) of `side` (H, W), tinted per class."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            label = i % len(CLASS_TINTS)
            image = photo_like(rng, *side).astype(np.int16) + np.array(CLASS_TINTS[label], dtype=np.int16)
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            bgr = cv2.cvtColor(np.clip(image, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(folder / f"img_{i:05d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return root


TRAINING_STARTS = "Effective batch size"  # train.py's last line before its first epoch


def timed_process(command: list[str], epoch_prefix: str) -> tuple[RunResult, str]:
    """Run `command`, noting when each stdout line starting with `epoch_prefix` arrives (and TRAINING_STARTS)."""
    result = RunResult(0.0)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               encoding="utf-8", errors="replace")
    lines = []
    for line in process.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if line.startswith(epoch_prefix):
            result.epoch_times.append(time.perf_counter() - started)
        elif line.startswith(TRAINING_STARTS):
            result.first_step = time.perf_counter() - started
    stderr = process.stderr.read()  # type: ignore[union-attr]
    process.wait()
    result.wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed ({process.returncode}):\n{stderr[-2000:]}")
    return result, "".join(lines)


def run_ours(data: Path, log_dir: Path, settings: dict) -> RunResult:
    command = [sys.executable, "train.py", "--dataset_path", str(data), "--model", settings["model"],
               "--input_shape", str(settings["size"]), "--epochs", str(settings["epochs"]),
               "--batch_size", str(settings["batch"]), "--workers", str(settings["workers"]), "--log_dir", str(log_dir)]
    before = {p for p in log_dir.iterdir()} if log_dir.is_dir() else set()
    result, _ = timed_process(command, "epoch ")
    (run_dir,) = [p for p in log_dir.iterdir() if p not in before and p.is_dir() and not p.name.startswith(".")]
    with open(run_dir / "history.csv", newline="", encoding="utf-8") as file:
        result.accuracies = [float(row["val_acc"]) for row in csv.DictReader(file)]
    return result


def run_reference(data: Path, out: Path, settings: dict) -> RunResult:
    command = [sys.executable, str(REPO / "bench" / "reference_train.py"), str(data), "--out", str(out),
               "--model", settings["model"], "--size", str(settings["size"]), "--epochs", str(settings["epochs"]),
               "--batch", str(settings["batch"]), "--workers", str(settings["workers"])]
    result, stdout = timed_process(command, "epoch ")
    result.accuracies = [float(line.split()[3]) for line in stdout.splitlines() if line.startswith("epoch ")]
    return result


def time_to_reach(result: RunResult, accuracy: float) -> float:
    """Seconds after launch at which `result` first reached `accuracy` (NaN: never)."""
    for seconds, reached in zip(result.epoch_times, result.accuracies):
        if reached >= accuracy - 1e-9:
            return seconds
    return float("nan")


def measure_dataset(name: str, data: Path, work: Path, settings: dict, ceiling_rate: float, rounds: int) -> dict:
    """Alternate train.py and the reference `rounds` times on `data`; the row's numbers."""
    ours, reference = [], []
    for round_index in range(rounds):
        order = ("ours", "reference") if round_index % 2 == 0 else ("reference", "ours")
        for contender in order:
            if contender == "ours":
                ours.append(run_ours(data, work / f"logs_{name}", settings))
            else:
                reference.append(run_reference(data, work / f"reference_{name}_{round_index}", settings))
        print(f"  whole run, {name}, round {round_index + 1}: train.py {ours[-1].wall:.1f} s, "
              f"reference {reference[-1].wall:.1f} s", flush=True)
    train_images = sum(1 for _ in (data / "train").rglob("*.jpg"))
    compute = train_images * settings["epochs"] / ceiling_rate
    reach = [(time_to_reach(r, r.accuracies[-1]), time_to_reach(o, r.accuracies[-1])) for o, r in zip(ours, reference)]
    return {"name": name, "images": train_images, "rounds": rounds,
            "ours": statistics.median(o.wall for o in ours), "reference": statistics.median(r.wall for r in reference),
            "wall_ratio": statistics.median(r.wall / o.wall for o, r in zip(ours, reference)),
            "first_ours": ours[0].wall, "compute": compute,
            "compute_share": statistics.median(compute / o.wall for o in ours),
            "outside": statistics.median(o.outside_epochs() for o in ours),
            "share_cap": statistics.median(compute / (compute + o.outside_epochs()) for o in ours),
            "reference_share": statistics.median(compute / r.wall for r in reference),
            "target_acc": statistics.median(r.accuracies[-1] for r in reference),
            "ours_acc": statistics.median(o.accuracies[-1] for o in ours),
            "reach_reference": statistics.median(r for r, _ in reach),
            "reach_ours": _nan_median([o for _, o in reach]),
            "reach_ratio": _nan_median([r / o for r, o in reach])}


def _nan_median(values: list[float]) -> float:
    """The median of the values that are numbers; NaN when train.py never reached the accuracy in any round."""
    numbers = [v for v in values if v == v]
    return statistics.median(numbers) if numbers else float("nan")


def report(rows: list[dict], settings: dict, ceiling_rate: float) -> str:
    headers = ["data", "train images", "rounds", "train.py wall s (first)", "reference wall s", "reference/train.py",
               "compute s", "compute share train.py", "compute share reference", "reference final acc",
               "train.py final acc", "reference reaches it s", "train.py reaches it s", "time-to-acc ratio"]
    table = [[r["name"], r["images"], r["rounds"], f"{r['ours']:.1f} ({r['first_ours']:.1f})", fmt(r["reference"]),
              fmt(r["wall_ratio"], 2), fmt(r["compute"]), f"{r['compute_share']:.0%}", f"{r['reference_share']:.0%}",
              f"{r['target_acc']:.3f}", f"{r['ours_acc']:.3f}", fmt(r["reach_reference"]), fmt(r["reach_ours"]),
              fmt(r["reach_ratio"], 2)] for r in rows]
    small = rows[0]
    lines = [
        f"### Whole runs: train.py vs the reference script, {settings['model']} at {settings['size']} px, "
        f"{settings['epochs']} epochs, batch {settings['batch']}, {settings['workers']} workers", "",
        f"Ceiling (pure train step, AdamW, train.py's layout) measured in this run: {ceiling_rate:.1f} images/s.", "",
        markdown_table(headers, table), "",
        _goal(f"train.py wall <= the reference's ({small['name']})", small["wall_ratio"] >= TARGET_WALL,
              f"reference/train.py {small['wall_ratio']:.2f}"),
        _goal(f"training compute >= {TARGET_COMPUTE_SHARE:.0%} of train.py's wall ({small['name']})",
              small["compute_share"] >= TARGET_COMPUTE_SHARE,
              f"{small['compute_share']:.0%}; at most {small['share_cap']:.0%} for this job on this machine even with "
              f"the epochs at the ceiling: {small['outside']:.1f} s of the run are before its first epoch and after "
              "its last, start-up and the final report"),
        "Wall and time-to-accuracy ratios are medians of per-round ratios (reference / train.py: above 1, "
        "train.py is faster); 'first' is train.py's first round (leakage-check and header caches cold).",
    ]
    return "\n".join(lines)


def _goal(name: str, met: bool, value: str) -> str:
    return f"Goal {name}: {'met' if met else 'MISSED'} ({value})"
