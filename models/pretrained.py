"""ImageNet weights for the torchvision models: find, download, verify, cache, read.

    python -m models.pretrained --list                  # which models have weights, which are here
    python -m models.pretrained resnet50 mobilenet_v2   # download into models/download_pth/

URL, file name and hash come from torchvision's weights enums (`get_model_weights(name).DEFAULT`),
never from a hand-typed table. As in torch.hub, the file name carries the start of the file's
sha256 (`resnet18-f37072fd.pth`); a file is checked against it after every download and before
every use. All torchvision files have one; a file without one is used unverified, with a note.

Files live in models/download_pth/ next to this module (or --dir). A file already there, or in
torch's own cache (`$TORCH_HOME/hub/checkpoints`), is used without any network. A mirror
(--weights_mirror URL or $TORCH_CLS_WEIGHTS_MIRROR) replaces scheme and host of the official URL
and keeps its path.

train.py uses resolve_pretrained and weights_build_kwargs; fitting the weights into a model,
finding its head and freezing the backbone are models/finetune.py.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlsplit

import torch
import torchvision
from tqdm import tqdm

from models.registry import MODEL_CLASSES, check_model_name
from utils.checkpoint import load_checkpoint
from utils.cli import run_cli
from utils.errors import UsageError
from utils.files import file_digest

PathLike = Union[str, os.PathLike]

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "download_pth"
MIRROR_ENV = "TORCH_CLS_WEIGHTS_MIRROR"
TIMEOUT_S = 30.0  # per connect and per read: a dead mirror fails in seconds instead of hanging
_CHUNK = 1 << 20
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.\w+$")
_DEFAULT_NAMES = ("", "DEFAULT", "IMAGENET")
# Old DenseNet files name layers "norm.1"; torchvision renames them in its builder, not in the model.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
# torchvision builds these with transform_input=True when it loads ImageNet weights: the Google
# weights expect inputs in [-1, 1] and transform_input maps ImageNet-normalised input there.
_BUILD_KWARGS = {"googlenet": {"transform_input": True}, "inception_v3": {"transform_input": True}}


class WeightsError(UsageError):
    """Weights that cannot be found, fetched, verified or loaded; the message says what to do."""


class DownloadError(WeightsError):
    """The network could not deliver a file (unreachable, HTTP error, broken transfer)."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot download {url}: {reason}")
        self.url, self.reason = url, reason


class TruncatedDownload(DownloadError):
    """The transfer ended before Content-Length bytes arrived (worth one fresh retry)."""


@dataclass(frozen=True)
class WeightsEntry:
    """One published weights file of a torchvision model."""

    model: str
    weights: str  # enum member, e.g. "ResNet50_Weights.IMAGENET1K_V2"
    url: str
    file_name: str
    hash_prefix: Optional[str]
    size_mb: Optional[float]
    acc1: Optional[float]  # ImageNet-1K top-1, from torchvision's metadata
    recipe: dict


# --- which weights exist ---------------------------------------------------------------------------


def available_model_names() -> list[str]:
    """Every model name train.py accepts."""
    return list(MODEL_CLASSES)


def _weights_enum(model_name: str):
    try:
        enum = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError):  # a builder without a `weights` argument
        return None
    return enum if len(enum) else None


def models_with_weights() -> list[str]:
    """The models for which torchvision publishes ImageNet weights."""
    return [name for name in available_model_names() if _weights_enum(name) is not None]


def hash_prefix_from_name(file_name: str) -> Optional[str]:
    """The sha256 prefix torch.hub's convention puts in a file name, or None when there is none."""
    match = _HASH_IN_NAME.search(file_name)
    return match.group(1) if match else None


def _pick_member(enum, weights: Optional[str], model_name: str):
    wanted = (weights or "").strip().upper()
    if wanted in _DEFAULT_NAMES:
        return enum.DEFAULT
    for member in enum:
        if member.name == wanted:
            return member
    choices = ", ".join(["DEFAULT"] + [m.name for m in enum])
    raise WeightsError(
        f"no weights {weights!r} for {model_name}: choose one of {choices}, or give a path to a .pth file"
    )


