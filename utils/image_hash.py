"""Fingerprints of image files (content hash, perceptual hash, size, format), cached on disk, and
groups of exact and near duplicates.

    groups = find_duplicate_groups(paths, cache_path="logs/.cache/image_hashes.sqlite")
    for group in groups:
        group.paths                   # two or more files that show the same picture
        group.members[0].kind         # "exact" (same bytes) or "perceptual" (close perceptual hash)
        group.spans(split_of)         # True when the members fall in more than one split: leakage

The content hash is utils.files.file_digest(path, "sha1") (what split_dataset.py writes to split.csv). The
perceptual hash is imagehash's pHash of the image as training reads it (utils.data.read_rgb):
64 bits that stay within a few bits under resizing and JPEG recompression and drift further
under cropping; two images are near duplicates when their hashes differ in at most
`max_distance` bits, a limit lowered for datasets whose unrelated images come that close
(`crowding_limit`: tiny digits, one object on a plain background). A fingerprint is cached by absolute path, mtime and size, so a second run
over the same files decodes nothing. Nothing here writes anywhere but the cache file.
"""

from __future__ import annotations

import math
import os
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, field
from typing import Optional

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.data import JPEG_FORMATS, ImageReadError, available_cores, read_rgb
from utils.files import file_digest, stoppable_thread_pool
from utils.stat_cache import StatCache, file_stat

FINGERPRINT_VERSION = 2  # part of every cache key: bump when the hash or the reader changes
DEFAULT_MAX_DISTANCE = 10  # bits of 64: resized/recompressed copies land at 0-6, 3% crops at 4-14, unrelated photos at 16+
HASH_SIDE = 128  # images are shrunk to this longest side before hashing: pHash looks at 32x32 anyway
PAIR_BLOCK_ELEMENTS = 1 << 22  # hashes compared per numpy step: bounds memory (32 MiB) for any dataset size
EMPTY_SHA1 = "da39a3ee5e6b4b0d3255bfef95601890afd80709"  # sha1 of zero bytes
KINDS = ("exact", "perceptual", "embedding")  # how strong a link is, strongest first
FALSE_PAIR_RATE = 0.002  # pHash pairs of unrelated images tolerated per image (see crowding_limit)
CROWDING_MIN_PAIRS = 30  # pairs needed at a distance to extrapolate the tail of unrelated pairs from it
HASH_CACHE_NAME = "image_hashes.sqlite"  # the cache file's name, in LOG_DIR/.cache/ by default (train.py, audit_dataset.py)


@dataclass(frozen=True)
class Fingerprint:
    """What one image file is: its bytes' hash, its perceptual hash and a few facts for reports."""

    path: str
    sha1: str = ""  # of the file's bytes; "" when the file cannot be read at all
    phash: str = ""  # 16 hex digits (64 bits); "" when the image cannot be decoded
    width: int = 0  # as training sees it (after EXIF rotation)
    height: int = 0
    grayscale: bool = False  # every pixel has R == G == B, whatever the file's colour mode
    format: str = ""  # what the bytes are (Pillow's name: JPEG, PNG, ...), not the extension
    mode: str = ""  # the file's own colour mode (Pillow: RGB, L, P, RGBA, I;16, CMYK ...)
    error: str = ""  # why the image cannot be used; "" when it can

    @property
    def readable(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class GroupMember:
    """One file of a duplicate group and its closest link to another member."""

    path: str
    kind: str  # "exact", "perceptual" or "embedding" (see KINDS)
    distance: float  # 0 for exact; differing bits (of 64) for perceptual; 1 - cosine for embedding


@dataclass
class DuplicateGroup:
    """Files that show the same picture (linked directly or through other members)."""

    members: list[GroupMember] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [member.path for member in self.members]

    def spans(self, value_of: Mapping[str, str]) -> bool:
        """Whether the members map to more than one value: {path: split} -> leakage between
        splits, {path: class} -> one picture with two labels. Unmapped paths are ignored."""
        return len({value_of[path] for path in self.paths if path in value_of}) > 1


@dataclass(frozen=True)
class Link:
    """Two fingerprints (indices) that show the same picture, and how sure that is."""

    first: int
    second: int
    kind: str
    distance: float


# ----------------------------------------------------------------------------- fingerprints


def compute_fingerprint(path: str) -> Fingerprint:
    """Hash and describe one file; a file that cannot be read gives a Fingerprint with `error`."""
    try:
        sha1 = file_digest(path, "sha1")
    except OSError as error:
        return Fingerprint(path, error=f"cannot read: {error.strerror or error}")
    if sha1 == EMPTY_SHA1:
        return Fingerprint(path, sha1, error="empty file")
    file_format, mode, header_size = _header(path)
    try:
        # the one reader: the hash sees what training sees; a large JPEG is decoded smaller, as the
        # hash shrinks it to HASH_SIDE anyway (a 12 MP photo: 1/8, several times faster)
        image = read_rgb(path, [HASH_SIDE, HASH_SIDE])
    except ImageReadError as error:
        return Fingerprint(path, sha1, format=file_format, mode=mode, error=str(error))
    if image.size == 0:
        return Fingerprint(path, sha1, format=file_format, mode=mode, error="image has no pixels")
    # the size training sees: the factor divides both sides, so the decoded sides times it are exact
    factor = max(1, max(header_size) // max(image.shape[:2])) if file_format in JPEG_FORMATS else 1
    height, width = (side * factor for side in image.shape[:2])
    grayscale = bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]))
    return Fingerprint(path, sha1, perceptual_hash(image), width, height, grayscale, file_format, mode)


