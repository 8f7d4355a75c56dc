"""The data doctor behind audit_dataset.py: duplicates, leakage, likely label errors, a data report.

    dataset = collect_dataset("data/flowers")          # split tree or unsplit class folders
    result = run_audit(dataset, AuditOptions(weights="logs/<run>/best.pth"), out_dir)

Steps (each timed, the long ones with a progress bar):
  1. fingerprint every file (utils.image_hash: sha1 + pHash + size/format, cached by path+mtime+size)
  2. with --weights: CNN embeddings of every image (the layer that feeds the checkpoint's classifier)
  3. duplicate groups: same bytes, close pHash, and (with embeddings) cosine similarity
  4. out-of-sample class probabilities by K-fold: logistic regression on the embeddings, or without
     --weights a small CNN trained K times, each time on K-1 folds; cleanlab ranks the label issues
  5. duplicates.csv, label_issues.csv, report.md and its pictures (inference/audit_report.py)
The dataset is only read.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from inference.predictor import inference_workers
from models.finetune import head_parameter_names
from models.registry import check_input_size, create_model
from utils.checkpoint import load_checkpoint, load_model_weights
from utils.data import ImageDataset, Sample, create_dataloader, default_workers, scan_dataset
from utils.device import default_channels_last, describe_device, select_device
from utils.engine import StepSettings, progress_bar, train_one_epoch
from utils.errors import UsageError
from utils.files import list_class_dirs, list_images
from utils.image_hash import (
    DEFAULT_MAX_DISTANCE,
    DuplicateGroup,
    DuplicateSearch,
    Fingerprint,
    Link,
    fingerprint_files,
    hashes_as_uint64,
    popcount,
    search_duplicates,
)
from utils.optim import create_optimizer, create_scheduler
from utils.transforms import Preprocess, build_eval_transform, build_train_transform

UNSPLIT = "all"  # the split column of an unsplit DATASET/<class>/ tree
DEFAULT_MIN_SIMILARITY = 0.9  # cosine of centred CNN embeddings from which two images count as one picture
EMBEDDING_MAX_BITS = 12  # ... and their pHashes differ in at most this many bits: 3-5% crops of a photo land at
# 4-14 bits, and in 5,000 look-alike images (bench_audit.py) the embedding pairs above 12 bits were all unrelated
SIMILARITY_BLOCK = 1024  # embedding rows compared per matrix product: bounds memory for any dataset size


@dataclass
class AuditItem:
    path: str
    split: str  # "train", "val", "test" or UNSPLIT
    class_name: str
    label: int  # index into AuditDataset.class_names


@dataclass
class AuditDataset:
    root: str
    class_names: list[str]
    items: list[AuditItem]
    split_tree: bool  # False: DATASET/<class>/ without train/ and val/
    missing_classes: dict[str, list[str]] = field(default_factory=dict)  # split -> classes without images

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(item.split for item in self.items))


@dataclass
class AuditOptions:
    """What to compute; the defaults are audit_dataset.py's."""

    weights: Optional[str] = None  # checkpoint for embeddings; None: K-fold training of `model`
    folds: int = 5
    max_distance: int = DEFAULT_MAX_DISTANCE  # pHash bits; -1: exact copies only
    min_similarity: float = DEFAULT_MIN_SIMILARITY
    labels: bool = True  # look for label issues at all
    model: str = "resnet18"  # the quick K-fold model (no --weights)
    input_size: Optional[int] = None  # its square input side; None: from the image sizes
    epochs: int = 4
    batch_size: int = 32
    device: str = "auto"
    workers: Optional[int] = None
    seed: int = 0
    top: int = 24  # groups / suspects shown in the pictures
    cache_path: Optional[str] = None  # fingerprint cache (utils.image_hash); None: no cache
    progress: bool = False


@dataclass
class LabelResult:
    """Out-of-sample probabilities and what cleanlab made of them (indices into `indices`)."""

    indices: list[int]  # AuditDataset.items used (the readable ones)
    probs: np.ndarray  # (len(indices), C)
    issues: list[int]  # positions into `indices`, most suspect first
    quality: np.ndarray  # (len(indices),) label quality score, 0 = surely wrong .. 1 = surely right
    source: str  # which model produced the probabilities, for the report
    seconds: float


