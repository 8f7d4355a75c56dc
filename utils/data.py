"""Dataset scanning, the one image reader, and the DataLoaders.

Layout (see README "Dataset layout"):
    DATASET/train/<class>/*.jpg   required
    DATASET/val/<class>/...       required ("valid" and "validation" also accepted)
    DATASET/test/<class>/...      optional
The class list comes from train/ only, in natural order; val/ and test/ may lack a class but
may not add one. Every image is read to 3-channel RGB uint8, whatever it was on disk.
"""

from __future__ import annotations

import os
import re
import signal
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

import cv2
import numpy as np
import torch
from natsort import natsorted
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.errors import UsageError
from utils.files import VAL_SPLIT_NAMES, list_class_dirs, list_images, stoppable_thread_pool
from utils.stat_cache import StatCache, file_stat

Sample = tuple[str, int]  # (image path, class index)

# One size limit for every image that is decoded (training's pre-scan, evaluation, infer.py, the
# viewer), checked on the header before any pixel is decoded. It is Pillow's own refusal threshold
# (twice Image.MAX_IMAGE_PIXELS: 178,956,970 pixels, e.g. 13,377 x 13,377), which the pre-scan has
# always applied through Image.open; decoded to RGB such an image takes 537 MB.
MAX_IMAGE_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
MAX_FILE_BYTES = 8 * MAX_IMAGE_PIXELS  # 16-bit RGBA, uncompressed: no image file at the limit is larger
# Longer side / shorter side. Beyond this an image is a strip, not a picture: crop mode would keep
# under 1% of it and letterbox would shrink its short side to a couple of pixels.
MAX_ASPECT_RATIO = 100

cv2.setNumThreads(1)  # DataLoader workers give the parallelism; OpenCV's own pool would oversubscribe
# OpenCV prints "[ WARN ...]" / "[ERROR ...]" lines for corrupt files; read_rgb raises ImageReadError
# for them instead, and the scripts list those files with their reasons.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
# Pillow warns from Image.MAX_IMAGE_PIXELS up to the limit above; such images are accepted on purpose.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Pillow parses a JPEG's EXIF block when it opens the file (for the DPI) and warns when the block
# is broken, as many phone and editor files are; the pixels are fine and OpenCV reads the rotation.
warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)
# Pillow imports its common format plugins on the first Image.open. Done here, on the importing
# thread, it takes 15 ms; done by the first image of several decode threads at once (infer.py,
# the pre-scan), it held them all behind the import lock: 0.2 s before infer.py's first batch.
Image.preinit()

# Reduced-size JPEG decoding (read_rgb's `min_size`). MPO is the multi-picture JPEG many cameras write.
JPEG_FORMATS = ("JPEG", "MPO")
_REDUCED_READS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
REDUCED_DECODE_MARGIN = 2  # a reduced JPEG keeps at least this many times the size it is shrunk to


class ImageReadError(ValueError):
    """An image file that cannot be read or decoded, or is over the size limits above."""


# read_rgb's min_size: [H, W], or a function of the picture's (height, width) that returns it
MinSize = Optional[Union[Sequence[int], Callable[[int, int], Sequence[int]]]]
EXIF_ORIENTATION = 0x0112
TURNED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def read_rgb(path: str | os.PathLike, min_size: MinSize = None) -> np.ndarray:
    """Read any image file to an RGB uint8 array of shape (H, W, 3).

    The size in the header is checked first (`image_size_problem`), so an image over the limits is
    never decoded. OpenCV decodes JPEG about 3x faster than Pillow (bench/bench_data.py) and
    already applies EXIF rotation, drops alpha, expands gray/palette and scales 16-bit to 8-bit.
    Pillow is the fallback for the rare files OpenCV refuses. Reading the bytes with numpy keeps
    non-ASCII paths working on every OS (cv2.imread does not on Windows).

    `min_size` [H, W]: the caller shrinks the image to about this size anyway (the eval
    transform's `source_min_size`, a thumbnail's side), so a JPEG far larger is decoded at 1/2,
    1/4 or 1/8 of its size by libjpeg's DCT scaling (`jpeg_reduction`), which skips much of the
    decoding work: a 12 MP photo decodes and resizes 1.7-2.7x faster
    (bench/bench_reduced_decode.py). Without it (heat-map pictures, the viewer once zoomed in)
    every image is decoded at full size.

    `min_size` may also be a function of the JPEG's (height, width) as shown (EXIF orientation
    applied) that returns [H, W]: training's random crop draws its box from the header that way
    and asks for the size at which the box still keeps the output size
    (utils.transforms.RandomResizedCrop.read). It is called once per JPEG, never for other formats.
    """
    return read_rgb_reduced(path, min_size)[0]