def _recipe(member) -> dict:
    preset = member.transforms()  # torchvision's ImageClassification: resize, centre crop, normalise
    crop, resize = list(preset.crop_size), list(preset.resize_size)
    return {
        "weights": f"{type(member).__name__}.{member.name}",
        "input_size": crop * 2 if len(crop) == 1 else crop,
        "resize_size": resize[0] if len(resize) == 1 else resize,  # one int: the shorter side
        "crop_pct": round(crop[0] / resize[0], 4),  # the same recipe as a "resize to cover, crop" fraction
        "mean": list(preset.mean),
        "std": list(preset.std),
        "interpolation": preset.interpolation.value,
    }


def weights_entry(model_name: str, weights: Optional[str] = None) -> WeightsEntry:
    """URL, file, hash and preprocessing of `model_name`'s weights (None/"DEFAULT": the best ones)."""
    check_model_name(model_name)
    enum = _weights_enum(model_name)
    if enum is None:
        raise WeightsError(
            f"torchvision publishes no ImageNet weights for {model_name}: train it from scratch, "
            "or give --pretrained PATH to your own .pth file"
        )
    member = _pick_member(enum, weights, model_name)
    file_name = os.path.basename(urlsplit(member.url).path)
    return WeightsEntry(
        model=model_name,
        weights=f"{type(member).__name__}.{member.name}",
        url=member.url,
        file_name=file_name,
        hash_prefix=hash_prefix_from_name(file_name),
        size_mb=member.meta.get("_file_size"),
        acc1=member.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1"),
        recipe=_recipe(member),
    )


def weights_build_kwargs(model_name: str) -> dict:
    """Extra builder arguments torchvision itself uses with these weights ({} for most models)."""
    return dict(_BUILD_KWARGS.get(model_name, {}))


# --- where files come from -------------------------------------------------------------------------


def mirror_url(url: str, base: str) -> str:
    """`url` on mirror `base`: scheme and host replaced, path kept.

    mirror_url("https://download.pytorch.org/models/x.pth", "http://10.0.0.5:8000/pt")
    == "http://10.0.0.5:8000/pt/models/x.pth"; file:///srv/mirror works for a mounted folder.
    """
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.netloc):
        raise WeightsError(
            f"--weights_mirror {base!r} is not a base URL: give e.g. http://host:8000 or file:///srv/mirror"
        )
    return base.rstrip("/") + urlsplit(url).path


def mirror_from_env(flag: Optional[str] = None) -> Optional[str]:
    """The mirror to use: the --weights_mirror value, else $TORCH_CLS_WEIGHTS_MIRROR, else None."""
    value = (flag or os.environ.get(MIRROR_ENV) or "").strip()
    return value or None


def local_weights_path(file_name: str, weights_dir: PathLike = DEFAULT_WEIGHTS_DIR) -> Optional[Path]:
    """The file in `weights_dir`, else in torch's hub cache, else None."""
    for folder in (Path(weights_dir), Path(torch.hub.get_dir()) / "checkpoints"):
        if (folder / file_name).is_file():
            return folder / file_name
    return None


def sha256_file(path: PathLike) -> str:
    return file_digest(path, "sha256")


# --- download --------------------------------------------------------------------------------------


def _progress_bar(total: Optional[int], label: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)


def _open_url(url: str, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "pytorch-classification"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        raise DownloadError(url, f"the server answered HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DownloadError(url, str(error.reason)) from None
    except (OSError, http.client.HTTPException, ValueError) as error:  # timeouts, resets, bad URLs
        raise DownloadError(url, str(error) or type(error).__name__) from None


def _stream(url: str, response, out, label: str, progress: bool) -> tuple[str, int]:
    """Copy the response body to `out`; return (sha256, bytes received)."""
    expected = response.headers.get("Content-Length")
    expected = int(expected) if expected and expected.isdigit() else None
    digest, received = hashlib.sha256(), 0
    with _progress_bar(expected, label, progress) as bar:
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as error:  # reset or timeout mid-transfer
                raise TruncatedDownload(url, f"the transfer broke off after {received} bytes ({error})") from None
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if expected is not None and received != expected:
        raise TruncatedDownload(url, f"the transfer stopped after {received} of {expected} bytes")
    return digest.hexdigest(), received


def _check_digest(digest: str, hash_prefix: Optional[str], label: str, url: str) -> None:
    if hash_prefix is None:
        print(f"note: {label} has no sha256 prefix in its name, so it is not verified (sha256 {digest})",
              file=sys.stderr)
    elif not digest.startswith(hash_prefix.lower()):
        raise WeightsError(
            f"{label} from {url} has sha256 {digest[:16]}..., expected {hash_prefix}...: the file is "
            "damaged or not the official one (check the mirror); nothing was saved"
        )


def _download_once(url: str, dest: Path, hash_prefix: Optional[str], progress: bool, timeout: float) -> str:
    part = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:12]}.part")  # unique: parallel runs never clash
    try:
        with _open_url(url, timeout) as response, open(part, "xb") as out:
            digest, _ = _stream(url, response, out, dest.name, progress)
            out.flush()
            os.fsync(out.fileno())  # the rename below must never publish a half-written file
        _check_digest(digest, hash_prefix, dest.name, url)
        os.replace(part, dest)
        return digest
    except OSError as error:  # local side only: network errors arrive as DownloadError
        raise WeightsError(f"cannot write {part}: {error.strerror or error}") from None
    finally:
        part.unlink(missing_ok=True)


