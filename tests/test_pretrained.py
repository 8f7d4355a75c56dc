"""models/pretrained.py: weights lookup, download/verify/cache through a mirror, loading for fine-tuning.

Every download goes to a local HTTP server on 127.0.0.1 through the mirror option; a guard fails
any test that tries to open another host, so nothing here can reach a real hub.
"""

from __future__ import annotations

import hashlib
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
import torchvision

from models import pretrained
from models.finetune import (
    format_load_report,
    head_parameter_names,
    load_matching_weights,
    set_backbone_trainable,
    set_frozen_norm_eval,
)
from models.pretrained import (
    MIRROR_ENV,
    WeightsEntry,
    WeightsError,
    download_file,
    fetch_weights,
    mirror_from_env,
    mirror_url,
    resolve_pretrained,
    weights_entry,
)
from utils.cli import run_cli
from utils.errors import UsageError

OFFICIAL = "https://download.pytorch.org/models"


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No mirror from the environment, an empty torch cache, and no host but 127.0.0.1."""
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    real_open = pretrained._open_url

    def local_only(url, timeout):
        assert urlsplit(url).hostname == "127.0.0.1", f"test tried to reach {url}"
        return real_open(url, timeout)

    monkeypatch.setattr(pretrained, "_open_url", local_only)


class Mirror:
    """A tiny HTTP server over a folder; can cut the first N bodies short and counts requests."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        self.truncate = 0
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                mirror.requests.append(self.path)
                path = mirror.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mirror.truncate > 0:
                    mirror.truncate -= 1
                    body = body[: len(body) // 2]  # then the connection closes: a truncated transfer
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def publish(self, name: str = "tiny", data: bytes | None = None, prefix: str | None = None) -> tuple[str, str]:
        """Serve a .pth under /models/<name>-<sha256 prefix>.pth; return (official URL, sha256)."""
        if data is None:
            buffer = io.BytesIO()
            torch.save({"w": torch.arange(6.0), "b": torch.ones(2)}, buffer)
            data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        file_name = f"{name}-{prefix or digest[:8]}.pth" if prefix != "" else f"{name}.pth"
        (self.root / "models").mkdir(parents=True, exist_ok=True)
        (self.root / "models" / file_name).write_bytes(data)
        return f"{OFFICIAL}/{file_name}", digest


@pytest.fixture
def mirror(tmp_path):
    server = Mirror(tmp_path / "served")
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def closed_url():
    """A 127.0.0.1 URL where nothing listens: the offline case, refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- torchvision's tables ----------------------------------------------------------------------------


def test_resnet18_entry_comes_from_torchvision_enum():
    entry = weights_entry("resnet18")
    official = torchvision.models.ResNet18_Weights.DEFAULT
    assert entry.url == official.url
    assert entry.file_name == official.url.rsplit("/", 1)[1] == "resnet18-f37072fd.pth"
    assert entry.hash_prefix == "f37072fd"
    assert entry.weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert entry.recipe == {"weights": "ResNet18_Weights.IMAGENET1K_V1", "input_size": [224, 224],
                            "resize_size": 256, "crop_pct": 0.875, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                            "interpolation": "bilinear"}


def test_every_weighted_model_has_an_entry_and_recipe():
    names = pretrained.models_with_weights()
    assert set(names) <= set(pretrained.available_model_names()) and "resnet50" in names
    for name in names:
        entry = weights_entry(name)
        assert entry.url.startswith(OFFICIAL + "/") and entry.file_name.endswith(".pth")
        assert len(entry.recipe["input_size"]) == 2 and len(entry.recipe["mean"]) == 3
    assert weights_entry("vit_h_14").recipe["input_size"] == [518, 518]


def test_variant_names_and_errors():
    assert weights_entry("resnet50", "imagenet1k_v1").weights == "ResNet50_Weights.IMAGENET1K_V1"
    assert weights_entry("resnet50", "DEFAULT").weights == "ResNet50_Weights.IMAGENET1K_V2"
    with pytest.raises(WeightsError, match="choose one of DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"):
        weights_entry("resnet50", "V3")
    with pytest.raises(UsageError, match="Did you mean: resnet50"):
        weights_entry("resnet5O")
    assert pretrained.weights_build_kwargs("googlenet") == {"transform_input": True}
    assert pretrained.weights_build_kwargs("resnet18") == {}


def test_hash_prefix_from_name():
    assert pretrained.hash_prefix_from_name("efficientnet_b7_lukemelas-c5b4e57e.pth") == "c5b4e57e"
    assert pretrained.hash_prefix_from_name("mnasnet0.5_top1_67.823-3ffadce67e.pth") == "3ffadce67e"
    assert pretrained.hash_prefix_from_name("my-weights.pth") is None


# --- mirror ------------------------------------------------------------------------------------------


def test_mirror_url_keeps_the_path(monkeypatch):
    url = f"{OFFICIAL}/x-1234abcd.pth"
    assert mirror_url(url, "http://10.0.0.5:8000") == "http://10.0.0.5:8000/models/x-1234abcd.pth"
    assert mirror_url(url, "https://m.example/pt/") == "https://m.example/pt/models/x-1234abcd.pth"
    assert mirror_url(url, "file:///srv/mirror") == "file:///srv/mirror/models/x-1234abcd.pth"
    with pytest.raises(WeightsError, match="not a base URL"):
        mirror_url(url, "10.0.0.5:8000")
    assert mirror_from_env(None) is None
    monkeypatch.setenv(MIRROR_ENV, "http://env-mirror")
    assert mirror_from_env(None) == "http://env-mirror"
    assert mirror_from_env("http://flag-mirror") == "http://flag-mirror"


# --- download, verify, cache -------------------------------------------------------------------------


def test_download_verifies_and_saves_atomically(mirror, tmp_path):
    url, digest = mirror.publish()
    folder = tmp_path / "weights"
    path, got = fetch_weights(url, folder, mirror=mirror.url, progress=False)
    assert got == digest and hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert listing(folder) == [path.name]  # no .part file left
    assert mirror.requests == [urlsplit(url).path]
    assert torch.load(path, weights_only=True)["w"].tolist() == [0, 1, 2, 3, 4, 5]


def test_truncated_transfer_is_retried_once_from_scratch(mirror, tmp_path, capsys):
    url, digest = mirror.publish()
    mirror.truncate = 1
    path, got = fetch_weights(url, tmp_path / "w", mirror=mirror.url, progress=False)
    assert got == digest and len(mirror.requests) == 2
    assert "retrying once" in capsys.readouterr().err
    assert listing(tmp_path / "w") == [path.name]


def test_truncated_twice_is_an_error_and_leaves_nothing(mirror, tmp_path):
    url, _ = mirror.publish()
    mirror.truncate = 2
    with pytest.raises(WeightsError, match="stopped after .* bytes"):
        fetch_weights(url, tmp_path / "w", mirror=mirror.url, progress=False)
    assert len(mirror.requests) == 2 and listing(tmp_path / "w") == []


def test_hash_mismatch_is_a_clear_error_and_leaves_nothing(mirror, tmp_path):
    url, digest = mirror.publish(prefix="deadbeef")
    with pytest.raises(WeightsError, match=f"sha256 {digest[:16]}.*expected deadbeef.*nothing was saved"):
        fetch_weights(url, tmp_path / "w", mirror=mirror.url, progress=False)
    assert listing(tmp_path / "w") == []


def test_explicit_hash_is_checked(mirror, tmp_path):
    url, digest = mirror.publish(prefix="")  # no prefix in the name: the caller gives it
    source = mirror_url(url, mirror.url)
    folder = tmp_path / "d"
    folder.mkdir()
    assert download_file(source, folder / "a.pth", digest[:10], progress=False) == digest
    with pytest.raises(WeightsError, match="expected 0000"):
        download_file(source, folder / "b.pth", "0000", progress=False)
    assert listing(folder) == ["a.pth"]


def test_name_without_hash_is_saved_with_a_note(mirror, tmp_path, capsys):
    url, digest = mirror.publish(prefix="")
    path, got = fetch_weights(url, tmp_path / "w", mirror=mirror.url, progress=False)
    assert got == digest and path.name == "tiny.pth"
    assert "not verified" in capsys.readouterr().err


def test_interrupted_download_leaves_nothing(mirror, tmp_path, monkeypatch):
    class InterruptedBar:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "_progress_bar", lambda *args: InterruptedBar())
    url, _ = mirror.publish()
    with pytest.raises(KeyboardInterrupt):
        fetch_weights(url, tmp_path / "w", mirror=mirror.url, progress=False)
    assert listing(tmp_path / "w") == []


def test_http_error_from_mirror_names_the_status(mirror, tmp_path):
    with pytest.raises(WeightsError, match="HTTP 404"):
        fetch_weights(f"{OFFICIAL}/absent-12345678.pth", tmp_path / "w", mirror=mirror.url, progress=False)


def test_offline_with_file_present_touches_no_network(mirror, tmp_path):
    url, digest = mirror.publish()
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / url.rsplit("/", 1)[1]).write_bytes((mirror.root / "models" / url.rsplit("/", 1)[1]).read_bytes())
    path, got = fetch_weights(url, folder, mirror=mirror.url, progress=False)
    assert got == digest and path.parent == folder
    assert mirror.requests == []


def test_file_in_torch_cache_is_used_without_network(mirror, tmp_path):
    url, digest = mirror.publish()
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    name = url.rsplit("/", 1)[1]
    (cache / name).write_bytes((mirror.root / "models" / name).read_bytes())
    path, got = fetch_weights(url, tmp_path / "w", mirror=mirror.url, progress=False)
    assert path == cache / name and got == digest and mirror.requests == []


def test_offline_without_file_says_what_to_fetch_and_where(tmp_path, closed_url):
    url = f"{OFFICIAL}/tiny-0123abcd.pth"
    folder = tmp_path / "w"
    with pytest.raises(WeightsError) as caught:
        fetch_weights(url, folder, mirror=closed_url, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert f"fetch {url}" in message and f"put it in {folder}" in message and "tiny-0123abcd.pth" in message
    assert listing(folder) == []


def test_local_file_with_wrong_hash_is_reported_not_replaced(tmp_path, closed_url):
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "tiny-0123abcd.pth").write_bytes(b"half a file")
    with pytest.raises(WeightsError, match="delete it and run again"):
        fetch_weights(f"{OFFICIAL}/tiny-0123abcd.pth", folder, mirror=closed_url, progress=False)
    assert (folder / "tiny-0123abcd.pth").read_bytes() == b"half a file"


# --- resolve_pretrained ------------------------------------------------------------------------------


def tiny_entry(url: str) -> WeightsEntry:
    name = url.rsplit("/", 1)[1]
    return WeightsEntry(model="resnet18", weights="Tiny_Weights.V1", url=url, file_name=name,
                        hash_prefix=pretrained.hash_prefix_from_name(name), size_mb=None, acc1=None,
                        recipe={"input_size": [224, 224]})


def test_resolve_official_weights_through_env_mirror(mirror, tmp_path, monkeypatch):
    url, digest = mirror.publish()
    monkeypatch.setattr(pretrained, "weights_entry", lambda model, weights=None: tiny_entry(url))
    monkeypatch.setenv(MIRROR_ENV, mirror.url)
    state, info = resolve_pretrained("", "resnet18", tmp_path / "w", progress=False)
    assert sorted(state) == ["b", "w"]
    assert info == {"source": "torchvision", "weights": "Tiny_Weights.V1", "file": str(tmp_path / "w" / url.rsplit("/", 1)[1]),
                    "url": url, "sha256": digest, "recipe": {"input_size": [224, 224]}}


def test_resolve_user_checkpoint_strips_wrapper_prefixes(tmp_path):
    path = tmp_path / "best.pth"
    torch.save({"epoch": 3, "state_dict": {"module.fc.weight": torch.ones(2, 2)}, "classes": ["a", "b"]}, path)
    state, info = resolve_pretrained(str(path), "resnet18")
    assert list(state) == ["fc.weight"]
    assert info["source"] == "file" and info["recipe"] is None
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_resolve_user_file_errors(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        resolve_pretrained(str(tmp_path / "missing.pth"), "resnet18")
    (tmp_path / "broken.pth").write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="not a readable PyTorch checkpoint"):
        resolve_pretrained(str(tmp_path / "broken.pth"), "resnet18")
    torch.save({"state_dict": {"w": torch.ones(1)}, "opt": torch.optim.SGD}, tmp_path / "unsafe.pth")
    with pytest.raises(UsageError, match="weights_only"):
        resolve_pretrained(str(tmp_path / "unsafe.pth"), "resnet18")
    torch.save({"epoch": 1}, tmp_path / "empty.pth")
    with pytest.raises(UsageError, match="neither a pytorch-classification checkpoint nor a state_dict"):
        resolve_pretrained(str(tmp_path / "empty.pth"), "resnet18")


def test_key_normalisation(tmp_path):
    state = torch.nn.Module().state_dict()
    state.update({"module._orig_mod.features.denseblock1.denselayer1.norm.1.weight": torch.ones(1)})
    state._metadata = {"module": {"version": 2}, "module._orig_mod.features": {"version": 1}}
    torch.save(state, tmp_path / "old.pth")
    cleaned = pretrained.load_state_dict_file(tmp_path / "old.pth")
    assert list(cleaned) == ["features.denseblock1.denselayer1.norm1.weight"]
    assert dict(cleaned._metadata) == {"": {"version": 2}, "features": {"version": 1}}


# --- loading into a model ----------------------------------------------------------------------------


def test_fine_tune_keeps_backbone_and_renews_head(tmp_path):
    """5-class weights loaded into a 3-class model: backbone identical, head as freshly built."""
    source = torchvision.models.resnet18(num_classes=5)
    torch.save({"epoch": 2, "state_dict": source.state_dict()}, tmp_path / "five.pth")
    torch.manual_seed(0)
    target = torchvision.models.resnet18(num_classes=3)
    fresh_head = {k: v.clone() for k, v in target.fc.state_dict().items()}

    state, _ = resolve_pretrained(str(tmp_path / "five.pth"), "resnet18")
    report = load_matching_weights(target, state)

    assert report["reinitialised"] == ["fc.weight", "fc.bias"]
    assert sorted(report["unexpected"]) == ["fc.bias", "fc.weight"]
    for key, value in target.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, source.state_dict()[key]), key
    assert all(torch.equal(target.fc.state_dict()[k], v) for k, v in fresh_head.items())
    assert target.fc.weight.shape == (3, 512)
    text = format_load_report(report)
    assert "loaded 100 of 102" in text  # BatchNorm counters not counted and "fc.weight [5, 512] -> [3, 512]" in text


def test_module_upgrades_still_apply():
    """Old ViT MLP key names are renamed by torchvision's own hook, which our filter must not skip."""
    def tiny_vit(classes):
        return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                    hidden_dim=8, mlp_dim=16, num_classes=classes)

    state = tiny_vit(5).state_dict()
    mlp = "encoder.layers.encoder_layer_0.mlp"
    for new, old in (("0", "linear_1"), ("3", "linear_2")):
        for kind in ("weight", "bias"):
            state[f"{mlp}.{old}.{kind}"] = state.pop(f"{mlp}.{new}.{kind}")
    state._metadata[mlp]["version"] = 1
    target = tiny_vit(3)
    report = load_matching_weights(target, state)
    assert torch.equal(target.state_dict()[f"{mlp}.0.weight"], state[f"{mlp}.linear_1.weight"])
    assert report["reinitialised"] == ["heads.head.weight", "heads.head.bias"]