def read_rgb_reduced(path: str | os.PathLike, min_size: MinSize = None) -> tuple[np.ndarray, int]:
    """read_rgb, and the factor the image was decoded smaller by (1, 2, 4 or 8): the viewer draws
    a reduced image that many times larger on screen, and decodes it in full when zoomed in."""
    try:
        with open(path, "rb") as file:
            problem = _file_size_problem(os.fstat(file.fileno()).st_size)
            reduction = 1
            if not problem:
                problem, reduction = _inspect_header(file, min_size=min_size)
            if problem:
                raise ImageReadError(f"{path}: {problem}")
            file.seek(0)
            data = np.fromfile(file, dtype=np.uint8)
    except OSError as error:
        raise ImageReadError(f"cannot read {path}: {error.strerror or error}") from None
    image = cv2.imdecode(data, _REDUCED_READS.get(reduction, cv2.IMREAD_COLOR))
    if image is not None:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image), reduction  # in place: no second copy
    return _read_rgb_with_pillow(path), 1


def jpeg_reduction(width: int, height: int, min_size: Sequence[int]) -> int:
    """The largest of 8, 4 and 2 that a JPEG of `width` x `height` may be decoded smaller by, for a
    caller that shrinks it to `min_size` [H, W] anyway; 1 when none may.

    Two conditions keep the result next to a full decode (tests/test_decoding.py measures it):
    the factor divides both sides, so the reduced image covers exactly the same region and the
    resize that follows lands on the same pixel grid (otherwise the centre crop can move half a
    pixel: up to 8 grey levels mean difference on natural images); and the reduced image keeps at
    least REDUCED_DECODE_MARGIN x `min_size`, so the usual antialiased resize still does the last
    step (at most about 1 grey level mean difference, less than re-saving the JPEG changes).
    """
    for factor in (8, 4, 2):
        if width % factor or height % factor:
            continue
        if (height // factor >= REDUCED_DECODE_MARGIN * min_size[0]
                and width // factor >= REDUCED_DECODE_MARGIN * min_size[1]):
            return factor
    return 1


def _file_size_problem(size: int) -> Optional[str]:
    if size == 0:
        return "empty file"
    if size > MAX_FILE_BYTES:
        return f"file of {size / 2**30:.1f} GiB, larger than any image within the {MAX_IMAGE_PIXELS:,}-pixel limit"
    return None


def image_size_problem(width: int, height: int) -> Optional[str]:
    """Why an image of this size is refused (pixel count, aspect ratio), or None."""
    if width * height > MAX_IMAGE_PIXELS:
        return (f"too large: {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{MAX_IMAGE_PIXELS:,} (shrink it first)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f"extreme aspect ratio: {width}x{height}, over {MAX_ASPECT_RATIO}:1 "
                "(crop or split it into pictures first)")
    return None


def _inspect_header(source: str | os.PathLike | BinaryIO, verify: bool = False,
                    min_size: MinSize = None) -> tuple[Optional[str], int]:
    """(why the file is refused, or None; the `jpeg_reduction` it may be decoded with, 1 unless
    `min_size` is given and the file is a JPEG).

    Reads only the header with Pillow (lazy: no pixels decoded) and checks the size; `verify`
    also checks the file's structure (Image.verify, still no full decode). An open file given as
    `source` stays open."""
    reduction = 1
    try:
        with Image.open(source) as image:
            problem = image_size_problem(*image.size)
            if verify and problem is None:
                image.verify()
            if min_size is not None and problem is None and image.format in JPEG_FORMATS:
                reduction = _reduction_for(image, min_size)
    except Image.DecompressionBombError as error:  # Pillow's own check at the same limit: no size given
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        count = f"{int(pixels.group(1)):,} pixels" if pixels else str(error)
        return f"too large: {count}, over the limit of {MAX_IMAGE_PIXELS:,} (shrink it first)", 1
    except UnidentifiedImageError:
        return "unreadable image (not an image format Pillow recognises)", 1
    except Exception as error:  # Pillow raises many types for bad files
        return f"unreadable image ({type(error).__name__}: {error})", 1
    return problem, reduction


def _reduction_for(image: Image.Image, min_size: MinSize) -> int:
    """The `jpeg_reduction` of an opened JPEG for read_rgb's `min_size`."""
    width, height = image.size
    if callable(min_size):  # it needs the picture as shown: OpenCV turns it by its EXIF orientation
        if image.getexif().get(EXIF_ORIENTATION, 1) in TURNED_ORIENTATIONS:
            width, height = height, width
        return jpeg_reduction(width, height, min_size(height, width))
    # a fixed size: the factor must hold either way round, and then the EXIF block need not be parsed
    return min(jpeg_reduction(width, height, min_size), jpeg_reduction(height, width, min_size))


def _read_rgb_with_pillow(path: str | os.PathLike) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):  # 16/32-bit integer gray: scale to 8 bits, not clip
                array = np.asarray(image, dtype=np.float64)
                peak = 65535.0 if array.max() > 255 else 255.0
                return np.repeat((array * (255.0 / peak)).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
            return np.asarray(image.convert("RGB"))
    except Exception as error:  # Pillow raises many types for bad files
        raise ImageReadError(f"cannot decode image {path}: {error}") from None


def check_image(path: str) -> Optional[str]:
    """The pre-scan's cheap check (header, size limits, structure; no full decode): the reason
    the file is left out, or None."""
    try:
        problem = _file_size_problem(os.path.getsize(path))
    except OSError as error:
        return f"cannot read ({error.strerror or error})"
    return problem or _inspect_header(path, verify=True)[0]


HEADER_CHECK_VERSION = 1  # part of every cached check: bump when check_image changes


def find_unreadable(paths: Sequence[str], threads: int = 8,
                    cache_path: Optional[str | os.PathLike] = None) -> dict[str, str]:
    """Pre-scan: map each file that fails `check_image` to the reason.

    With `cache_path` (train.py: LOG_DIR/.cache/image_hashes.sqlite) each verdict is kept by the
    file's path, mtime and size (utils.stat_cache), so a second run over unchanged files opens
    none of them; an edited or replaced file is checked again. A file that could not be opened
    at all is not cached (its permissions may change without its mtime)."""
    cache = StatCache.open(cache_path, "header_checks", ["reason"], HEADER_CHECK_VERSION,
                           what="header-check cache") if cache_path else None
    stats = [file_stat(path) for path in paths] if cache else [None] * len(paths)
    known = cache.lookup(paths, stats) if cache else [None] * len(paths)
    todo = [i for i, row in enumerate(known) if row is None]
    with stoppable_thread_pool(threads) as pool:
        checked = dict(zip(todo, pool.map(check_image, [paths[i] for i in todo])))
    if cache:
        cache.store([(paths[i], stats[i], (checked[i] or "",)) for i in todo
                     if stats[i] is not None and not (checked[i] or "").startswith("cannot read")])
        cache.close()
    reasons = [checked[i] if row is None else row[0] for i, row in enumerate(known)]
    return {path: reason for path, reason in zip(paths, reasons) if reason}


@dataclass
class DatasetScan:
    """What was found in a dataset tree: classes, samples per split, and files left out."""

    root: str
    class_names: list[str]
    splits: dict[str, list[Sample]]  # "train", "val" and maybe "test"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    missing_classes: dict[str, list[str]] = field(default_factory=dict)  # split -> classes without images
    split_on_the_fly: bool = False

    def counts(self, split: str) -> list[int]:
        per_class = Counter(label for _, label in self.splits.get(split, []))
        return [per_class.get(i, 0) for i in range(len(self.class_names))]

    def report(self) -> str:
        """A human-readable dataset report (printed and saved as dataset_report.txt)."""
        names = list(self.splits)
        width = max([len(c) for c in self.class_names] + [5])
        lines = [f"Dataset: {self.root}", f"Classes ({len(self.class_names)}): {', '.join(self.class_names)}"]
        if self.split_on_the_fly:
            lines.append("No train/val folders: split in memory (nothing copied).")
        lines.append("")
        lines.append(f"{'class':<{width}} " + " ".join(f"{n:>7}" for n in names))
        table = {n: self.counts(n) for n in names}
        for i, name in enumerate(self.class_names):
            lines.append(f"{name:<{width}} " + " ".join(f"{table[n][i]:>7}" for n in names))
        lines.append(f"{'total':<{width}} " + " ".join(f"{sum(table[n]):>7}" for n in names))
        train_counts = [c for c in table["train"] if c > 0]
        if train_counts:
            ratio = max(train_counts) / min(train_counts)
            note = " (imbalanced: consider --class_weights auto)" if ratio >= 3 else ""
            lines.append(f"Imbalance (largest/smallest train class): {ratio:.1f}x{note}")
        for split, missing in self.missing_classes.items():
            lines.append(f"Note: {split}/ has no images of: {', '.join(missing)}")
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} file(s):")
            lines.extend(f"  {path}: {reason}" for path, reason in self.skipped)
        return "\n".join(lines)