def perceptual_hash(image: np.ndarray) -> str:
    """imagehash.phash of an RGB uint8 array as 16 hex digits."""
    import imagehash  # with scipy: imported when an image is first hashed (a cached run never does)

    height, width = image.shape[:2]
    scale = HASH_SIDE / max(height, width)
    if scale < 1:  # INTER_AREA shrinks a 12-megapixel photo far faster than Pillow's filter
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return str(imagehash.phash(Image.fromarray(image)))


def _header(path: str) -> tuple[str, str, tuple[int, int]]:
    """(format, colour mode, (width, height) as stored) from the file header alone; ("", "", (0, 0))
    when Pillow does not know it."""
    try:
        with Image.open(path) as image:
            return image.format or "", image.mode or "", image.size
    except Exception:  # Pillow raises many types for files it cannot identify
        return "", "", (0, 0)


def fingerprint_files(paths: Sequence[str], cache_path: Optional[str | os.PathLike] = None,
                      workers: Optional[int] = None, progress: bool = False) -> list[Fingerprint]:
    """Fingerprints of `paths` in order: from the cache where the file is unchanged, else computed
    (in `workers` threads: decoding and hashing release the GIL) and stored in the cache."""
    cache = FingerprintCache.open(cache_path) if cache_path else None
    stats = [file_stat(path) for path in paths]
    found: dict[int, Fingerprint] = {}
    if cache is not None:
        found = {i: fp for i, fp in enumerate(cache.lookup(paths, stats)) if fp is not None}
    missing = [i for i in range(len(paths)) if i not in found]
    threads = workers or min(8, available_cores())
    with stoppable_thread_pool(threads) as pool:
        computed = pool.map(compute_fingerprint, [paths[i] for i in missing])
        bar = tqdm(computed, total=len(missing), desc="hashing images", disable=not progress or not missing,
                   leave=False, file=sys.stderr, dynamic_ncols=True)
        for i, fingerprint in zip(missing, bar):
            found[i] = fingerprint
    if cache is not None:
        cache.store([(found[i], stats[i]) for i in missing if stats[i] is not None])
        cache.close()
    return [found[i] for i in range(len(paths))]


