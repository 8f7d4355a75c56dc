"""What infer.py (and the UI) accept as images: files, folders, globs and .txt lists of paths.

    inputs = resolve_inputs(["photos/", "extra/*.jpg", "more.txt"])
    inputs.paths        # natural order inside each folder/glob, list order in a .txt, no duplicates
    inputs.single       # True for exactly one image file given by name: single-image mode
    find_labels(inputs, class_names)   # a labelled tree <root>/<class>/<images> -> class indices

Torch-free, like utils.files, so it is cheap to import and test.
"""

from __future__ import annotations

import argparse
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from natsort import natsorted

from utils.errors import UsageError
from utils.files import IMAGE_EXTENSIONS, is_image_file, list_images

LIST_SUFFIXES = (".txt",)  # an --image_path ending in this is a list of image paths, one per line
_GLOB_CHARS = ("*", "?", "[")


@dataclass
class ImageInputs:
    """The image files to predict, in output order, and where they came from."""

    paths: list[str]
    single: bool = False  # one image file named directly
    folder: Optional[str] = None  # set when the only input is one folder (it may be a labelled tree)
    sources: list[str] = field(default_factory=list)  # the --image_path values, as given
    unreadable_folders: list[tuple[str, str]] = field(default_factory=list)  # (folder, OS error): not searched


@dataclass
class Labels:
    """Ground truth taken from a labelled tree: <folder>/<class>/<images>."""

    indices: list[int]  # class index per path (same order as ImageInputs.paths)
    class_folders: list[str]  # the class folders found, natural order


def resolve_inputs(specs: Sequence[str]) -> ImageInputs:
    """Expand every --image_path value; a value that finds nothing is a UsageError naming it.

    Sub-folders that cannot be listed (permission denied...) are kept in `unreadable_folders`
    for the caller to report; the images found elsewhere are still predicted.
    """
    if not specs:
        raise UsageError("--image_path is required: an image, a folder, a glob such as 'photos/*.jpg', or a .txt list")
    paths: list[str] = []
    unreadable: list[tuple[str, str]] = []
    for spec in specs:
        paths.extend(_expand(spec, unreadable))
    unique = list(dict.fromkeys(paths))  # keeps the first occurrence: output order is input order
    only = specs[0] if len(specs) == 1 else None
    single = only is not None and os.path.isfile(only) and not _is_list_file(only)
    folder = only if only is not None and os.path.isdir(only) else None
    return ImageInputs(unique, single=single, folder=folder, sources=list(specs), unreadable_folders=unreadable)


def _expand(spec: str, unreadable: list[tuple[str, str]]) -> list[str]:
    if os.path.isdir(spec):
        before = len(unreadable)
        found = list_images(spec, unreadable=unreadable)
        if not found and len(unreadable) > before:
            where, reason = unreadable[before]
            raise UsageError(f"--image_path {spec}: cannot list folder {where}: {reason}")
        if not found:
            raise UsageError(f"--image_path {spec} holds no image files ({' '.join(IMAGE_EXTENSIONS)}), "
                             "also searched in sub-folders")
        return found
    if os.path.isfile(spec):
        return read_list_file(spec) if _is_list_file(spec) else [spec]
    if any(char in spec for char in _GLOB_CHARS):
        return _expand_glob(spec, unreadable)
    raise UsageError(f"--image_path {spec} does not exist")


def _expand_glob(pattern: str, unreadable: list[tuple[str, str]]) -> list[str]:
    found: list[str] = []
    for match in natsorted(glob.glob(pattern, recursive=True)):
        if os.path.isdir(match):
            found.extend(list_images(match, unreadable=unreadable))
        elif is_image_file(match):
            found.append(match)
    if not found:
        raise UsageError(f"--image_path {pattern!r} matches no image files")
    return found


def read_list_file(path: str) -> list[str]:
    """One image path per line; blank lines and lines starting with # are skipped.

    A relative path is taken relative to the list file's folder, or to the current folder when
    it is not found there. Paths that exist nowhere are kept: they are reported as unreadable
    with the rest of the results, like a corrupt image.
    """
    try:
        with open(path, encoding="utf-8-sig") as file:
            lines = [line.strip() for line in file]
    except UnicodeDecodeError:
        raise UsageError(f"--image_path {path} is not a UTF-8 text file of image paths") from None
    except OSError as error:
        raise UsageError(f"--image_path {path} cannot be read: {error.strerror or error}") from None
    entries = [line for line in lines if line and not line.startswith("#")]
    if not entries:
        raise UsageError(f"--image_path {path} lists no image paths (one path per line expected)")
    base = os.path.dirname(path)
    return [_resolve_listed(entry, base) for entry in entries]


def _resolve_listed(entry: str, base: str) -> str:
    if os.path.isabs(entry):
        return entry
    beside_list = os.path.join(base, entry)
    return beside_list if os.path.exists(beside_list) or not os.path.exists(entry) else entry


def _is_list_file(path: str) -> bool:
    return path.lower().endswith(LIST_SUFFIXES)


def find_labels(inputs: ImageInputs, class_names: Sequence[str]) -> tuple[Optional[Labels], Optional[str]]:
    """Ground truth when the input is one folder laid out as <class>/<images> with known classes.

    Returns (labels, None), or (None, why not) where the folder looks like an attempt at a
    labelled tree, or (None, None) where it does not look like one at all.
    """
    if inputs.folder is None:
        return None, None
    index = {name: i for i, name in enumerate(class_names)}
    tops = [_top_folder(path, inputs.folder) for path in inputs.paths]
    folders = natsorted({top for top in tops if top is not None})
    known = [name for name in folders if name in index]
    if not known:
        return None, None
    unknown = [name for name in folders if name not in index]
    if unknown:
        return None, (f"not evaluated as a labelled tree: folder(s) {', '.join(unknown[:10])} in {inputs.folder} "
                      "are not classes of the checkpoint")
    loose = sum(top is None for top in tops)
    if loose:
        return None, (f"not evaluated as a labelled tree: {loose} image(s) lie directly in {inputs.folder}, "
                      "outside the class folders")
    return Labels([index[top] for top in tops], folders), None  # type: ignore[index]


def _top_folder(path: str, root: str) -> Optional[str]:
    """The first folder of `path` below `root`, or None for a file directly in `root`."""
    parts = os.path.relpath(path, root).split(os.sep)
    return parts[0] if len(parts) > 1 else None


def add_bare_state_dict_args(parser: argparse.ArgumentParser) -> None:
    """--model, --categories, --input_shape: what a bare state_dict (another template's .pth) lacks;
    for every script that reads a checkpoint (infer.py, export.py, runui.py)."""
    bare = parser.add_argument_group("bare state_dict only (a train.py checkpoint already holds these)")
    bare.add_argument("--model", default=None, help="registry model name, e.g. resnet18")
    bare.add_argument("--categories", nargs="+", default=None, metavar="NAME",
                      help="class names in output order, space- or comma-separated: daisy dandelion / daisy,dandelion")
    bare.add_argument("--input_shape", "--input-shape", type=int, nargs="+", default=None, metavar="SIZE",
                      help="model input H [W] of a bare state_dict; default 224")