@dataclass
class AuditResult:
    dataset: AuditDataset
    fingerprints: list[Fingerprint]
    groups: list[DuplicateGroup]
    labels: Optional[LabelResult]
    notes: list[str] = field(default_factory=list)  # what was skipped and why, for the report
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds
    embedding_source: Optional[str] = None
    phash_distance: int = DEFAULT_MAX_DISTANCE  # the one used (see utils.image_hash.crowding_limit)


# ----------------------------------------------------------------------------- dataset


def collect_dataset(root: str | os.PathLike) -> AuditDataset:
    """Every image file with its split and class: a split tree through utils.data.scan_dataset
    (the rules train.py applies), an unsplit DATASET/<class>/ tree as one split named UNSPLIT.
    Unreadable files stay in: the audit lists them instead of dropping them."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"--dataset_path {root} does not exist or is not a folder")
    if (root / "train").is_dir():
        scan = scan_dataset(root, check_files=False)
        items = [AuditItem(path, split, scan.class_names[label], label)
                 for split, samples in scan.splits.items() for path, label in samples]
        return AuditDataset(str(root), scan.class_names, items, True, scan.missing_classes)
    class_names = list_class_dirs(root)
    files = {name: list_images(root / name) for name in class_names}
    class_names = [name for name in class_names if files[name]]  # an empty folder is no class
    if not class_names:
        raise UsageError(f"--dataset_path {root} holds no class folders with images; expected "
                         "DATASET/train/<class>/<images> (and val/) or DATASET/<class>/<images>")
    items = [AuditItem(path, UNSPLIT, name, label) for label, name in enumerate(class_names) for path in files[name]]
    return AuditDataset(str(root), class_names, items, False)


@contextmanager
def timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - start


# ----------------------------------------------------------------------------- models


def load_embedding_model(weights: str | os.PathLike) -> tuple[nn.Module, Preprocess, str]:
    """(model in eval mode, its preprocessing, a description) from a train.py checkpoint."""
    checkpoint = load_checkpoint(weights)
    if "format" not in checkpoint:
        raise UsageError(f"--weights {weights} is a bare state_dict; the audit needs a checkpoint written by "
                         "train.py (it names the model and its preprocessing)")
    preprocess = Preprocess.from_dict(checkpoint["preprocess"])
    name = checkpoint["model"]
    model = create_model(name, len(checkpoint["class_names"]), tuple(preprocess.input_size), weights_follow=True,
                         **(checkpoint.get("model_kwargs") or {}))
    load_model_weights(model, checkpoint["state_dict"], str(weights))
    height, width = preprocess.input_size
    return model.eval(), preprocess, f"{name} from {weights} (input {height}x{width}, {preprocess.resize_mode})"


def classifier_layer(model: nn.Module) -> nn.Module:
    """The last layer of the model's head: its input is the image embedding."""
    first_head_parameter = head_parameter_names(model)[0]  # e.g. "fc.weight" or "classifier.1.weight"
    return model.get_submodule(first_head_parameter.rsplit(".", 1)[0])