class FingerprintCache:
    """The fingerprints table of the cache file (utils.stat_cache): an entry counts only while the
    file's mtime and size and FINGERPRINT_VERSION still match."""

    _COLUMNS = ("path", "sha1", "phash", "width", "height", "grayscale", "format", "mode", "error")

    def __init__(self, table: StatCache):
        self.table = table

    @classmethod
    def open(cls, path: str | os.PathLike) -> FingerprintCache:
        return cls(StatCache.open(path, "fingerprints", cls._COLUMNS, FINGERPRINT_VERSION, what="hash cache"))

    def lookup(self, paths: Sequence[str], stats: Sequence[Optional[tuple[int, int]]]) -> list[Optional[Fingerprint]]:
        """The cached fingerprint of each path, or None where there is none or the file changed."""
        rows = self.table.lookup(paths, stats)
        return [None if row is None else Fingerprint(path, row[1], row[2], row[3], row[4], bool(row[5]), *row[6:])
                for path, row in zip(paths, rows)]

    def store(self, entries: Sequence[tuple[Fingerprint, tuple[int, int]]]) -> None:
        self.table.store([(fp.path, stat, astuple(fp)) for fp, stat in entries])

    def close(self) -> None:
        self.table.close()


# ----------------------------------------------------------------------------- pairs and groups


def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (numpy >= 2 has it built in; older numpy counts byte by byte)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[values.view(np.uint8)].reshape(*values.shape, 8).sum(-1, dtype=np.uint8)