@pytest.mark.parametrize("keep_metadata", [True, False])
def test_mnasnet_loads_with_or_without_version_metadata(keep_metadata):
    state = torchvision.models.mnasnet0_5(num_classes=5).state_dict()
    report = load_matching_weights(torchvision.models.mnasnet0_5(num_classes=3),
                                   state if keep_metadata else dict(state))
    assert report["reinitialised"] == ["classifier.1.weight", "classifier.1.bias"]


def test_weights_of_another_model_are_refused():
    with pytest.raises(WeightsError, match="another model"):
        load_matching_weights(torchvision.models.squeezenet1_1(), {"nothing.weight": torch.ones(1)})


def test_shared_batchnorm_counters_do_not_make_weights_fit():
    """mobilenet_v3_small into resnet18: only the num_batches_tracked counters share names."""
    state = torchvision.models.mobilenet_v3_small().state_dict()
    with pytest.raises(WeightsError, match=r"in mobilenet\.pth fit resnet18 \(only \d+ BatchNorm step counters"):
        load_matching_weights(torchvision.models.resnet18(), state, "mobilenet.pth", "resnet18")


# --- freezing ----------------------------------------------------------------------------------------


def test_head_parameter_names_follow_torchvision_naming():
    assert head_parameter_names(torchvision.models.resnet18()) == ["fc.bias", "fc.weight"]
    assert head_parameter_names(torchvision.models.squeezenet1_1()) == ["classifier.1.bias", "classifier.1.weight"]

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torchvision.models.mobilenet_v3_small()

    assert head_parameter_names(Wrapped()) == ["backbone.classifier.3.bias", "backbone.classifier.3.weight"]
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert head_parameter_names(plain, ["0.weight", "0.bias"]) == ["0.bias", "0.weight"]
    with pytest.raises(WeightsError, match="freeze_backbone"):
        head_parameter_names(plain)