def _find_split_dir(root: Path, names: Sequence[str]) -> Optional[Path]:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _collect(split_dir: Path, class_names: list[str], split: str) -> tuple[list[Sample], list[str]]:
    """Samples of one split folder; refuses classes that train/ does not have."""
    present = list_class_dirs(split_dir)
    extra = [c for c in present if c not in class_names]
    if extra:
        raise UsageError(
            f"{split_dir} has class folder(s) not in train/: {', '.join(extra)} "
            "(the class list comes from train/; add them there or remove them here)"
        )
    samples: list[Sample] = []
    empty = []
    for index, name in enumerate(class_names):
        files = list_images(split_dir / name) if name in present else []
        if not files:
            empty.append(name)
        samples.extend((path, index) for path in files)
    return samples, empty


def scan_dataset(
    root: str | os.PathLike,
    val_ratio: float = 0.0,
    test_ratio: float = 0.0,
    seed: int = 0,
    check_files: bool = True,
    check_cache: Optional[str | os.PathLike] = None,
) -> DatasetScan:
    """Scan DATASET/{train,val[,test]}/<class>/ (or split an unsplit DATASET/<class>/ in memory);
    `check_files`: leave out the files that fail the header check (cached in `check_cache`, see
    find_unreadable)."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"--dataset_path {root} does not exist or is not a folder")
    train_dir = root / "train"
    val_dir = _find_split_dir(root, VAL_SPLIT_NAMES)
    if train_dir.is_dir():
        scan = _scan_split_tree(root, train_dir, val_dir)
    else:
        scan = _scan_unsplit_tree(root, val_ratio, test_ratio, seed)
    if check_files:
        _drop_unreadable(scan, check_cache)
    if not scan.splits["train"]:
        raise UsageError(f"no readable training images under {root}")
    return scan


def _scan_split_tree(root: Path, train_dir: Path, val_dir: Optional[Path]) -> DatasetScan:
    if val_dir is None:
        raise UsageError(
            f"{root} has train/ but no val/ (also accepted: valid/, validation/); "
            "create one, e.g. with split_dataset.py"
        )
    class_names = list_class_dirs(train_dir)
    if not class_names:
        raise UsageError(f"{train_dir} has no class folders (expected train/<class>/<images>)")
    train, empty_train = _collect(train_dir, class_names, "train")
    if empty_train:
        raise UsageError(f"empty class folder(s) in {train_dir}: {', '.join(empty_train)} (add images or remove them)")
    splits = {"train": train}
    missing = {}
    test_dir = root / "test"
    for split, folder in (("val", val_dir), ("test", test_dir if test_dir.is_dir() else None)):
        if folder is None:
            continue
        samples, empty = _collect(folder, class_names, split)
        if not samples:
            raise UsageError(f"{folder} holds no images")
        splits[split] = samples
        if empty:
            missing[split] = empty
    return DatasetScan(str(root), class_names, splits, missing_classes=missing)


def _scan_unsplit_tree(root: Path, val_ratio: float, test_ratio: float, seed: int) -> DatasetScan:
    class_names = list_class_dirs(root)
    if not class_names:
        raise UsageError(
            f"{root} has neither train/ and val/ folders nor class folders; expected "
            "DATASET/train/<class>/<images> and DATASET/val/<class>/<images>"
        )
    if val_ratio <= 0:
        raise UsageError(
            f"{root} has class folders but no train/ and val/: pass --val_ratio 0.2 to split it in "
            "memory, or make a split on disk with split_dataset.py"
        )
    from utils.split import plan_split  # the same planner split_dataset.py uses

    files = {name: list_images(root / name) for name in class_names}
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        raise UsageError(f"empty class folder(s) in {root}: {', '.join(empty)} (add images or remove them)")
    plan = plan_split(files, val_ratio=val_ratio, test_ratio=test_ratio, seed=seed)
    index = {name: i for i, name in enumerate(class_names)}
    splits: dict[str, list[Sample]] = {"train": [], "val": []}
    for item in plan.assignments:
        splits.setdefault(item.split, []).append((item.path, index[item.class_name]))
    for split in splits:
        splits[split] = natsorted(splits[split])
    if not splits["val"]:
        raise UsageError(f"--val_ratio {val_ratio} leaves no validation images in {root}")
    return DatasetScan(str(root), class_names, splits, split_on_the_fly=True)


def _drop_unreadable(scan: DatasetScan, cache_path: Optional[str | os.PathLike] = None) -> None:
    all_paths = [path for samples in scan.splits.values() for path, _ in samples]
    bad = find_unreadable(all_paths, cache_path=cache_path)
    if not bad:
        return
    scan.skipped.extend(sorted(bad.items()))
    for split, samples in scan.splits.items():
        scan.splits[split] = [s for s in samples if s[0] not in bad]


UNREADABLE = -1  # label an evaluation dataset gives an image it could not read (evaluate leaves it out)


class ImageDataset(torch.utils.data.Dataset):
    """(path, label) samples -> (uint8 CHW tensor after `transform`, label).

    Normalisation happens later, batched on the device (utils.transforms.normalize_batch).
    With a `cache` (utils.cache, `--cache ram|disk`) images come from it instead of the files.

    A file that fails to decode although it passed the scan (a truncated JPEG, a file changed
    since) is reported once per worker, then:
      training (`eval_size` None)  replaced by the next readable image of the same class (of
                                   another class only when its class has none left), so an
                                   epoch never dies on it and the class balance stays;
      evaluation (`eval_size` the (H, W) the transform gives)  returned as a blank image of that
                                   size labelled UNREADABLE: utils.engine.evaluate leaves it out
                                   of the metrics and counts it, so no image is counted twice.
    """

    def __init__(self, samples: Sequence[Sample], transform: Optional[Callable] = None, cache=None,
                 eval_size: Optional[Sequence[int]] = None):
        self.samples = list(samples)
        self.transform = transform
        self.cache = cache  # utils.cache.ImageCache: .get(index) -> prepared uint8 CHW tensor
        self.eval_size = list(eval_size) if eval_size is not None else None
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        """The image as a uint8 CHW tensor after the transform; from the cache if there is one."""
        if self.cache is not None:
            image = self.cache.get(index)
        elif hasattr(self.transform, "read"):  # training: the random crop picks the decode size
            return self.transform.read(self.samples[index][0], read_rgb)
        else:  # an eval transform names the smallest source it needs: large JPEGs are decoded smaller
            array = read_rgb(self.samples[index][0], min_size=getattr(self.transform, "source_min_size", None))
            image = torch.from_numpy(array).permute(2, 0, 1)
        return self.transform(image) if self.transform is not None else image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        evaluation = self.eval_size is not None
        for i in [index] if evaluation else self._substitutes(index):
            if i in self._bad:
                continue
            try:
                image = self.load(i)
            except ImageReadError as error:
                self._bad.add(i)
                what = "left out of the metrics" if evaluation else "replaced by another image (of its class first)"
                warnings.warn(f"unreadable image {what}: {error}", stacklevel=2)
                continue
            return image, self.samples[i][1]
        if evaluation:
            return torch.zeros(3, *self.eval_size, dtype=torch.uint8), UNREADABLE
        raise ImageReadError("no readable image left in the dataset")

    def _substitutes(self, index: int) -> Iterator[int]:
        """`index`, then the following samples of its class, then those of the other classes
        (a generator: the order is only worked out when `index` cannot be read)."""
        yield index
        label = self.samples[index][1]
        yield from (i for i in self._following(index) if self.samples[i][1] == label)  # usually the very next
        yield from (i for i in self._following(index) if self.samples[i][1] != label)

    def _following(self, index: int) -> Iterator[int]:
        """The sample indices after `index`, wrapping around, `index` itself excluded."""
        return ((index + step) % len(self.samples) for step in range(1, len(self.samples)))


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity where the OS tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(num_images: int) -> int:
    """A worker count that suits the data size and the machine's cores."""
    cores = available_cores()
    if num_images < 256 or cores < 2:
        return 0  # worker start-up costs more than it saves on tiny data
    return min(8, cores)


