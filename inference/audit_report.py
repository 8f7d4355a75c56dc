"""What audit_dataset.py writes: duplicates.csv, label_issues.csv, unreadable.csv, report.md and
its pictures (class_counts.png, image_sizes.png, duplicates.jpg, label_issues.jpg).

Suggestions name only flags that exist (tests/test_audit.py checks each one against the scripts'
parsers), so a user can paste them.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np

from inference.audit import EMBEDDING_MAX_BITS, UNSPLIT, AuditOptions, AuditResult, format_seconds
from utils.data import ImageReadError, read_rgb
from utils.image_hash import DuplicateGroup
from utils.visualize import NEUTRAL, WRONG, annotate, fit_tile, make_grid, new_figure, save_rgb

DUPLICATE_COLUMNS = ("group", "path", "split", "class", "kind", "distance", "crosses_splits", "crosses_classes")
ISSUE_COLUMNS = ("rank", "path", "split", "given", "suggested", "quality")
TILE_SIDE = 128
MAX_GROUP_TILES = 6  # members of one group shown in a row of duplicates.jpg
MAX_LISTED = 20  # rows of a table in report.md; the CSV files hold all
IMBALANCE_WARNING = 3.0  # largest/smallest class: from here on, suggest --class_weights auto
WIDE_ASPECT = 1.5  # width/height beyond this (or below its inverse) counts as wide (tall)
WIDE_SHARE = 0.2  # share of wide or tall images from which letterboxing is suggested


@dataclass
class DataStats:
    """The numbers report.md shows about the files themselves."""

    counts: dict[str, list[int]]  # split -> images per class (readable or not)
    imbalance: float  # largest / smallest class of train (of everything in an unsplit tree)
    widths: np.ndarray
    heights: np.ndarray
    grayscale_share: float
    formats: Counter
    modes: Counter
    unreadable: list[tuple[str, str, str, str]]  # (path, split, class, reason)

    @property
    def aspect(self) -> np.ndarray:
        return self.widths / np.maximum(self.heights, 1)

    @property
    def wide_share(self) -> float:
        aspect = self.aspect
        return float(np.mean((aspect > WIDE_ASPECT) | (aspect < 1 / WIDE_ASPECT))) if len(aspect) else 0.0


def data_stats(result: AuditResult) -> DataStats:
    dataset = result.dataset
    counts = {split: [0] * len(dataset.class_names) for split in dataset.splits}
    for item in dataset.items:
        counts[item.split][item.label] += 1
    base = counts.get("train") or counts.get(UNSPLIT) or [1]
    present = [c for c in base if c > 0]
    imbalance = max(present) / min(present) if present else 1.0
    readable = [fp for fp in result.fingerprints if fp.readable]
    unreadable = [(fp.path, item.split, item.class_name, fp.error)
                  for fp, item in zip(result.fingerprints, dataset.items) if not fp.readable]
    return DataStats(
        counts, imbalance,
        np.array([fp.width for fp in readable], dtype=np.float64),
        np.array([fp.height for fp in readable], dtype=np.float64),
        float(np.mean([fp.grayscale for fp in readable])) if readable else 0.0,
        Counter(fp.format or "unknown" for fp in result.fingerprints),
        Counter(fp.mode or "unknown" for fp in result.fingerprints),
        unreadable,
    )


# ----------------------------------------------------------------------------- CSV files


def ordered_groups(result: AuditResult) -> list[tuple[DuplicateGroup, bool, bool]]:
    """(group, crosses splits, crosses classes), leaks first, then label conflicts, then by size."""
    split_of = {item.path: item.split for item in result.dataset.items}
    class_of = {item.path: item.class_name for item in result.dataset.items}
    flagged = [(group, group.spans(split_of), group.spans(class_of)) for group in result.groups]
    return sorted(flagged, key=lambda g: (not g[1], not g[2], -len(g[0].members), g[0].paths[0]))


def format_distance(kind: str, distance: float) -> str:
    return f"{distance:.4f}" if kind == "embedding" else str(int(distance))


def write_duplicates_csv(path: Path, result: AuditResult) -> None:
    item_of = {item.path: item for item in result.dataset.items}
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(DUPLICATE_COLUMNS)
        for number, (group, splits, classes) in enumerate(ordered_groups(result), 1):
            for member in group.members:
                item = item_of[member.path]
                writer.writerow([number, member.path, item.split, item.class_name, member.kind,
                                 format_distance(member.kind, member.distance),
                                 "yes" if splits else "no", "yes" if classes else "no"])


def issue_rows(result: AuditResult) -> list[tuple[int, str, str, str, str, float]]:
    """(rank, path, split, given, suggested, quality) for every label issue, most suspect first."""
    labels = result.labels
    if labels is None:
        return []
    names = result.dataset.class_names
    rows = []
    for rank, position in enumerate(labels.issues, 1):
        item = result.dataset.items[labels.indices[position]]
        suggested = names[int(np.argmax(labels.probs[position]))]
        rows.append((rank, item.path, item.split, item.class_name, suggested, float(labels.quality[position])))
    return rows


def write_issues_csv(path: Path, result: AuditResult) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(ISSUE_COLUMNS)
        writer.writerows((*row[:5], f"{row[5]:.4f}") for row in issue_rows(result))


def write_unreadable_csv(path: Path, stats: DataStats) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(("path", "split", "class", "reason"))
        writer.writerows(stats.unreadable)


# ----------------------------------------------------------------------------- pictures


def _tile(path: str, lines: Sequence[str], colour: tuple[int, int, int]) -> np.ndarray:
    try:
        image = fit_tile(read_rgb(path, [TILE_SIDE, TILE_SIDE]), TILE_SIDE)  # large JPEGs decoded smaller
    except ImageReadError:  # changed since it was hashed: show an empty tile, not a crash
        image = np.full((TILE_SIDE, TILE_SIDE, 3), 255, dtype=np.uint8)
    return annotate(image, lines, colour)


def save_duplicates_picture(path: Path, result: AuditResult, top: int) -> bool:
    """The first `top` groups (leaks and label conflicts first, captioned in red), packed into rows
    of MAX_GROUP_TILES tiles; a group that does not fit in the rest of a row starts a new one."""
    item_of = {item.path: item for item in result.dataset.items}
    tiles: list[np.ndarray] = []
    for number, (group, splits, classes) in enumerate(ordered_groups(result)[:top], 1):
        colour = WRONG if splits or classes else NEUTRAL
        row = [_tile(m.path, [f"#{number} {item_of[m.path].split}/{item_of[m.path].class_name}",
                              f"{m.kind} {format_distance(m.kind, m.distance)}"], colour)
               for m in group.members[:MAX_GROUP_TILES]]
        free = -len(tiles) % MAX_GROUP_TILES
        if len(row) > free:
            tiles += [np.full_like(row[0], 255)] * free
        tiles += row
    if not tiles:
        return False
    save_rgb(path, make_grid(tiles, columns=MAX_GROUP_TILES))
    return True


def save_issues_picture(path: Path, result: AuditResult, top: int) -> bool:
    rows = issue_rows(result)[:top]
    if not rows:
        return False
    tiles = [_tile(p, [f"#{rank} given: {given}", f"suggested: {suggested}"], WRONG)
             for rank, p, _split, given, suggested, _quality in rows]
    save_rgb(path, make_grid(tiles, columns=6))
    return True


def save_count_plot(path: Path, result: AuditResult, stats: DataStats) -> None:
    names = result.dataset.class_names
    figure = new_figure(figsize=(max(6, 0.4 * len(names) + 2), 4))  # no pyplot: no GUI backend needed
    axis = figure.subplots()
    bottom = np.zeros(len(names))
    for split, counts in stats.counts.items():
        axis.bar(range(len(names)), counts, bottom=bottom, label=split)
        bottom += np.array(counts)
    axis.set_xticks(range(len(names)), names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    axis.set_ylabel("images")
    axis.set_title("Images per class")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def save_size_plot(path: Path, stats: DataStats) -> None:
    figure = new_figure(figsize=(10, 3.5))
    sides, aspects = figure.subplots(1, 2)
    sides.hist([stats.widths, stats.heights], bins=30, label=["width", "height"])
    sides.set_xlabel("pixels")
    sides.set_title("Image sizes")
    sides.legend()
    aspects.hist(np.log2(stats.aspect), bins=30, color="tab:green")
    ticks = [0.25, 0.5, 1, 2, 4]
    aspects.set_xticks(np.log2(ticks), [str(t) for t in ticks])
    aspects.set_xlabel("aspect ratio (width / height, log scale)")
    aspects.set_title("Aspect ratios")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- report.md


def suggested_input_shape(stats: DataStats) -> Optional[list[int]]:
    """A --input_shape from the median image: its sides rounded down to multiples of 32, at
    least 32 and at most 224 on the short side (the usual size of pretrained weights)."""
    if not len(stats.widths):
        return None
    width, height = float(np.median(stats.widths)), float(np.median(stats.heights))
    short = max(32, min(224, int(min(width, height)) // 32 * 32))
    ratio = width / height
    if 1 / 1.25 <= ratio <= 1.25:
        return [short]
    long_side = int(short * max(ratio, 1 / ratio)) // 32 * 32
    return [short, long_side] if ratio > 1 else [long_side, short]


def suggestions(result: AuditResult, stats: DataStats, root: str) -> list[str]:
    """Concrete next steps, each naming the flag or file that does it."""
    tips = []
    groups = ordered_groups(result)
    leaks = [g for g in groups if g[1]]
    conflicts = [g for g in groups if g[2]]
    if not result.dataset.split_tree:
        tips.append(f"The dataset is not split: `python split_dataset.py --src {root} --dst {root}_split "
                    "--val_ratio 0.1 --test_ratio 0.1` (it keeps identical files in one split), or split in "
                    f"memory with `python train.py --dataset_path {root} --val_ratio 0.2`.")
    if leaks:
        tips.append(f"{len(leaks)} duplicate group(s) span splits: the val/test score counts pictures the model "
                    "trained on. Delete the val/test copies (rows with crosses_splits=yes in duplicates.csv) "
                    "or re-split the original images with split_dataset.py.")
    if conflicts:
        tips.append(f"{len(conflicts)} duplicate group(s) carry more than one class (crosses_classes=yes): "
                    "decide one label per picture.")
    if result.labels is not None and result.labels.issues:
        tips.append(f"{len(result.labels.issues)} image(s) look mislabelled: check the top of label_issues.csv "
                    "(label_issues.jpg shows them) and move or delete the wrong ones before training.")
    if stats.imbalance >= IMBALANCE_WARNING:
        tips.append(f"Classes are imbalanced ({stats.imbalance:.1f}x): train with `--class_weights auto`, "
                    "or collect more images of the small classes.")
    if stats.wide_share >= WIDE_SHARE:
        tips.append(f"{stats.wide_share:.0%} of the images are wide or tall (aspect beyond {WIDE_ASPECT}): "
                    "`--resize_mode letterbox` keeps all of each image instead of cropping its sides.")
    shape = suggested_input_shape(stats)
    if shape:
        tips.append(f"The median image is {np.median(stats.widths):.0f}x{np.median(stats.heights):.0f} "
                    f"(width x height): `--input_shape {' '.join(map(str, shape))}` fits it.")
    if stats.grayscale_share >= 0.9:
        tips.append(f"{stats.grayscale_share:.0%} of the images are grayscale: colour augmentation "
                    "(`--color_jitter`) has nothing to vary, leave it at 0.")
    if stats.unreadable:
        tips.append(f"{len(stats.unreadable)} file(s) cannot be read (listed below and in unreadable.csv); "
                    "train.py leaves them out: repair or delete them.")
    for split, missing in result.dataset.missing_classes.items():
        tips.append(f"{split}/ has no images of {', '.join(missing)}: those classes get no {split} score.")
    return tips


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines + [""]


def _counts_section(result: AuditResult, stats: DataStats) -> list[str]:
    splits = list(stats.counts)
    rows = [[name, *(stats.counts[s][i] for s in splits), sum(stats.counts[s][i] for s in splits)]
            for i, name in enumerate(result.dataset.class_names)]
    rows.append(["**total**", *(sum(stats.counts[s]) for s in splits), len(result.dataset.items)])
    base = "train" if "train" in splits else "all images"
    return (["## Images per class and split", ""] + _table(["class", *splits, "total"], rows)
            + [f"Imbalance (largest / smallest class, {base}): {stats.imbalance:.1f}x", "",
               "![images per class](class_counts.png)", ""])


def _files_section(stats: DataStats) -> list[str]:
    lines = ["## Image sizes, colour and formats", ""]
    if len(stats.widths):
        lines += [f"- sizes: median {np.median(stats.widths):.0f}x{np.median(stats.heights):.0f} (width x height); "
                  f"widths {stats.widths.min():.0f}-{stats.widths.max():.0f}, heights "
                  f"{stats.heights.min():.0f}-{stats.heights.max():.0f} pixels",
                  f"- wide or tall (aspect beyond {WIDE_ASPECT}): {stats.wide_share:.1%}",
                  f"- grayscale (R = G = B everywhere): {stats.grayscale_share:.1%}"]
    lines += ["- formats: " + ", ".join(f"{name} {count}" for name, count in stats.formats.most_common()),
              "- colour modes in the files: " + ", ".join(f"{name} {count}" for name, count in stats.modes.most_common()),
              "", "![image sizes](image_sizes.png)" if len(stats.widths) else "", "",
              f"### Unreadable files ({len(stats.unreadable)})", ""]
    if not stats.unreadable:
        return lines + ["None.", ""]
    shown = stats.unreadable[:MAX_LISTED]
    lines += _table(["path", "split", "class", "reason"], shown)
    more = len(stats.unreadable) - len(shown)
    return lines + ([f"... and {more} more in unreadable.csv", ""] if more else [])


def _duplicates_section(result: AuditResult, options: AuditOptions) -> list[str]:
    groups = ordered_groups(result)
    kinds = Counter(member.kind for group, _, _ in groups for member in group.members)
    rule = (f"same bytes (exact), perceptual hash within {result.phash_distance} of 64 bits (perceptual)"
            if result.phash_distance >= 0 else "same bytes (exact)")
    if result.embedding_source:
        rule += (f", cosine similarity of centred embeddings at least {options.min_similarity} with perceptual "
                 f"hashes within {EMBEDDING_MAX_BITS} bits (embedding)")
    lines = ["## Duplicates", "", f"Linked by: {rule}. Every group is listed in duplicates.csv.", "",
             f"- {len(groups)} group(s) with {sum(len(g.members) for g, _, _ in groups)} files "
             f"({', '.join(f'{kind} {count}' for kind, count in kinds.most_common()) or 'none'})",
             f"- spanning splits (leakage): {sum(1 for g in groups if g[1])}",
             f"- spanning classes (one picture, two labels): {sum(1 for g in groups if g[2])}", ""]
    if not groups:
        return lines
    rows = [[number, len(group.members), "yes" if splits else "no", "yes" if classes else "no",
             "<br>".join(group.paths[:4]) + (" ..." if len(group.paths) > 4 else "")]
            for number, (group, splits, classes) in enumerate(groups[:MAX_LISTED], 1)]
    return (lines + _table(["group", "files", "crosses splits", "crosses classes", "paths"], rows)
            + ["![duplicate groups](duplicates.jpg)", ""])


def _labels_section(result: AuditResult) -> list[str]:
    lines = ["## Label issues", ""]
    labels = result.labels
    if labels is None:
        return lines + ["Not computed (see Notes).", ""]
    rows = issue_rows(result)
    lines += [f"Out-of-sample probabilities: {labels.source}; took {format_seconds(labels.seconds)}. "
              "cleanlab's find_label_issues flagged "
              f"{len(rows)} of {len(labels.indices)} images ({len(rows) / max(1, len(labels.indices)):.1%}); "
              "quality is the probability of the given label (0: surely wrong).", ""]
    if not rows:
        return lines
    shown = [(rank, path, split, given, suggested, f"{quality:.3f}")
             for rank, path, split, given, suggested, quality in rows[:MAX_LISTED]]
    return lines + _table(ISSUE_COLUMNS, shown) + ["![label issues](label_issues.jpg)", ""]


def write_report(path: Path, result: AuditResult, options: AuditOptions, stats: DataStats) -> None:
    dataset = result.dataset
    total = sum(result.timings.values())
    lines = [f"# Dataset audit: {dataset.root}", "",
             f"{datetime.now():%Y-%m-%d %H:%M}: {len(dataset.items)} images in {len(dataset.class_names)} classes, "
             f"{'splits: ' + ', '.join(dataset.splits) if dataset.split_tree else 'not split'}. "
             f"The steps took {format_seconds(total)} (see Timings). "
             "Nothing in the dataset was changed.", ""]
    if result.embedding_source:
        lines += [f"Embeddings: {result.embedding_source}.", ""]
    tips = suggestions(result, stats, dataset.root)
    lines += ["## Suggestions", ""] + [f"- {tip}" for tip in tips or ["Nothing to fix was found."]] + [""]
    lines += _duplicates_section(result, options) + _labels_section(result)
    lines += _counts_section(result, stats) + _files_section(stats)
    if result.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in result.notes] + [""]
    lines += ["## Timings", ""] + _table(["step", "time"], [(step, format_seconds(seconds))
                                                            for step, seconds in result.timings.items()])
    path.write_text("\n".join(lines), encoding="utf-8")


def write_outputs(result: AuditResult, options: AuditOptions, out_dir: Path) -> DataStats:
    """Every file of the audit in `out_dir` (which exists); returns the statistics."""
    stats = data_stats(result)
    write_duplicates_csv(out_dir / "duplicates.csv", result)
    write_issues_csv(out_dir / "label_issues.csv", result)
    if stats.unreadable:
        write_unreadable_csv(out_dir / "unreadable.csv", stats)
    save_count_plot(out_dir / "class_counts.png", result, stats)
    if len(stats.widths):
        save_size_plot(out_dir / "image_sizes.png", stats)
    if options.top > 0:
        save_duplicates_picture(out_dir / "duplicates.jpg", result, options.top)
        save_issues_picture(out_dir / "label_issues.jpg", result, options.top)
    write_report(out_dir / "report.md", result, options, stats)
    return stats


def console_summary(result: AuditResult, out_dir: Path, seconds: float) -> str:
    """audit_dataset.py's closing lines: the headline numbers and where the details are."""
    groups = ordered_groups(result)
    unreadable = sum(not fp.readable for fp in result.fingerprints)
    lines = [f"duplicates: {len(groups)} group(s), {sum(g[1] for g in groups)} spanning splits, "
             f"{sum(g[2] for g in groups)} spanning classes -> {out_dir / 'duplicates.csv'}"]
    if result.labels is not None:
        lines.append(f"label issues: {len(result.labels.issues)} -> {out_dir / 'label_issues.csv'} "
                     f"({result.labels.source}; {format_seconds(result.labels.seconds)})")
    lines += [f"unreadable files: {unreadable}", *(f"note: {note}" for note in result.notes),
              f"report: {out_dir / 'report.md'} (the audit took {format_seconds(seconds)})"]
    return "\n".join(lines)
