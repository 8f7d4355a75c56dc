"""Finding image files: torch-free, so split_dataset.py starts fast."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from natsort import natsorted

from utils.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VAL_SPLIT_NAMES = ("val", "valid", "validation")  # accepted names of the validation folder


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str | os.PathLike, recursive: bool = True,
                unreadable: Optional[list[tuple[str, str]]] = None) -> list[str]:
    """Image files under `folder` (hidden files and folders skipped), in natural order.

    A folder that cannot be listed (permission denied, I/O error) is never skipped in silence:
    it raises a UsageError naming it and the OS error, or, when `unreadable` is a list, is
    appended there as (folder, reason) while the rest is still listed.
    """
    def cannot_list(error: OSError) -> None:
        where, reason = str(error.filename or folder), error.strerror or str(error)
        if unreadable is None:
            raise UsageError(f"cannot list folder {where}: {reason}")
        unreadable.append((where, reason))

    found = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=cannot_list):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames if is_image_file(f))
        if not recursive:
            break
    return natsorted(found)


def list_class_dirs(folder: str | os.PathLike) -> list[str]:
    """Names of the visible sub-folders of `folder`, in natural order; UsageError if it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return natsorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    except OSError as error:
        raise UsageError(f"cannot list folder {folder}: {error.strerror or error}") from None


def unique_path(folder: str | os.PathLike, name: str) -> str:
    """folder/name, or folder/<stem>-1<suffix>, -2, ...: the first that does not exist yet.

    Outputs that share a file name (two class folders both holding img_001.jpg, a second export
    into the same folder) then never overwrite each other or the user's files.
    """
    stem, suffix = os.path.splitext(name)
    candidate = os.path.join(folder, name)
    number = 0
    while os.path.exists(candidate):
        number += 1
        candidate = os.path.join(folder, f"{stem}-{number}{suffix}")
    return candidate


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (the one hashing loop of the project:
    split records, downloaded weights, export provenance, the audit's exact duplicates)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_dir(folder: str | os.PathLike, flag: str) -> None:
    """Refuse, in one line naming `flag` and the path, an output folder that cannot be made or written to.

    Catches, before any work is done: a link to a place that does not exist (a drive not mounted),
    a path that is or runs through a file, and a read-only or permission-denied folder. Creates nothing.
    """
    path = Path(folder)
    nearest = path  # the path itself, or the nearest part of it that exists

    def subject() -> str:
        return f"{flag} {folder}" if nearest == path else f"{flag} {folder}: {nearest}"

    try:
        while not nearest.exists():
            if nearest.is_symlink():
                raise UsageError(f"{subject()} is a link to {os.readlink(nearest)}, which does not exist "
                                 "(a drive that is not mounted?); fix the link or choose another folder")
            if nearest.parent == nearest:
                break
            nearest = nearest.parent
    except OSError as error:
        raise UsageError(f"{flag} {folder}: cannot reach {nearest}: {error.strerror or error}") from None
    if not nearest.is_dir():
        raise UsageError(f"{subject()} is a file, not a folder; choose a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UsageError(f"{subject()} is not writable (read-only or permission denied); "
                         "choose a folder you can write to")


@contextlib.contextmanager
def stoppable_thread_pool(threads: int) -> Iterator[ThreadPoolExecutor]:
    """A ThreadPoolExecutor for work over many files (reads, decoding and hashing release the GIL).

    When the block ends by an exception, Ctrl-C or SIGTERM included, the files not started yet are
    dropped and only the running ones finish. A plain `with ThreadPoolExecutor()` waits for every
    queued file: a stopped 22,000-image scan went on for 11 s before train.py could exit.
    """
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
