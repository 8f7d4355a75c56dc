"""export.py end to end: real checkpoints (built with the registry, saved in the project's format),
exported by the script, read back with onnxruntime / torch.jit and compared with PyTorch.

Runs that only need the script's code path run in-process through `run_cli(export.main)` to save
torch's start-up; the main export and the flag mistakes also run as subprocesses.
"""

from __future__ import annotations

import ast
import json
import os
import re
import runpy
import shutil
import sys
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import onnx
import pytest
import torch
from conftest import REPO, make_class_tree, run_script, write_image

import export
import inference.export
from inference.export import METADATA_KEYS, load_torchscript
from inference.onnx_model import OnnxModel
from inference.predictor import Predictor
from models.pretrained import sha256_file
from models.registry import create_model
from utils.checkpoint import CHECKPOINT_FORMAT, save_checkpoint, timestamp, versions
from utils.cli import run_cli
from utils.data import read_rgb
from utils.files import list_images
from utils.transforms import Preprocess, build_eval_transform, normalize_batch

CLASSES = {"blue": 4, "green": 4, "red": 4}  # natural order, as train.py lists class folders
PARITY_LINE = re.compile(r"^(onnx|torchscript): parity with PyTorch on (\d+) images: max \|delta p\| (\S+), "
                         r"top-1 agreement (\d+)/(\d+)", re.MULTILINE)


# ---- helpers and fixtures ------------------------------------------------------------------------

def make_checkpoint(path: Path, model_name: str, size: int, dataset: Optional[Path] = None,
                    temperature: Optional[float] = None, resize_mode: str = "crop") -> Path:
    """A checkpoint as train.py writes it, with untrained weights (parity needs no training)."""
    torch.manual_seed(0)
    model = create_model(model_name, len(CLASSES), (size, size))
    with torch.no_grad():  # zero-initialised heads (ViT, EfficientNet biases) would make every row 1/C
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    checkpoint = {"format": CHECKPOINT_FORMAT, "model": model_name, "class_names": list(CLASSES),
                  "state_dict": model.state_dict(),
                  "preprocess": Preprocess(input_size=[size, size], resize_mode=resize_mode).to_dict(),
                  "epoch": 1, "metrics": {}, "best_metric": 0.0, "versions": versions(), "created": timestamp(),
                  "args": {"dataset_path": str(dataset) if dataset else None, "val_ratio": 0.0, "seed": 0}}
    if temperature is not None:
        checkpoint["temperature"] = temperature
    save_checkpoint(checkpoint, path)
    return path


def parity_lines(stdout: str) -> dict[str, tuple[int, float, int, int]]:
    return {fmt: (int(n), float(delta), int(agree), int(total))
            for fmt, n, delta, agree, total in PARITY_LINE.findall(stdout)}


def assert_parity(stdout: str, formats: tuple[str, ...], count: int) -> None:
    found = parity_lines(stdout)
    assert sorted(found) == sorted(formats), stdout
    for fmt in formats:
        n, delta, agree, total = found[fmt]
        assert n == total == agree == count and delta <= 1e-4, (fmt, found[fmt])


def run_main(argv: list[str], capsys, code: Optional[int] = None) -> tuple[str, str]:
    """export.main in-process the way the script runs it; `code`: the exit status expected."""
    if code is None:
        run_cli(lambda: export.main(argv))
    else:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: export.main(argv))
        assert exit_info.value.code == code
    captured = capsys.readouterr()
    return captured.out, captured.err


def files_in(folder: Path) -> list[str]:
    """Every file, hidden ones (temporary exports) included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """A train/val dataset of colour classes; its val/ is a labelled tree of the checkpoints' classes."""
    return make_class_tree(tmp_path_factory.mktemp("data") / "colours", CLASSES, size=48)


@pytest.fixture(scope="module")
def resnet_run(colours, tmp_path_factory) -> tuple[Path, str]:
    """resnet18 at 64 px exported to both formats by a real process, checked on the dataset's val/."""
    run_dir = tmp_path_factory.mktemp("run")
    weights = make_checkpoint(run_dir / "best.pth", "resnet18", 64, dataset=colours)
    result = run_script("export.py", "--weights", str(weights), "--format", "all")
    assert result.returncode == 0, result.stderr
    return weights, result.stdout


@pytest.fixture(scope="module")
def stretch_onnx(colours, tmp_path_factory) -> tuple[Path, Path]:
    """resnet18 at 32 px, stretch resize, temperature 2: (checkpoint, .onnx), exported in-process."""
    folder = tmp_path_factory.mktemp("stretch")
    weights = make_checkpoint(folder / "warm.pth", "resnet18", 32, temperature=2.0, resize_mode="stretch")
    run_cli(lambda: export.main(["--weights", str(weights), "--check_images", str(colours / "val")]))
    return weights, folder / "warm.onnx"