def test_freeze_then_unfreeze_backbone():
    model = torchvision.models.resnet18(num_classes=3)
    head = head_parameter_names(model)
    trainable, total = set_backbone_trainable(model, False, head)
    assert trainable == 512 * 3 + 3 and total == sum(p.numel() for p in model.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    model.train()
    assert set_frozen_norm_eval(model) == 20 and not model.bn1.training and model.fc.training
    trainable, total = set_backbone_trainable(model, True, head)
    assert trainable == total
    model.train()
    assert set_frozen_norm_eval(model) == 0 and model.bn1.training


# --- command line ------------------------------------------------------------------------------------


def run_main(argv: list[str]) -> int:
    try:
        run_cli(lambda: pretrained.main(argv))
    except SystemExit as stop:
        return stop.code
    return 0


def test_cli_list_shows_local_files(tmp_path, capsys):
    (tmp_path / "resnet18-f37072fd.pth").write_bytes(b"")
    assert run_main(["--list", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "default", "weights", "size", "top-1", "input", "file"]
    row = next(line for line in lines if line.startswith("resnet18 "))
    assert row.split() == ["resnet18", "IMAGENET1K_V1", "45", "MB", "69.8", "224", "downloaded"]
    assert lines[-1].startswith(f"{len(pretrained.available_model_names())} models, 1 with weights present")


def test_cli_downloads_then_reuses(mirror, tmp_path, monkeypatch, capsys):
    url, digest = mirror.publish()
    monkeypatch.setattr(pretrained, "weights_entry", lambda model, weights=None: tiny_entry(url))
    argv = ["resnet18", "--dir", str(tmp_path / "w"), "--weights_mirror", mirror.url]
    assert run_main(argv) == 0
    assert run_main(argv) == 0
    out = capsys.readouterr().out
    assert "resnet18: downloaded" in out and "resnet18: already present" in out and digest[:12] in out
    assert len(mirror.requests) == 1


def test_cli_user_errors_are_one_line(tmp_path, closed_url, monkeypatch, capsys):
    assert run_main(["resnt50"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown --model 'resnt50'. Did you mean: resnet50")
    monkeypatch.setenv(MIRROR_ENV, closed_url)
    assert run_main(["resnet18", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot download resnet18-f37072fd.pth")
    assert f"fetch {OFFICIAL}/resnet18-f37072fd.pth" in err and str(tmp_path) in err