def download_file(url: str, dest: PathLike, hash_prefix: Optional[str] = None, progress: bool = True,
                  timeout: float = TIMEOUT_S) -> str:
    """Download `url` to `dest` atomically, check the sha256 prefix, return the full sha256.

    The body streams into a uniquely named `<dest>.<random>.part` beside `dest`, renamed only once
    complete and verified: an interruption, a broken transfer or a bad hash leaves no file under
    the final name and no part file. A truncated transfer is retried once from the start (no
    resume: not every mirror or proxy honours Range requests). hash_prefix=None: no check (note).
    """
    dest = Path(dest)
    for attempt in (1, 2):
        try:
            return _download_once(url, dest, hash_prefix, progress, timeout)
        except TruncatedDownload as error:
            if attempt == 2:
                raise
            print(f"{error.reason}; retrying once from the start", file=sys.stderr)
    raise AssertionError("unreachable")


def _offline_message(error: DownloadError, url: str, dest: Path) -> str:
    return (
        f"cannot download {dest.name} from {error.url} ({error.reason}). To work offline, fetch {url} "
        f"on a machine with network access and put it in {dest.parent}{os.sep} under that name; it is then "
        f"used without any network. A mirror that keeps the official path also works: --weights_mirror "
        f"URL or {MIRROR_ENV}=URL"
    )


def fetch_weights(url: str, weights_dir: PathLike = DEFAULT_WEIGHTS_DIR, hash_prefix: Optional[str] = None,
                  mirror: Optional[str] = None, progress: bool = True,
                  timeout: float = TIMEOUT_S) -> tuple[Path, str]:
    """(path, sha256) of the file at `url`: the local copy when there is one (no network), else downloaded.

    hash_prefix: expected start of the sha256 (None: taken from the file name, like torch.hub).
    mirror: base URL that replaces the official scheme and host (see mirror_url).
    A local file with the wrong hash is an error, not silently replaced: it may be the user's.
    """
    file_name = os.path.basename(urlsplit(url).path)
    hash_prefix = (hash_prefix or hash_prefix_from_name(file_name) or "").lower() or None
    local = local_weights_path(file_name, weights_dir)
    if local is not None:
        digest = sha256_file(local)
        if hash_prefix and not digest.startswith(hash_prefix):
            raise WeightsError(
                f"{local} has sha256 {digest[:16]}..., expected {hash_prefix}...: it is incomplete or not "
                f"the official file; delete it and run again, or fetch it again from {url}"
            )
        return local, digest
    dest = Path(weights_dir) / file_name
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WeightsError(f"cannot create the weights folder {dest.parent}: {error.strerror}") from None
    source = mirror_url(url, mirror) if mirror else url
    if progress:
        print(f"downloading {source} to {dest}", file=sys.stderr)
    try:
        return dest, download_file(source, dest, hash_prefix, progress, timeout)
    except DownloadError as error:
        raise WeightsError(_offline_message(error, url, dest)) from None


# --- reading a weights file ------------------------------------------------------------------------


def _clean_key(key: str) -> str:
    match = _DENSENET_OLD_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def load_state_dict_file(path: PathLike) -> OrderedDict:
    """The state_dict in a .pth file (bare, or inside a checkpoint), read by the project's one
    checkpoint reader (weights_only=True, wrapper prefixes stripped); old DenseNet key names renamed."""
    state = load_checkpoint(path)["state_dict"]
    renamed = OrderedDict((_clean_key(k), v) for k, v in state.items())
    if hasattr(state, "_metadata"):
        renamed._metadata = state._metadata
    return renamed


def _looks_like_path(spec: str) -> bool:
    return ("/" in spec or os.sep in spec or spec.startswith("~")
            or spec.lower().endswith((".pth", ".pt", ".ckpt", ".bin", ".tar")))