# ---- the main export -----------------------------------------------------------------------------

def test_resnet18_exports_both_formats_checked_on_the_training_data(resnet_run, colours):
    weights, stdout = resnet_run
    assert f"Check images: 12 images from {colours} (val split), labelled" in stdout
    assert "onnx: torch.onnx dynamo exporter" in stdout and "torchscript: torch.jit.trace" in stdout
    assert_parity(stdout, ("onnx", "torchscript"), 12)
    assert files_in(weights.parent) == ["best.onnx", "best.pth", "best.torchscript.pt"]  # no temporary left


def test_onnx_file_follows_the_contract(resnet_run):
    weights, _ = resnet_run
    model = onnx.load(str(weights.with_suffix(".onnx")))
    onnx.checker.check_model(model)
    (image_input,), (output,) = model.graph.input, model.graph.output
    dims = [d.dim_value or d.dim_param for d in image_input.type.tensor_type.shape.dim]
    assert image_input.name == "images" and image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert isinstance(dims[0], str) and dims[1:] == [3, 64, 64]  # dynamic batch
    assert output.name == "probabilities" and output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert output.type.tensor_type.shape.dim[1].dim_value == len(CLASSES)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert set(METADATA_KEYS) <= set(metadata)
    checkpoint = torch.load(weights, weights_only=True)
    assert json.loads(metadata["class_names"]) == checkpoint["class_names"]
    assert json.loads(metadata["preprocess"]) == checkpoint["preprocess"]
    assert metadata["model"] == "resnet18" and metadata["temperature"] == "1.0"
    assert metadata["source_sha256"] == sha256_file(weights) and metadata["source"] == "best.pth"
    assert json.loads(metadata["versions"])["torch"] == torch.__version__


def test_onnx_model_predicts_like_the_pytorch_predictor_on_a_labelled_folder(resnet_run, tmp_path):
    """infer.py's Predictor on the .pth and OnnxModel on the .onnx: same top-1 for every image,
    probabilities within 1e-4, on photos of several sizes (so the resize runs too)."""
    weights, _ = resnet_run
    rng = np.random.default_rng(1)
    for index, (name, colour) in enumerate([("blue", (30, 40, 200)), ("green", (40, 190, 60)), ("red", (210, 50, 40))]):
        for k, (height, width) in enumerate([(40, 90), (120, 70), (64, 64)]):
            noise = rng.integers(-50, 50, size=(height, width, 3))
            write_image(tmp_path / name / f"{index}_{k}.png", np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))
    paths = list_images(tmp_path)
    predictor = Predictor.from_checkpoint(str(weights), "cpu")
    expected = torch.cat([batch.probs for batch in predictor.predict_paths(paths, batch_size=4)]).numpy()
    onnx_model = OnnxModel(weights.with_suffix(".onnx"), device="cpu")
    got = onnx_model.predict_arrays([read_rgb(path) for path in paths])
    assert onnx_model.class_names == list(CLASSES) and onnx_model.batch_size is None
    assert got.dtype == np.float32 and got.shape == (9, 3)
    assert (got.argmax(1) == expected.argmax(1)).all() and np.abs(got - expected).max() <= 1e-4
    assert np.allclose(got.sum(1), 1, atol=1e-5)


def test_torchscript_carries_the_same_metadata_and_answers(resnet_run):
    weights, _ = resnet_run
    module, metadata = load_torchscript(weights.with_suffix("").with_suffix(".torchscript.pt"))
    onnx_model = OnnxModel(weights.with_suffix(".onnx"), device="cpu")
    for key in ("class_names", "preprocess", "model", "source_sha256", "temperature", "format"):
        assert metadata[key] == onnx_model.metadata[key], key
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)  # another batch size than traced
    with torch.inference_mode():
        probabilities = module(images).numpy()
    assert np.abs(probabilities - onnx_model.predict_uint8(images.numpy())).max() <= 1e-4


def test_a_second_export_never_replaces_the_first(resnet_run, tmp_path, capsys):
    weights = tmp_path / "best.pth"
    for name in ("best.pth", "best.torchscript.pt"):
        shutil.copy(resnet_run[0].parent / name, tmp_path / name)
    digest = sha256_file(tmp_path / "best.torchscript.pt")
    out, _ = run_main(["--weights", str(weights), "--format", "torchscript"], capsys)
    assert sha256_file(tmp_path / "best.torchscript.pt") == digest
    assert f"torchscript: saved {tmp_path / 'best.torchscript-1.pt'}" in out
    assert files_in(tmp_path) == ["best.pth", "best.torchscript-1.pt", "best.torchscript.pt"]