@torch.inference_mode()
def forward_images(model: nn.Module, samples: Sequence[Sample], settings: StepSettings, batch_size: int,
                   workers: int, description: str, progress: bool,
                   embed: bool = False) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(softmax probabilities (N, C), embeddings (N, D) or None) of `samples` in order, in eval
    mode with the eval preprocessing. Embeddings are what enters the classifier layer, pooled
    to a vector where that layer is a convolution (SqueezeNet)."""
    model.eval()
    captured: list[torch.Tensor] = []

    def keep_input(_module: nn.Module, inputs: tuple) -> None:
        features = inputs[0].float()
        captured.append((features.flatten(2).mean(2) if features.ndim > 2 else features).cpu())

    hook = classifier_layer(model).register_forward_pre_hook(keep_input) if embed else None
    loader = create_dataloader(ImageDataset(samples, build_eval_transform(settings.preprocess)), batch_size,
                               False, workers, settings.device)
    probs = []
    try:
        for images, targets in progress_bar(loader, description, progress):
            inputs, _ = settings.prepare(images, targets)
            with settings.autocast():
                logits = model(inputs)
            probs.append(logits.float().softmax(1).cpu())
    finally:
        if hook is not None:
            hook.remove()
    embeddings = torch.cat(captured).numpy() if embed else None
    return torch.cat(probs).numpy(), embeddings


def checkpoint_embeddings(weights: str, samples: Sequence[Sample], options: AuditOptions) -> tuple[np.ndarray, str]:
    """Embeddings of every sample from the --weights checkpoint, and a line saying where from."""
    model, preprocess, description = load_embedding_model(weights)
    device = select_device(options.device)
    channels_last = default_channels_last(device, preprocess.input_size)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    settings = StepSettings(device, preprocess, channels_last=channels_last)
    # inference on the CPU: few decoding workers, so they do not take the cores the model needs
    workers = inference_workers(len(samples), device) if options.workers is None else options.workers
    _, embeddings = forward_images(model, samples, settings, options.batch_size * 2, workers, "embeddings",
                                   options.progress, embed=True)
    return embeddings, f"{description}, on {describe_device(device)}"  # type: ignore[return-value]


def _workers(options: AuditOptions, count: int) -> int:
    return default_workers(count) if options.workers is None else options.workers


# ----------------------------------------------------------------------------- label issues


def usable_positions(labels: np.ndarray, class_names: Sequence[str], notes: list[str]) -> np.ndarray:
    """Positions whose class has at least two readable images (stratified K-fold needs one in
    each of two folds); the classes left out are noted. Empty when fewer than two classes remain."""
    counts = np.bincount(labels, minlength=len(class_names))
    single = [class_names[c] for c in np.nonzero(counts == 1)[0]]
    if single:
        notes.append(f"label issues: left out class(es) with a single readable image: {', '.join(single)}")
    keep = counts[labels] >= 2
    if len(np.unique(labels[keep])) < 2:
        notes.append("label issues: fewer than two classes have two readable images, so there is nothing to compare")
        return np.zeros(0, dtype=np.int64)
    return np.nonzero(keep)[0]


def embedding_probs(embeddings: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Out-of-sample probabilities: logistic regression on standardised embeddings, K-fold.

    The embeddings themselves are not out-of-sample when the checkpoint was trained on these
    images: a long-trained model has learnt its wrong labels too, and fewer issues are found
    (in tests: 5 of 8 flipped labels after 3 epochs, 3 after 5). docs/audit.md says so."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(classifier, embeddings, labels, cv=splitter, method="predict_proba")


def quick_input_size(fingerprints: Sequence[Fingerprint]) -> int:
    """Input side of the quick K-fold model: the median short side, kept within 32..96 (beyond
    96 the K trainings cost more than the ranking gains)."""
    sides = [min(fp.width, fp.height) for fp in fingerprints if fp.readable]
    return int(min(96, max(32, np.median(sides)))) if sides else 64


def trained_probs(samples: Sequence[Sample], num_classes: int, folds: int, options: AuditOptions,
                  input_size: int) -> tuple[np.ndarray, str]:
    """Out-of-sample probabilities from K small CNNs, each trained on K-1 folds for a few epochs."""
    from sklearn.model_selection import StratifiedKFold

    device = select_device(options.device)
    preprocess = Preprocess(input_size=[input_size, input_size], resize_mode="stretch")  # sees the whole image
    check_input_size(options.model, (input_size, input_size))
    settings = StepSettings(device, preprocess, channels_last=default_channels_last(device, preprocess.input_size))
    labels = np.array([label for _, label in samples])
    probs = np.zeros((len(samples), num_classes), dtype=np.float32)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=options.seed)
    for fold, (train_index, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels), 1):
        model = _train_fold([samples[i] for i in train_index], num_classes, settings, options, f"fold {fold}/{folds}")
        probs[held_out], _ = forward_images(model, [samples[i] for i in held_out], settings, options.batch_size * 2,
                                            0, f"fold {fold}/{folds} predict", options.progress)
    source = (f"{folds}-fold training of {options.model} from scratch ({options.epochs} epochs, input "
              f"{input_size}x{input_size}, on {describe_device(device)})")
    return probs, source


def _train_fold(samples: Sequence[Sample], num_classes: int, settings: StepSettings, options: AuditOptions,
                description: str) -> nn.Module:
    """A few epochs of the project's own training step (utils.engine) on one fold's training part.
    Light augmentation suits so short a run: crops of 80-100% of the image (smaller ones lost the
    object and halved the flipped labels found in tests), no flip (wrong for text and digits)."""
    torch.manual_seed(options.seed)
    model = create_model(options.model, num_classes, tuple(settings.preprocess.input_size)).to(settings.device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    transform = build_train_transform(settings.preprocess, "basic", hflip=0.0, crop_scale=0.8)
    generator = torch.Generator().manual_seed(options.seed)
    # a last batch of one image fails in BatchNorm where the feature map is 1x1 (resnet18 at 32 px)
    batch_size = options.batch_size
    while len(samples) % batch_size == 1 and batch_size < len(samples):  # ends within a few steps
        batch_size += 1
    loader = create_dataloader(ImageDataset(samples, transform), batch_size, True,
                               _workers(options, len(samples)), settings.device, generator, persistent=False)
    optimizer = create_optimizer(model, "adamw", 2e-3, weight_decay=0.01)
    scheduler = create_scheduler(optimizer, "cos", options.epochs, len(loader), warmup_epochs=min(1.0, options.epochs / 4))
    criterion = nn.CrossEntropyLoss()
    for epoch in range(1, options.epochs + 1):
        train_one_epoch(model, loader, criterion, optimizer, scheduler, settings,
                        description=f"{description} epoch {epoch}/{options.epochs}", show_progress=options.progress)
    return model


def find_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[list[int], np.ndarray]:
    """cleanlab's confident learning: (issue positions most suspect first, label quality scores)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    return [int(i) for i in ranked], np.asarray(quality)