def resolve_pretrained(name_or_path: Optional[str], model_name: str,
                       weights_dir: PathLike = DEFAULT_WEIGHTS_DIR, mirror: Optional[str] = None,
                       progress: bool = True) -> tuple[OrderedDict, dict]:
    """The state_dict `--pretrained [VALUE]` asks for, and a record of where it came from.

    name_or_path: None, "" or "DEFAULT" (torchvision's best ImageNet weights for `model_name`), a
    variant name such as "IMAGENET1K_V1", or a path to a .pth file (state_dict or checkpoint).
    mirror: base URL; None falls back to $TORCH_CLS_WEIGHTS_MIRROR.
    info (JSON-friendly, for the checkpoint): {"source": "torchvision" | "file", "weights": enum name
    or None, "file": local path, "url": official URL or None, "sha256": hex, "recipe": the weights'
    or None for a user file}.
    """
    spec = (name_or_path or "").strip()
    path = Path(spec).expanduser()
    if spec and (path.exists() or _looks_like_path(spec)):
        if not path.is_file():
            raise WeightsError(f"--pretrained {spec}: no such file")
        info = {"source": "file", "weights": None, "file": str(path), "url": None,
                "sha256": sha256_file(path), "recipe": None}
        return load_state_dict_file(path), info
    entry = weights_entry(model_name, spec or None)
    local, digest = fetch_weights(entry.url, weights_dir, entry.hash_prefix, mirror_from_env(mirror), progress)
    info = {"source": "torchvision", "weights": entry.weights, "file": str(local), "url": entry.url,
            "sha256": digest, "recipe": entry.recipe}
    return load_state_dict_file(local), info


# --- command line ----------------------------------------------------------------------------------


def _status(file_name: str, weights_dir: PathLike) -> str:
    local = local_weights_path(file_name, weights_dir)
    if local is None:
        return "-"
    return "downloaded" if local.parent == Path(weights_dir) else "in torch cache"


def _shown(path: PathLike) -> str:
    """`path` relative to the working directory when it lies inside it (shorter to read)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def format_weights_table(weights_dir: PathLike = DEFAULT_WEIGHTS_DIR) -> str:
    """The --list table: each model's default weights, size, top-1, input size, and local status."""
    rows = [("model", "default weights", "size", "top-1", "input", "file")]
    have = 0
    for name in available_model_names():
        if _weights_enum(name) is None:
            rows.append((name, "(none published)", "", "", "", ""))
            continue
        entry = weights_entry(name)
        status = _status(entry.file_name, weights_dir)
        have += status != "-"
        rows.append((name, entry.weights.split(".")[-1], f"{entry.size_mb:.0f} MB" if entry.size_mb else "?",
                     f"{entry.acc1:.1f}" if entry.acc1 else "?", str(entry.recipe["input_size"][0]), status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"{len(rows) - 1} models, {have} with weights present locally; folder: {_shown(weights_dir)}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.pretrained",
                                     description="List, download and verify torchvision ImageNet weights.")
    parser.add_argument("models", nargs="*", metavar="MODEL", help="models to download, e.g. resnet50 mobilenet_v2")
    parser.add_argument("--list", action="store_true", help="show which models have weights and which are here")
    parser.add_argument("--dir", default=str(DEFAULT_WEIGHTS_DIR), help="weights folder (default: %(default)s)")
    parser.add_argument("--weights", default="DEFAULT", help="which published weights, e.g. IMAGENET1K_V1")
    parser.add_argument("--weights_mirror", metavar="URL", default=None,
                        help=f"mirror base URL replacing https://download.pytorch.org (default: ${MIRROR_ENV})")
    args = parser.parse_args(argv)
    if not args.list and not args.models:
        parser.error("name the models to download, or use --list")
    if args.list:
        print(format_weights_table(args.dir))
    entries = [weights_entry(name, args.weights) for name in args.models]  # every name checked first
    mirror = mirror_from_env(args.weights_mirror)
    for entry in entries:
        present = local_weights_path(entry.file_name, args.dir) is not None
        path, digest = fetch_weights(entry.url, args.dir, entry.hash_prefix, mirror)
        print(f"{entry.model}: {'already present' if present else 'downloaded'}, {path} "
              f"(sha256 {digest[:12]}..., {'verified' if entry.hash_prefix else 'not verified'})")


if __name__ == "__main__":
    run_cli(main)
