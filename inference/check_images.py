"""The images an export is checked on (and an int8 model calibrated on): real ones where possible.

Preference: --check_images DIR (a labelled tree <class>/<images> gives accuracy too); else the
validation split of the dataset named in the checkpoint's training args, when it is still there;
else generated images (smooth colour fields with noise), which prove the arithmetic but not the
behaviour on real photos. At most `limit` images, spread evenly over the sorted list so every
class folder counts; each is read and resized exactly as infer.py does (inference.predictor.PathDataset).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from inference.inputs import ImageInputs, find_labels
from utils.data import scan_dataset
from utils.errors import UsageError
from utils.files import IMAGE_EXTENSIONS, list_images
from utils.transforms import Preprocess

DEFAULT_LIMIT = 200  # enough to see a disagreement, few enough to check a big model in seconds
GENERATED_COUNT = 16


@dataclass
class CheckImages:
    images: torch.Tensor  # uint8 [N, 3, H, W], resized by the checkpoint's rule
    labels: Optional[list[int]]  # true class per image, for a labelled tree
    origin: str  # where they came from, for the console
    generated: bool = False
    notes: list[str] = field(default_factory=list)  # what the user should know (skipped files, fallbacks)

    def describe(self) -> str:
        labelled = ", labelled" if self.labels is not None else ""
        return f"{len(self.images)} {'generated images' if self.generated else 'images from ' + self.origin}{labelled}"


def choose_check_images(folder: Optional[str], class_names: Sequence[str], preprocess: Preprocess,
                        train_args: dict, limit: int = DEFAULT_LIMIT) -> CheckImages:
    """`folder` (a UsageError when it has no readable image), else the training dataset, else generated."""
    notes: list[str] = []
    if folder is not None:
        paths, labels = _folder_images(folder, class_names, notes)
        origin = folder
    else:
        found = _dataset_images(train_args, class_names, notes)
        if found is None:
            where = train_args.get("dataset_path")
            reason = f"the training dataset {where} is not found" if where else "the checkpoint names no dataset"
            return generated_images(preprocess, [f"{reason}: checking on {GENERATED_COUNT} generated images "
                                                 "(give --check_images DIR to check on real ones)"])
        paths, labels, origin = found
    picked = np.unique(np.linspace(0, len(paths) - 1, min(limit, len(paths))).round().astype(int))
    paths = [paths[i] for i in picked]
    labels = [labels[i] for i in picked] if labels is not None else None
    images, errors = read_resized(paths, preprocess)
    readable = [i for i, error in enumerate(errors) if not error]
    if len(readable) < len(paths):
        notes.append(f"{len(paths) - len(readable)} unreadable image(s) left out, e.g. {next(e for e in errors if e)}")
    if not readable:
        if folder is not None:
            raise UsageError(f"--check_images {folder}: none of its images could be read")
        return generated_images(preprocess, notes + [f"no readable images in {origin}: using generated ones"])
    chosen = images[readable]
    return CheckImages(chosen, [labels[i] for i in readable] if labels is not None else None, origin, notes=notes)


def _folder_images(folder: str, class_names: Sequence[str], notes: list[str]) -> tuple[list[str], Optional[list[int]]]:
    if not os.path.isdir(folder):
        raise UsageError(f"--check_images {folder} is not a folder")
    paths = list_images(folder)
    if not paths:
        raise UsageError(f"--check_images {folder} holds no image files ({' '.join(IMAGE_EXTENSIONS)})")
    labels, why_not = find_labels(ImageInputs(paths, folder=folder), class_names)  # infer.py's labelling rule
    if why_not:
        notes.append(why_not)
    return paths, labels.indices if labels else None


def _dataset_images(train_args: dict, class_names: Sequence[str],
                    notes: list[str]) -> Optional[tuple[list[str], Optional[list[int]], str]]:
    """The validation split (else test) of the training dataset, split as train.py split it."""
    root = train_args.get("dataset_path")
    if not isinstance(root, str) or not os.path.isdir(root):
        return None
    try:
        scan = scan_dataset(root, float(train_args.get("val_ratio") or 0.0), float(train_args.get("test_ratio") or 0.0),
                            int(train_args.get("seed") or 0), check_files=False)
    except (UsageError, TypeError, ValueError):  # the dataset changed since training, or odd args: not fatal
        return None
    split = "val" if scan.splits.get("val") else "test"
    samples = scan.splits.get(split) or []
    if not samples:
        return None
    labels = [label for _, label in samples]
    if list(scan.class_names) != list(class_names):  # its label numbers would mean other classes
        notes.append(f"{root} lists other classes than the checkpoint (names or order): its images are used unlabelled")
        labels = None
    return [path for path, _ in samples], labels, f"{root} ({split} split)"


def read_resized(paths: Sequence[str], preprocess: Preprocess) -> tuple[torch.Tensor, list[str]]:
    """uint8 [N, 3, H, W] read and resized as infer.py does; errors[i] is "" where image i was read."""
    from inference.predictor import PathDataset  # infer.py's reader + resize: the same pixels as a prediction

    dataset = PathDataset(paths, preprocess)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([image for image, _, _ in items]), [error for _, _, error in items]


def generated_images(preprocess: Preprocess, notes: Sequence[str] = (), count: int = GENERATED_COUNT,
                     seed: int = 0) -> CheckImages:
    """Smooth random colour fields with noise: photo-like enough to spread the probabilities."""
    height, width = preprocess.input_size
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 255
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    noise = torch.randn(count, 3, height, width, generator=generator) * 12
    images = (smooth + noise).clamp(0, 255).round().to(torch.uint8)
    return CheckImages(images, None, "generated", generated=True, notes=list(notes))