def label_issues(dataset: AuditDataset, readable: Sequence[int], embeddings: Optional[np.ndarray],
                 options: AuditOptions, notes: list[str], input_size: int) -> Optional[LabelResult]:
    """Out-of-sample probabilities (embeddings + logistic regression, or quick K-fold training)
    ranked by cleanlab; None with a note when there is not enough data."""
    start = time.perf_counter()
    labels = np.array([dataset.items[i].label for i in readable], dtype=np.int64)
    kept = usable_positions(labels, dataset.class_names, notes)
    if not len(kept):
        return None
    labels, indices = labels[kept], [readable[k] for k in kept]
    # cleanlab wants the classes numbered 0..C-1 with every one present: renumber the present ones
    present, counts = np.unique(labels, return_counts=True)
    dense = np.searchsorted(present, labels)
    folds = min(options.folds, int(counts.min()))
    if folds < options.folds:
        notes.append(f"label issues: {folds} folds instead of {options.folds} (the smallest class has {folds} images)")
    if embeddings is not None:
        probs = embedding_probs(embeddings[kept], dense, folds, options.seed)
        source = f"{folds}-fold logistic regression on the embeddings"
    else:
        samples = [(dataset.items[i].path, int(label)) for i, label in zip(indices, dense)]
        probs, source = trained_probs(samples, len(present), folds, options, input_size)
    issues, quality = find_issues(dense, probs)
    full = np.zeros((len(indices), len(dataset.class_names)), dtype=np.float32)
    full[:, present] = probs
    return LabelResult(indices, full, issues, quality, source, time.perf_counter() - start)


# ----------------------------------------------------------------------------- duplicates