def hash_pairs(hashes: np.ndarray, max_distance: int, progress: bool = False) -> tuple[list[Link], np.ndarray]:
    """All pairs (i < j) of uint64 hashes that differ in at most `max_distance` bits, and the
    histogram of all pairs' distances (65 counts: 0..64 bits; for `crowding_limit`).

    Every pair is compared (exact, no index to tune): blocks of rows against all hashes keep the
    memory bounded, and numpy does 5,000 images' 12.5 million pairs in about a second.
    """
    count = len(hashes)
    histogram = np.zeros(65, dtype=np.int64)
    links: list[Link] = []
    rows = max(1, PAIR_BLOCK_ELEMENTS // max(1, count))
    starts = range(0, count, rows)
    for start in tqdm(starts, desc="comparing hashes", disable=not progress or len(starts) < 2, leave=False,
                      file=sys.stderr, dynamic_ncols=True):
        block = popcount(hashes[start:start + rows, None] ^ hashes[None, :])
        upper = np.arange(start, start + len(block))[:, None] < np.arange(count)[None, :]  # each pair once
        histogram += np.bincount(block[upper], minlength=65)
        rows_found, columns = np.nonzero((block <= max_distance) & upper)
        links += [Link(int(start + i), int(j), "perceptual", float(block[i, j])) for i, j in zip(rows_found, columns)]
    return links, histogram


def expected_unrelated_pairs(histogram: np.ndarray, distance: int, reference: Optional[int] = None) -> float:
    """Pairs of unrelated images expected within `distance` bits, extrapolated from the pairs
    found a few bits above `reference` (default: `distance`), where duplicates are rare.

    On the left tail of the distances of unrelated images, the pairs per bit grow about
    exponentially; the rate is measured between the first distance above `reference` with
    CROWDING_MIN_PAIRS pairs and 4 bits further, and the curve is followed down. Further left the
    true tail falls faster, so the estimate errs high. 0 when hardly any pair comes near.
    """
    reference = distance if reference is None else reference
    within = np.cumsum(histogram)
    above = within - within[max(reference, 0)] if reference >= 0 else within  # pairs in (reference, d]
    low = next((d for d in range(reference + 1, 33) if above[d] >= CROWDING_MIN_PAIRS), None)
    if low is None:
        return 0.0
    high = min(low + 4, 64)
    if above[high] <= above[low]:
        return float(above[low])  # no growth to follow: assume as many again below
    growth = math.log(above[high] / above[low]) / (high - low)
    at_reference = above[low] / math.expm1(growth * (low - reference))  # A e^(g r) where A (e^(g low) - e^(g r)) = above[low]
    return float(at_reference * math.exp(-growth * (reference - distance)))


def crowding_limit(histogram: np.ndarray, max_distance: int, count: int) -> int:
    """The largest distance <= max_distance at which unrelated pairs are rare: below one per
    1/FALSE_PAIR_RATE images (at least one pair). Photos keep the default; sets of look-alike
    images (one object on a plain background, tiny digits) get a lower limit, or -1 (exact only)."""
    budget = max(1.0, FALSE_PAIR_RATE * count)
    distance = max_distance
    while distance >= 0 and expected_unrelated_pairs(histogram, distance, max_distance) > budget:
        distance -= 1
    return distance


@dataclass
class DuplicateSearch:
    """Groups and how they were found."""

    groups: list[DuplicateGroup]
    max_distance: int  # the pHash distance used: the requested one, or lower (see crowding_limit)
    requested_distance: int
    expected_false_pairs: float  # unrelated pairs estimated within the requested distance

    @property
    def lowered(self) -> bool:
        return self.max_distance < self.requested_distance


def hashes_as_uint64(fingerprints: Sequence[Fingerprint]) -> np.ndarray:
    return np.array([int(fp.phash, 16) for fp in fingerprints], dtype=np.uint64)


def search_duplicates(fingerprints: Sequence[Fingerprint], max_distance: int = DEFAULT_MAX_DISTANCE,
                      extra_links: Sequence[Link] = (), progress: bool = False) -> DuplicateSearch:
    """Duplicate groups among readable fingerprints: same sha1 (exact), pHash within
    `max_distance` bits (perceptual; lowered where unrelated images crowd that close), plus
    `extra_links` (indices into `fingerprints`, e.g. CNN embeddings). Groups are the connected
    parts of these links; biggest groups first."""
    readable = [i for i, fp in enumerate(fingerprints) if fp.readable]
    links = list(extra_links) + _exact_links(fingerprints, readable)
    first_of_content = list({fingerprints[i].sha1: i for i in reversed(readable)}.values())
    used, expected = max_distance, 0.0
    if max_distance >= 0 and first_of_content:  # identical bytes have identical hashes: compare each content once
        pairs, histogram = hash_pairs(hashes_as_uint64([fingerprints[i] for i in first_of_content]), max_distance,
                                      progress)
        used = crowding_limit(histogram, max_distance, len(first_of_content))
        expected = expected_unrelated_pairs(histogram, max_distance)
        links += [Link(first_of_content[p.first], first_of_content[p.second], p.kind, p.distance)
                  for p in pairs if p.distance <= used]
    groups = links_to_groups([fp.path for fp in fingerprints], links)
    return DuplicateSearch(groups, used, max_distance, expected)


def _exact_links(fingerprints: Sequence[Fingerprint], indices: Sequence[int]) -> list[Link]:
    by_content: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        by_content[fingerprints[i].sha1].append(i)
    return [Link(same[0], other, "exact", 0.0) for same in by_content.values() for other in same[1:]]


def links_to_groups(paths: Sequence[str], links: Sequence[Link]) -> list[DuplicateGroup]:
    """Connected parts of the links (union-find); each member keeps its strongest link."""
    parent = list(range(len(paths)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    best: dict[int, tuple[int, float]] = {}  # index -> (kind rank, distance) of its strongest link
    for link in links:
        parent[root(link.first)] = root(link.second)
        strength = (KINDS.index(link.kind), link.distance)
        for i in (link.first, link.second):
            best[i] = min(best.get(i, strength), strength)
    members: dict[int, list[int]] = defaultdict(list)
    for i in sorted(best):
        members[root(i)].append(i)
    groups = [DuplicateGroup([GroupMember(paths[i], KINDS[best[i][0]], best[i][1]) for i in indices])
              for indices in members.values()]
    return sorted(groups, key=lambda g: (-len(g.members), g.paths[0]))


def find_duplicate_groups(paths: Sequence[str], max_distance: int = DEFAULT_MAX_DISTANCE,
                          cache_path: Optional[str | os.PathLike] = None, workers: Optional[int] = None,
                          progress: bool = False) -> list[DuplicateGroup]:
    """Exact and near-duplicate groups among image files (the cheap check: no model needed).

    `max_distance` -1 finds exact copies only; where unrelated images come that close, a lower
    distance is used (`search_duplicates` says which). Unreadable files are left out (see
    `fingerprint_files` to list them).
    """
    fingerprints = fingerprint_files(paths, cache_path, workers, progress)
    return search_duplicates(fingerprints, max_distance, progress=progress).groups


def group_keys(groups: Sequence[DuplicateGroup]) -> dict[str, str]:
    """{path: "group-<n>"} for every grouped file: a key that files of one group share, for
    planners that keep equal keys in one split (utils.split.plan_split's `hashes`)."""
    return {path: f"group-{number}" for number, group in enumerate(groups, 1) for path in group.paths}
