"""ImageNet weights for the torchvision models: find, download, verify, cache, load for fine-tuning.

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

train.py uses: resolve_pretrained, load_matching_weights, format_load_report, weights_recipe,
weights_build_kwargs, head_parameter_names, set_backbone_trainable, set_frozen_norm_eval.
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlsplit

import torch
import torch.nn as nn
import torchvision
from tqdm import tqdm

from models.registry import MODEL_CLASSES, check_model_name
from utils.checkpoint import load_checkpoint
from utils.cli import run_cli
from utils.errors import UsageError

PathLike = Union[str, os.PathLike]

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "download_pth"
MIRROR_ENV = "TORCH_CLS_WEIGHTS_MIRROR"
TIMEOUT_S = 30.0  # per connect and per read: a dead mirror fails in seconds instead of hanging
_CHUNK = 1 << 20
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.\w+$")
_DEFAULT_NAMES = ("", "DEFAULT", "IMAGENET")
_HEAD_NAMES = ("fc", "classifier", "heads", "head")  # torchvision's names for the classifier module
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


def weights_recipe(model_name: str, weights: Optional[str] = None) -> dict:
    """The preprocessing the weights were trained with, for the checkpoint's preprocess record.

    {"weights": enum name, "input_size": [H, W] (centre crop), "resize_size": shorter side before
    the crop, "crop_pct": input / resize (0.875 for 224 of 256), "mean": [...], "std": [...],
    "interpolation": "bilinear" | "bicubic"}
    """
    return weights_entry(model_name, weights).recipe


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
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    or None, "file": local path, "url": official URL or None, "sha256": hex, "recipe": weights_recipe
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


# --- loading into a model --------------------------------------------------------------------------


def _add_pre_hook(module: nn.Module, hook):
    if hasattr(module, "register_load_state_dict_pre_hook"):  # public from torch 2.5
        return module.register_load_state_dict_pre_hook(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


def _with_metadata(state_dict: Mapping, model: nn.Module) -> OrderedDict:
    state = OrderedDict(state_dict)
    metadata = getattr(state_dict, "_metadata", None)
    # Without versions some modules refuse to load (MNASNet); assume the file matches this code.
    state._metadata = metadata if metadata is not None else getattr(model.state_dict(), "_metadata", {})
    return state


def load_matching_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "the weights",
                          model_name: Optional[str] = None) -> dict:
    """Copy into `model` every tensor of `state_dict` whose name and shape fit; the rest stays as built.

    Goes through nn.Module.load_state_dict, so torchvision's per-module upgrades of old files (ViT
    MLP names, MNASNet v1 stems) still apply; tensors of another shape (the classifier head when the
    class count differs) are dropped just before their module loads.
    Returns {"loaded": model keys filled from the file, "reinitialised": model keys left as built,
    "unexpected": file keys not used (mismatched ones included), "mismatched": [[key, file shape,
    model shape], ...]}. "loaded" and "reinitialised" leave out integer buffers (BatchNorm's
    num_batches_tracked): counters, not weights, whose names every model with BatchNorm shares.
    Raises WeightsError, naming `source` and `model_name`, when no weight fits (another model's weights).
    """
    mismatched: list[list] = []

    def drop_misfits(module, state, prefix, *_):
        for name, tensor in chain(module._parameters.items(), module._buffers.items()):
            key = prefix + name
            if tensor is None or key not in state or nn.parameter.is_lazy(tensor):
                continue
            if state[key].shape != tensor.shape:
                mismatched.append([key, list(state[key].shape), list(tensor.shape)])
                del state[key]

    target = model_name or type(model).__name__
    handles = [_add_pre_hook(module, drop_misfits) for module in model.modules()]
    try:
        result = model.load_state_dict(_with_metadata(state_dict, model), strict=False)
    except (RuntimeError, ValueError) as error:
        raise WeightsError(f"{source} does not load into {target}: "
                           f"{str(error).strip().splitlines()[-1].strip()}") from None
    finally:
        for handle in handles:
            handle.remove()
    missing = set(result.missing_keys)
    own = model.state_dict()
    weights = [key for key, tensor in own.items() if tensor.is_floating_point() or tensor.is_complex()]
    loaded = [k for k in weights if k not in missing]
    if not loaded:
        counters = sum(1 for key in own if key not in missing and key not in weights)
        shared = f" (only {counters} BatchNorm step counters share their names)" if counters else ""
        raise WeightsError(f"none of the {len(state_dict)} tensors in {source} fit {target}{shared}: they are the "
                           f"weights of another model; use the --model they were made for, or weights of a {target}")
    return {"loaded": loaded, "reinitialised": [k for k in weights if k in missing],
            "unexpected": list(result.unexpected_keys) + [m[0] for m in mismatched], "mismatched": mismatched}


def _some(names: Sequence[str], limit: int) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def format_load_report(report: Mapping, limit: int = 6) -> str:
    """A few console lines: how much was loaded, what was re-initialised and why, what was unused."""
    loaded, reinit = report["loaded"], report["reinitialised"]
    lines = [f"pretrained: loaded {len(loaded)} of {len(loaded) + len(reinit)} tensors of the model"]
    if reinit:
        lines.append(f"  re-initialised {len(reinit)}: {_some(reinit, limit)}")
    mismatched = report.get("mismatched", [])
    if mismatched:
        shapes = [f"{key} {file} -> {model}" for key, file, model in mismatched]
        lines.append(f"  shape differs (file -> model): {_some(shapes, limit)}")
    mismatched_keys = {m[0] for m in mismatched}
    unused = [k for k in report["unexpected"] if k not in mismatched_keys]
    if unused:
        lines.append(f"  not in the model, unused: {len(unused)}: {_some(unused, limit)}")
    return "\n".join(lines)


# --- freezing the backbone -------------------------------------------------------------------------


def _classifier_layer(model: nn.Module) -> Optional[str]:
    """Name of the last layer with parameters inside the model's fc/classifier/heads/head module."""
    found = [(name.count("."), _HEAD_NAMES.index(name.rsplit(".", 1)[-1]), name, module)
             for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in _HEAD_NAMES]
    if not found:
        return None
    _, _, head_name, head = min(found, key=lambda item: item[:2])  # the outermost wins (ViT: heads)
    layers = [sub for sub, module in head.named_modules() if next(module.parameters(recurse=False), None) is not None]
    if not layers:
        return None
    return f"{head_name}.{layers[-1]}" if layers[-1] else head_name


def head_parameter_names(model: nn.Module, reinitialised: Iterable[str] = ()) -> list[str]:
    """Parameter names of the classifier head, the part --freeze_backbone leaves trainable.

    The head is the last layer of torchvision's fc / classifier / heads / head module (so VGG's
    hidden classifier layers count as backbone), plus every parameter left re-initialised by
    load_matching_weights (what did not fit, e.g. Inception's auxiliary classifiers).
    """
    params = dict(model.named_parameters())
    names = {key for key in reinitialised if key in params}
    layer = _classifier_layer(model)
    if layer is not None:
        names.update(key for key in params if key.startswith(layer + "."))
    if not names:
        raise WeightsError(f"cannot tell the classifier head of {type(model).__name__} (no fc, classifier, "
                           "heads or head module), so --freeze_backbone cannot be used with it")
    return sorted(names)


def set_backbone_trainable(model: nn.Module, trainable: bool, head_names: Iterable[str]) -> tuple[int, int]:
    """Set requires_grad of every parameter outside `head_names` (the head always trains).

    Returns (trainable, total) parameter counts for the console. Build the optimiser over all
    parameters: frozen ones get no gradient and are skipped, and --unfreeze_epoch needs no rebuild.
    """
    head = set(head_names)
    params = dict(model.named_parameters())
    unknown = head - params.keys()
    if unknown:
        raise ValueError(f"not parameters of the model: {sorted(unknown)[:3]}")
    for name, param in params.items():
        param.requires_grad_(trainable or name in head)
    return (sum(p.numel() for p in params.values() if p.requires_grad),
            sum(p.numel() for p in params.values()))


def set_frozen_norm_eval(model: nn.Module) -> int:
    """Put every BatchNorm whose parameters are all frozen in eval mode; return how many.

    requires_grad=False stops the optimiser, not BatchNorm's running statistics, which keep drifting
    towards the new data in train mode; a linear probe wants fixed features. Call after model.train().
    """
    count = 0
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            module.eval()
            count += 1
    return count


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