def embedding_links(embeddings: np.ndarray, indices: Sequence[int], min_similarity: float,
                    hashes: np.ndarray) -> list[Link]:
    """Pairs of images that are each other's nearest neighbour by cosine similarity of centred
    embeddings, with similarity >= min_similarity and pHashes at most EMBEDDING_MAX_BITS apart,
    as Links between `indices` (distance = 1 - cosine). `hashes`: uint64 pHash per row.

    Why so strict: a classifier embeds the images of one class alike (after a short training
    already), so a similarity threshold alone links whole classes into one group (5,000 images
    of 4 classes: 4 groups of 1,000). Mutual nearest neighbours cannot chain: each image is in
    at most one such pair. Centring first spreads the features, which after a ReLU all point
    into one orthant (unrelated images above 0.7 otherwise). Pass each content once: an exact
    copy would be every image's nearest neighbour.
    """
    if len(embeddings) < 2:
        return []
    centred = embeddings - embeddings.mean(0)
    unit = (centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    nearest = np.empty(len(unit), dtype=np.int64)
    similarity = np.empty(len(unit), dtype=np.float32)
    for start in range(0, len(unit), SIMILARITY_BLOCK):  # blocks of rows: bounded memory for any size
        block = unit[start:start + SIMILARITY_BLOCK] @ unit.T
        block[np.arange(len(block)), np.arange(start, start + len(block))] = -2.0  # not its own neighbour
        nearest[start:start + len(block)] = block.argmax(1)
        similarity[start:start + len(block)] = block.max(1)
    rows = np.arange(len(unit))
    mutual = (rows < nearest) & (nearest[nearest] == rows) & (similarity >= min_similarity)
    close = popcount(hashes ^ hashes[nearest]) <= EMBEDDING_MAX_BITS
    return [Link(indices[i], indices[nearest[i]], "embedding", round(1.0 - float(similarity[i]), 6))
            for i in np.nonzero(mutual & close)[0]]


def duplicate_search(fingerprints: Sequence[Fingerprint], embeddings: Optional[np.ndarray],
                     readable: Sequence[int], options: AuditOptions, notes: list[str]) -> DuplicateSearch:
    extra = []
    if embeddings is not None:
        first_of_content = list({fingerprints[i].sha1: row for row, i in reversed(list(enumerate(readable)))}.values())
        hashes = hashes_as_uint64([fingerprints[readable[row]] for row in first_of_content])
        extra = embedding_links(embeddings[first_of_content], [readable[row] for row in first_of_content],
                                options.min_similarity, hashes)
    search = search_duplicates(fingerprints, options.max_distance, extra, progress=options.progress)
    if search.lowered:
        used = f"{search.max_distance} bits were used" if search.max_distance >= 0 else "only exact copies count"
        notes.append(f"duplicates: unrelated images of this dataset have close perceptual hashes (about "
                     f"{search.expected_false_pairs:.0f} unrelated pairs expected within --phash_distance "
                     f"{search.requested_distance}), so {used}")
    return search


# ----------------------------------------------------------------------------- the whole audit


def run_audit(dataset: AuditDataset, options: AuditOptions, out_dir: Path) -> AuditResult:
    """Every step, then every output file in `out_dir` (see the module docstring)."""
    from inference.audit_report import write_outputs  # the writers need matplotlib: load them last

    timings: dict[str, float] = {}
    paths = [item.path for item in dataset.items]
    with timed(timings, "fingerprints"):
        fingerprints = fingerprint_files(paths, options.cache_path, progress=options.progress)
    readable = [i for i, fp in enumerate(fingerprints) if fp.readable]
    embeddings, embedding_source, notes = None, None, []
    if options.weights and readable:
        with timed(timings, "embeddings"):
            embeddings, embedding_source = checkpoint_embeddings(
                options.weights, [(paths[i], 0) for i in readable], options)
    with timed(timings, "duplicates"):
        search = duplicate_search(fingerprints, embeddings, readable, options, notes)
    labels = None
    if options.labels and readable:
        input_size = options.input_size or quick_input_size(fingerprints)
        with timed(timings, "label issues"):
            labels = label_issues(dataset, readable, embeddings, options, notes, input_size)
    elif not options.labels:
        notes.append("label issues: skipped (--no_labels)")
    result = AuditResult(dataset, fingerprints, search.groups, labels, notes, timings, embedding_source,
                         search.max_distance)
    with timed(timings, "report"):
        write_outputs(result, options, out_dir)
    return result


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(math.floor(seconds), 60)
    return f"{minutes} min {rest:02d} s"