def stop_worker_like_ctrl_c(worker_id: int) -> None:
    """worker_init_fn: SIGTERM ends a DataLoader worker as Ctrl-C does, quietly (torch's worker loop).

    `timeout`, Slurm and systemd send SIGTERM to every process of a job at once. A worker killed by
    it made the main process raise "DataLoader worker ... is killed by signal: Terminated" in the
    middle of its own orderly stop: a traceback instead of the resume command.
    """
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def create_dataloader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    train: bool,
    workers: int,
    device: torch.device,
    generator: Optional[torch.Generator] = None,
    sampler: Optional[torch.utils.data.Sampler] = None,
    persistent: Optional[bool] = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader with the speed settings that fit the device (pinned memory only on CUDA).

    Workers stay alive between epochs (`persistent`, default: whenever there are workers) except
    under `torch.use_deterministic_algorithms` (train.py --deterministic): persistent workers seed
    their random augmentation once, not from the generator train.py reseeds each epoch, so a
    resumed run would see other augmentations than an unbroken one. A training loader never ends
    an epoch on a batch of one image (below).
    """
    if persistent is None:
        persistent = not torch.are_deterministic_algorithms_enabled()
    # A training batch of one image breaks BatchNorm at small input sizes ("Expected more than 1
    # value per channel"). An epoch that would end with one (this process's share under torchrun)
    # leaves that image out instead; shuffling leaves out another one each epoch.
    share = len(sampler) if sampler is not None else len(dataset)
    if train and share < 2:
        raise UsageError(f"training needs at least 2 images per process, this one has {share}; add images")
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=train and share > batch_size and share % batch_size == 1,
        generator=generator,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=persistent and workers > 0,
        worker_init_fn=stop_worker_like_ctrl_c,
    )