# ---- more families, sizes and options -------------------------------------------------------------

@pytest.mark.slow  # 15-55 s each on 2 cores (the dynamo exporter traces the whole model)
@pytest.mark.parametrize("model_name, size", [
    ("mobilenet_v3_small", 32),
    ("efficientnet_b0", 32),
    ("convnext_tiny", 32),
    ("vit_b_16", 32),  # ViT is built for its input size (registry): 2x2 patches of 16
])
def test_model_families_export_with_parity(model_name, size, colours, tmp_path):
    weights = make_checkpoint(tmp_path / f"{model_name}.pth", model_name, size)
    result = run_script("export.py", "--weights", str(weights), "--format", "all",
                        "--check_images", str(colours / "val"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert_parity(result.stdout, ("onnx", "torchscript"), 12)
    assert files_in(tmp_path / "out") == [f"{model_name}.onnx", f"{model_name}.torchscript.pt"]


def test_temperature_is_applied_inside_the_graph(stretch_onnx):
    """Computed here from the weights alone: softmax(model(normalised) / 2)."""
    weights, onnx_path = stretch_onnx
    checkpoint = torch.load(weights, weights_only=True)
    model = create_model("resnet18", 3, (32, 32))
    model.load_state_dict(checkpoint["state_dict"])
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        logits = model.eval()(normalize_batch(images, Preprocess.from_dict(checkpoint["preprocess"])))
    got = OnnxModel(onnx_path, device="cpu").predict_uint8(images.numpy())
    assert np.abs(got - (logits / 2).softmax(1).numpy()).max() <= 1e-5
    assert np.abs(got - logits.softmax(1).numpy()).max() > 1e-3  # the temperature changed something
    assert OnnxModel(onnx_path, device="cpu").metadata["temperature"] == "2.0"


def test_fixed_batch_model_takes_any_number_of_images(stretch_onnx, colours, tmp_path, capsys):
    weights, _ = stretch_onnx
    out, _ = run_main(["--weights", str(weights), "--batch", "4", "--check_images", str(colours / "val"),
                       "--out", str(tmp_path)], capsys)
    assert "batch 4" in out
    assert_parity(out, ("onnx",), 12)
    fixed = OnnxModel(tmp_path / "warm.onnx", device="cpu")
    dynamic = OnnxModel(stretch_onnx[1], device="cpu")
    assert fixed.batch_size == 4 and fixed.session.get_inputs()[0].shape[0] == 4
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)  # 4 + 1 padded
    assert np.abs(fixed.predict_uint8(images) - dynamic.predict_uint8(images)).max() <= 1e-5


def test_old_opset_uses_the_torchscript_based_exporter(stretch_onnx, colours, tmp_path, capsys):
    weights, _ = stretch_onnx
    out, _ = run_main(["--weights", str(weights), "--opset", "13", "--check_images", str(colours / "val"),
                       "--out", str(tmp_path)], capsys)
    assert "TorchScript-based exporter" in out and "opset 13" in out
    assert_parity(out, ("onnx",), 12)
    model = onnx.load(str(tmp_path / "warm.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [13]


def test_bare_state_dict_with_model_categories_and_input_shape(stretch_onnx, tmp_path, capsys):
    weights, _ = stretch_onnx
    bare = tmp_path / "weights_only.pth"
    torch.save(torch.load(weights, weights_only=True)["state_dict"], bare)
    out, _ = run_main(["--weights", str(bare), "--model", "resnet18", "--categories", "blau,grün,rot",
                       "--input_shape", "32", "--opset", "17", "--format", "all"], capsys)
    assert "Check images: 16 generated images" in out
    assert_parity(out, ("onnx", "torchscript"), 16)
    assert OnnxModel(tmp_path / "weights_only.onnx", device="cpu").class_names == ["blau", "grün", "rot"]


def test_an_export_that_disagrees_exits_1_and_leaves_no_file(stretch_onnx, colours, tmp_path, capsys, monkeypatch):
    """A disagreement is simulated by shifting PyTorch's reference; the check must refuse the file."""
    weights, _ = stretch_onnx
    honest = inference.export.reference_probabilities
    monkeypatch.setattr(inference.export, "reference_probabilities", lambda *a: honest(*a) + 2e-4)
    _, err = run_main(["--weights", str(weights), "--opset", "13", "--check_images", str(colours / "val"),
                       "--out", str(tmp_path / "out")], capsys, code=1)
    assert err.startswith("error: the onnx export of resnet18 disagrees with PyTorch on 12 images") and err.count("\n") == 1
    assert "max |delta p| 2.0e-04" in err and "nothing was saved" in err
    assert not (tmp_path / "out").exists()  # created for the export, removed with it


def test_int8_is_measured_and_kept_only_when_faster(resnet_run, colours, tmp_path, capsys):
    weights, _ = resnet_run
    out, _ = run_main(["--weights", str(weights), "--int8", "--check_images", str(colours / "val"),
                       "--opset", "17", "--out", str(tmp_path)], capsys)  # 17: the quicker exporter will do
    speed = re.search(r"^int8: int8 ([\d.]+) ms/image vs fp32 ([\d.]+) ms/image .* on a batch of 12", out, re.MULTILINE)
    assert speed, out
    assert re.search(r"^int8: against fp32: max \|delta p\| \S+, top-1 agreement \d+/12 .*; accuracy [\d.]+% -> "
                     r"[\d.]+% \([+-][\d.]+ points\) on 12 labelled images$", out, re.MULTILINE), out
    int8_path = tmp_path / "best.int8.onnx"
    faster = float(speed.group(1)) <= float(speed.group(2)) * 0.95
    assert int8_path.exists() == faster == ("int8: saved" in out)
    if faster:
        model = OnnxModel(int8_path, device="cpu")
        assert model.class_names == list(CLASSES) and "calibrated on 12 images" in model.metadata["quantization"]
    assert [name for name in files_in(tmp_path) if name.startswith(".")] == []


# ---- mistakes: one line, exit 2, nothing written --------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("format", "error: --format must be onnx, torchscript or all, got 'tflite'"),
    ("folder", "is a folder; give a checkpoint file such as"),
])
def test_bad_input_in_a_real_process(case, message, resnet_run, tmp_path):
    """Caught before torch loads, so these cost no start-up; the rest run in-process below."""
    weights, _ = resnet_run
    argv = {"format": ["--weights", str(weights), "--format", "tflite"],
            "folder": ["--weights", str(weights.parent)]}[case]
    result = run_script("export.py", *argv, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--out", "{tmp}/taken.txt"], "--out {tmp}/taken.txt is a file, not a folder"),
    (["--out", "{tmp}/taken.txt/models"], "--out {tmp}/taken.txt/models is not writable: Not a directory"),
    (["--batch", "0"], "--batch must be a positive number or dynamic, got '0'"),
    (["--opset", "5"], "--opset must be 7 or higher, got 5"),
    (["--opset", "99"], "--opset 99: torch"),
    (["--int8", "--format", "torchscript"], "--int8 makes an ONNX model: use it with --format onnx or all"),
    (["--check_images", "{tmp}/nowhere"], "--check_images {tmp}/nowhere is not a folder"),
    (["--weights", "{tmp}/missing.pth"], "--weights {tmp}/missing.pth does not exist"),
    (["--weights", "{tmp}/model.onnx"], "is already an exported model; give the .pth it came from"),
    (["--weights", "{tmp}/taken.txt"], "{tmp}/taken.txt is not a readable PyTorch checkpoint (truncated or damaged?)"),
    (["--weights", "{tmp}/bare.pth"], "is a bare state_dict: also give --model and --categories"),
    (["--weights", "{tmp}/bare.pth", "--model", "resnet18", "--categories", "a,b"],
     "has a 3-class head (fc.weight) but 2 class names were given"),
    (["--int8"], "--int8 calibrates on real images: give --check_images DIR"),
])
def test_mistakes_are_one_line_and_exit_2(extra, message, stretch_onnx, tmp_path, capsys):
    weights, onnx_path = stretch_onnx
    (tmp_path / "taken.txt").write_text("a file\n")
    (tmp_path / "model.onnx").write_bytes(onnx_path.read_bytes())
    torch.save(torch.load(weights, weights_only=True)["state_dict"], tmp_path / "bare.pth")
    before = files_in(tmp_path)
    argv = ["--weights", str(weights), "--out", str(tmp_path / "out")] + [a.format(tmp=tmp_path) for a in extra]
    _, err = run_main(argv, capsys, code=2)
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
    assert files_in(tmp_path) == before  # not even the --out folder


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can write into a read-only folder (and Windows has no such mode bits)")
def test_read_only_out_folder(stretch_onnx, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _, err = run_main(["--weights", str(stretch_onnx[0]), "--out", str(locked)], capsys, code=2)
    assert f"--out {locked} is not writable" in err and files_in(locked) == []


@pytest.mark.slow
def test_operator_the_opset_cannot_express_is_named(tmp_path):
    weights = make_checkpoint(tmp_path / "vit.pth", "vit_b_16", 32)
    result = run_script("export.py", "--weights", str(weights), "--opset", "11", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: vit_b_16 cannot be exported to ONNX opset 11: ")
    assert "aten::unflatten" in result.stderr and len(result.stdout.splitlines()) < 10  # no graph dump
    assert not (tmp_path / "out").exists()


def test_onnx_model_refuses_files_it_cannot_use(tmp_path):
    from utils.errors import UsageError

    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model")
    with pytest.raises(UsageError, match="is not a readable ONNX model"):
        OnnxModel(tmp_path / "junk.onnx")
    plain = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "plain",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(UsageError, match="has no class_names or preprocess metadata: export the checkpoint with export.py"):
        OnnxModel(tmp_path / "plain.onnx")


# ---- the documentation's example ------------------------------------------------------------------

def doc_example(doc: Path = REPO / "docs" / "export.md") -> str:
    """The python block of the doc that uses onnxruntime: the example for users outside the repository."""
    text = doc.read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    (example,) = [block for block in blocks if "onnxruntime as ort" in block]
    return example


def test_doc_example_runs_outside_the_repository_and_agrees(stretch_onnx, tmp_path):
    """Images already at the input size, stretch mode: the example's pixels are the project's,
    so its printed answers must equal OnnxModel's."""
    _, onnx_path = stretch_onnx
    script = tmp_path / "classify.py"
    script.write_text(doc_example(), encoding="utf-8")
    rng = np.random.default_rng(2)
    images = [write_image(tmp_path / f"photo_{k}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for k in range(3)]
    result = run_script("-I", str(script), str(onnx_path), *map(str, images), cwd=tmp_path)  # -I: no repo on the path
    assert result.returncode == 0, result.stderr
    model = OnnxModel(onnx_path, device="cpu")
    expected = model.predict_uint8(np.stack([read_rgb(p) for p in images]).transpose(0, 3, 1, 2).copy())
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line, path, probabilities in zip(lines, images, expected):
        name, percent = line.removeprefix(f"{path}: ").rsplit(" ", 1)
        assert name == model.class_names[probabilities.argmax()]
        assert float(percent.rstrip("%")) / 100 == pytest.approx(float(probabilities.max()), abs=6e-5)


def test_doc_example_resizes_like_the_project_in_every_mode(stretch_onnx, tmp_path, monkeypatch):
    """The example's OpenCV resize against utils.transforms on smooth photo-like images of several
    shapes: within about one grey level on average (OpenCV's area filter is not torchvision's)."""
    _, onnx_path = stretch_onnx
    script = tmp_path / "classify.py"
    script.write_text(doc_example(), encoding="utf-8")
    image = write_image(tmp_path / "one.png", np.zeros((32, 32, 3), np.uint8))
    monkeypatch.setattr(sys, "argv", [str(script), str(onnx_path), str(image)])
    namespace = runpy.run_path(str(script))
    rng = np.random.default_rng(0)
    for mode in ("crop", "letterbox", "stretch"):
        namespace["pre"]["resize_mode"] = mode
        preprocess = Preprocess.from_dict(namespace["pre"])
        for height, width in [(97, 143), (300, 200), (20, 50), (32, 32), (700, 500)]:
            coarse = rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)
            photo = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
            photo = np.clip(photo + rng.normal(0, 8, photo.shape), 0, 255).astype(np.uint8)
            theirs = namespace["resize"](photo).astype(int)
            ours = build_eval_transform(preprocess)(torch.from_numpy(photo).permute(2, 0, 1)).permute(1, 2, 0).numpy()
            difference = np.abs(theirs - ours.astype(int))
            assert theirs.shape == (32, 32, 3) and difference.mean() < 1.5 and difference.max() <= 16, (mode, height, width)


def test_chinese_doc_shows_the_same_example():
    assert doc_example(REPO / "docs" / "zh-CN" / "export.md") == doc_example()


def test_inference_package_imports_only_lower_floors():
    """utils/ -> models/ -> inference/ -> scripts: nothing in inference/ imports a script or the UI."""
    allowed = ("utils", "models", "inference")
    project = {p.stem for p in REPO.glob("*.py")} | {"ui_classification", "tests", "bench"}
    for path in (REPO / "inference").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top not in project, f"{path.name} imports {name}"
