"""infer.py end to end: run as a user would (a subprocess) on the checkpoint the session trained
on the digits (conftest `trained_run`), on real image files; the txt/CSV/JSON outputs are parsed.

Fatal checkpoint mistakes run in-process through `run_cli(infer.main)`, the code path of the
script, to save torch's start-up per case; one of them also runs as a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_script, run_script_with_permissions, write_blank_png, write_image

import infer
from inference.inputs import find_labels, resolve_inputs
from inference.predictor import Predictor, parse_categories
from inference.results import TXT_RULE
from utils.cli import run_cli
from utils.data import read_rgb
from utils.errors import UsageError
from utils.visualize import CORRECT, WRONG

DIGITS = [str(d) for d in range(10)]


# ---- fixtures and helpers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(trained_run) -> str:
    return str(trained_run / "best.pth")


@pytest.fixture(scope="module")
def bare_weights(weights, tmp_path_factory) -> str:
    """What other templates save: the weights alone."""
    path = tmp_path_factory.mktemp("bare") / "state_dict.pth"
    torch.save(torch.load(weights, weights_only=True)["state_dict"], path)
    return str(path)


@pytest.fixture(scope="module")
def photos(digits_root, tmp_path_factory) -> Path:
    """An unlabelled folder: digits under non-ASCII names, a sub-folder, names that sort
    naturally, a hidden file, a corrupt JPEG and an empty PNG."""
    root = tmp_path_factory.mktemp("photos") / "照片 photos"
    sources = sorted((digits_root / "test" / "3").glob("*.png"))[:3] + sorted((digits_root / "test" / "7").glob("*.png"))[:2]
    for name, source in zip(["img2.png", "img10.png", "café 1.png", "sub/数字.png", "sub/img1.png"], sources):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / name)
    shutil.copy(sources[0], root / ".hidden.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    return root


def infer_run(*args: str, save_dir: Path, env: dict | None = None):
    return run_script("infer.py", *args, "--save_dir", str(save_dir), env=env)


def run_dir_of(save_dir: Path) -> Path:
    (run_dir,) = [p for p in save_dir.iterdir() if p.is_dir()]
    return run_dir


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def read_txt_blocks(path: Path) -> list[dict]:
    """predictions.txt back into {"Image": ..., "Predicted class": ..., ...} blocks."""
    blocks, block = [], {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line == TXT_RULE:
            blocks.append(block)
            block = {}
        else:
            key, _, value = line.partition(": ")
            block[key] = value
    assert block == {}, "the file must end with the dashed line"
    return blocks


def check_outputs_agree(run_dir: Path, expected_paths: list[str]) -> tuple[list[dict], dict]:
    """txt, CSV and JSON list the same images in the same order with the same answers."""
    rows = read_csv(run_dir / "predictions.csv")
    blocks = read_txt_blocks(run_dir / "predictions.txt")
    report = json.loads((run_dir / "predictions.json").read_text(encoding="utf-8"))
    assert [r["path"] for r in rows] == expected_paths
    assert [b["Image"] for b in blocks] == expected_paths
    assert [p["path"] for p in report["predictions"]] == expected_paths
    ranks = sum(field.endswith("_probability") for field in rows[0])
    for row, block, record in zip(rows, blocks, report["predictions"]):
        if row["status"] == "ok":
            assert block["Predicted class"] == row["top1_class"] == record["class"]
            assert percent(block["Probability"]) == pytest.approx(float(row["top1_probability"]), abs=5.1e-5)
            assert abs(float(row["top1_probability"]) - record["probability"]) < 1e-6
            probabilities = [float(row[f"top{k}_probability"]) for k in range(1, ranks + 1)]
            assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-5
            assert [pair["class"] for pair in record["topk"]] == [row[f"top{k}_class"] for k in range(1, ranks + 1)]
        else:
            assert block["Predicted class"] == "(unreadable)" and block["Error"] == row["error"] == record["error"]
            assert row["top1_class"] == "" and record["class"] is None
    assert report["count"] == len(expected_paths)
    assert report["readable"] == sum(r["status"] == "ok" for r in rows)
    return rows, report


def percent(text: str) -> float:
    """"99.13%" -> 0.9913"""
    assert text.endswith("%")
    return float(text[:-1]) / 100


def fatal(argv: list[str], capsys) -> str:
    """Run infer.main in-process the way the script does; expects exit 2 and returns the error line
    (the last line of stderr; warnings about single files may come before it)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: infer.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    return last


# ---- the input kinds -----------------------------------------------------------------------------

def test_single_image_prints_the_answer_and_saves_it_drawn_in_true_colours(weights, tmp_path):
    image = np.zeros((375, 500, 3), dtype=np.uint8)
    image[:, :250] = (255, 0, 0)  # RGB: red left half, blue right half
    image[:, 250:] = (0, 0, 255)
    path = write_image(tmp_path / "花 flower.jpg", image)
    result = infer_run("--weights", weights, "--image_path", str(path), "--show", "--topk", "3",
                       save_dir=tmp_path / "out", env={"DISPLAY": "", "WAYLAND_DISPLAY": ""})
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path / "out")
    (row,) = read_csv(run_dir / "predictions.csv")
    assert f"Image: {path}\nPredicted class: {row['top1_class']}\nProbability: " in result.stdout
    shown = result.stdout.split("Probability: ")[1].split()[0]
    assert percent(shown) == pytest.approx(float(row["top1_probability"]), abs=5.1e-5)
    assert "top3_class" in row and "top4_class" not in row
    assert "note: --show: no display" in result.stdout
    annotated = read_rgb(run_dir / "花 flower_pred.jpg")
    assert annotated.shape[1] == 500 and annotated.shape[0] > 375  # caption bar above, image kept whole
    assert annotated[-10, 10].tolist() == pytest.approx([255, 0, 0], abs=25)
    assert annotated[-10, -10].tolist() == pytest.approx([0, 0, 255], abs=25)
    check_outputs_agree(run_dir, [str(path)])


def test_folder_with_corrupt_and_non_ascii_files(weights, photos, tmp_path):
    result = infer_run("--weights", weights, "--image_path", str(photos), "--num_show", "3", save_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    expected = [str(photos / n) for n in
                ["broken.jpg", "café 1.png", "empty.png", "img2.png", "img10.png", "sub/img1.png", "sub/数字.png"]]
    run_dir = run_dir_of(tmp_path)
    rows, report = check_outputs_agree(run_dir, expected)
    unreadable = {r["path"] for r in rows if r["status"] == "unreadable"}
    assert unreadable == {str(photos / "broken.jpg"), str(photos / "empty.png")}
    assert {u["path"] for u in report["unreadable"]} == unreadable
    assert "warning: 2 unreadable image(s)" in result.stderr and "broken.jpg" in result.stderr
    assert report["metrics"] is None and "true_class" not in rows[0]
    grid = read_rgb(run_dir / "samples.png")
    assert grid.shape[1] == 3 * 224 + 4 * 6  # three tiles of 224 with gaps
    assert not (run_dir / "misclassified.csv").exists()


def test_glob_and_list_file_together(weights, photos, tmp_path):
    """A glob (natural order), then a .txt list: relative paths beside the list, a comment, a blank
    line, a missing file (reported, not fatal), and an image the glob already gave (kept once)."""
    listing = tmp_path / "lists" / "picks.txt"
    listing.parent.mkdir()
    shutil.copytree(photos / "sub", tmp_path / "lists" / "sub")
    listing.write_text(f"# my picks\nsub/数字.png\n\n{photos / 'img2.png'}\nmissing.png\n", encoding="utf-8")
    result = infer_run("--weights", weights, "--image_path", str(photos / "img*.png"), str(listing),
                       save_dir=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    expected = [str(photos / "img2.png"), str(photos / "img10.png"), str(listing.parent / "sub/数字.png"),
                str(listing.parent / "missing.png")]
    rows, _ = check_outputs_agree(run_dir_of(tmp_path / "out"), expected)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "unreadable"]
    assert "missing.png" in rows[3]["error"]


def test_labelled_tree_metrics_match_a_hand_count_and_training(weights, trained_run, digits_root, tmp_path):
    result = infer_run("--weights", weights, "--image_path", str(digits_root / "test"), save_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path)
    rows, report = check_outputs_agree(run_dir, [r["path"] for r in read_csv(run_dir / "predictions.csv")])
    assert len(rows) == 270 and all(Path(r["path"]).parent.name == r["true_class"] for r in rows)

    hand = hand_count(rows)
    metrics = report["metrics"]
    assert metrics["count"] == 270
    for name in ("top1", "precision", "recall", "f1"):
        assert metrics[name] == pytest.approx(hand[name], abs=1e-6), name
    assert f"top1 {hand['top1'] * 100:.2f}%" in result.stdout and f"f1 {hand['f1']:.4f}" in result.stdout
    per_class = {r["class"]: r for r in read_csv(run_dir / "per_class.csv")}
    assert {c: int(r["support"]) for c, r in per_class.items()} == Counter(r["true_class"] for r in rows)
    confusion = torch.tensor(metrics["confusion_matrix"])
    assert int(confusion.trace()) == sum(r["correct"] == "1" for r in rows)

    # training evaluated the same checkpoint on the same split with the same metrics class
    trained = json.loads((trained_run / "test_metrics.json").read_text(encoding="utf-8"))
    assert metrics["top1"] == pytest.approx(trained["top1"], abs=1.01 / 270)
    assert metrics["f1"] == pytest.approx(trained["f1"], abs=0.01)

    wrong = [r for r in rows if r["correct"] == "0"]
    mistakes = read_csv(run_dir / "misclassified.csv")
    assert sorted(m["path"] for m in mistakes) == sorted(r["path"] for r in wrong)
    confidences = [float(m["probability"]) for m in mistakes]
    assert confidences == sorted(confidences, reverse=True)
    assert (run_dir / "confusion_matrix.png").stat().st_size > 10_000
    if mistakes:  # the worst one is first, with a red caption bar
        grid = read_rgb(run_dir / "worst_mistakes.png")
        assert grid[8, 8].tolist() == pytest.approx(list(WRONG), abs=30)
    samples = read_rgb(run_dir / "samples.png")
    assert samples[8, 8].tolist() in (pytest.approx(list(CORRECT), abs=30), pytest.approx(list(WRONG), abs=30))


def hand_count(rows: list[dict]) -> dict:
    """Accuracy and macro precision/recall/F1 from the CSV rows, counted by hand."""
    pairs = [(r["true_class"], r["top1_class"]) for r in rows]
    precision, recall, f1 = [], [], []
    for name in DIGITS:
        true_positive = sum(t == name and p == name for t, p in pairs)
        predicted = sum(p == name for _, p in pairs)
        actual = sum(t == name for t, _ in pairs)
        precision.append(true_positive / predicted if predicted else 0.0)
        recall.append(true_positive / actual if actual else 0.0)
        both = precision[-1] + recall[-1]
        f1.append(2 * precision[-1] * recall[-1] / both if both else 0.0)
    return {"top1": sum(t == p for t, p in pairs) / len(pairs), "precision": float(np.mean(precision)),
            "recall": float(np.mean(recall)), "f1": float(np.mean(f1))}


def test_bare_state_dict_with_model_and_comma_categories(weights, bare_weights, photos, tmp_path):
    """Same answers as the full checkpoint gives through the Predictor."""
    result = infer_run("--weights", bare_weights, "--image_path", str(photos), "--num_show", "0",
                       "--model", "resnet18", "--categories", ",".join(DIGITS), "--input_shape", "32",
                       save_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_csv(run_dir_of(tmp_path) / "predictions.csv")
    readable = [r for r in rows if r["status"] == "ok"]
    predictor = Predictor.from_checkpoint(weights, device="cpu")
    predictor.temperature = 1.0  # a bare state_dict has no temperature: compare the uncalibrated probabilities
    probs = torch.cat([b.probs for b in predictor.predict_paths([r["path"] for r in readable])])
    assert [r["top1_class"] for r in readable] == [DIGITS[i] for i in probs.argmax(1).tolist()]
    assert [float(r["top1_probability"]) for r in readable] == pytest.approx(probs.max(1).values.tolist(), abs=1e-5)
    assert not (run_dir_of(tmp_path) / "samples.png").exists()  # --num_show 0


def test_runs_never_overwrite_each_other(weights, photos, tmp_path):
    argv = ["--weights", weights, "--image_path", str(photos / "img2.png"), "--save_dir", str(tmp_path)]
    first, second = infer.main(argv), infer.main(argv)
    assert first["run_dir"] != second["run_dir"]
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("image_path, message", [
    ("does/not/exist", "--image_path does/not/exist does not exist"),
    ("EMPTY", "holds no image files"),
    ("nothing/*.jpg", "matches no image files"),
    ("EMPTY_LIST", "lists no image paths"),
])
def test_bad_image_path_is_one_line_and_exit_2(weights, tmp_path, image_path, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "notes.txt").write_text("no images here")
    (tmp_path / "EMPTY_LIST.txt").write_text("# nothing\n\n")
    spec = image_path if "/" in image_path else str(tmp_path / (image_path + (".txt" if "LIST" in image_path else "")))
    result = infer_run("--weights", weights, "--image_path", spec, save_dir=tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_categories_count_differing_from_the_checkpoint_in_a_real_process(weights, photos, tmp_path):
    result = infer_run("--weights", weights, "--image_path", str(photos), "--categories", "cat", "dog",
                       save_dir=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == (f"error: --categories gives 2 names but {weights} was trained for 10 classes "
                             "(0, 1, 2, 3, 4, 5, 6, 7, 8, 9); drop --categories or give exactly 10 names\n")


def test_fatal_checkpoint_mistakes(weights, bare_weights, photos, tmp_path, capsys):
    images = ["--image_path", str(photos), "--save_dir", str(tmp_path)]
    assert "checkpoint nope.pth does not exist" in fatal(["--weights", "nope.pth", *images], capsys)
    assert "bare state_dict: also give --model and --categories" in fatal(["--weights", bare_weights, *images], capsys)
    err = fatal(["--weights", bare_weights, *images, "--model", "resnet18", "--categories", "a", "b", "c",
                 "--input_shape", "32"], capsys)
    assert "has a 10-class head (fc.weight) but 3 class names were given (--categories)" in err
    err = fatal(["--weights", bare_weights, *images, "--model", "mobilenet_v3_small", "--categories", *DIGITS], capsys)
    assert "does not fit the model" in err
    assert "unknown --model 'resnet_18'" in fatal(["--weights", bare_weights, *images, "--model", "resnet_18",
                                                    "--categories", *DIGITS], capsys)
    not_a_checkpoint = str(photos / "img2.png")
    assert not_a_checkpoint in fatal(["--weights", not_a_checkpoint, *images], capsys)
    assert "--categories names 1 more than once" in fatal(["--weights", weights, *images, "--categories", "1,1"],
                                                          capsys)
    assert not list(tmp_path.iterdir())  # nothing written for a run that could not start


def test_unreadable_inputs_that_leave_nothing_to_predict(weights, photos, tmp_path, capsys):
    err = fatal(["--weights", weights, "--image_path", str(photos / "broken.jpg"), "--save_dir", str(tmp_path)], capsys)
    assert "broken.jpg" in err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(photos / "broken.jpg", only_bad / "a.jpg")
    shutil.copy(photos / "empty.png", only_bad / "b.png")
    err = fatal(["--weights", weights, "--image_path", str(only_bad), "--save_dir", str(tmp_path / "out")], capsys)
    assert "none of the 2 images could be read" in err
    rows = read_csv(run_dir_of(tmp_path / "out") / "predictions.csv")  # still listed, with the reasons
    assert [r["status"] for r in rows] == ["unreadable", "unreadable"]


def test_flags_notes_and_labelled_tree_detection(weights, digits_root, tmp_path, capsys):
    """A train.py checkpoint decides the model; a folder whose sub-folders are not all classes is
    predicted without evaluation, and says why."""
    tree = tmp_path / "tree"
    for name in ("3", "holiday"):
        shutil.copytree(digits_root / "test" / "3", tree / name)
    summary = infer.main(["--weights", weights, "--image_path", str(tree), "--model", "vgg11", "--input_shape", "64",
                          "--save_dir", str(tmp_path / "out"), "--num_show", "0", "--batch_size", "7"])
    out = capsys.readouterr().out
    assert summary["metrics"] is None and summary["count"] == 2 * 28
    assert "note: --model vgg11 ignored: " in out and "note: --input_shape ignored" in out
    assert "folder(s) holiday in" in out and "are not classes of the checkpoint" in out


@pytest.mark.slow
def test_bench_quick_prints_the_tables():
    result = run_script("bench/bench_infer.py", "--quick", cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("CPU: ")
    whole = [line for line in lines if line.startswith("| ") and " JPEG, " in line]
    assert len(whole) == 2 and all("decode thread" in line for line in whole)  # small and large images
    goals = [line for line in lines if line.startswith("Goal ")]
    assert len(goals) == 6 and all(" met" in line or " MISSED" in line for line in goals)
    caps = [float(line.split("(at most ")[1].split()[0]) for line in goals if "of the forward ceiling" in line]
    assert len(caps) == 2 and all(0 < cap <= 1 for cap in caps)  # the most this machine allows, from measured costs
    assert any("unlabelled (the loop's job)" in line for line in goals)  # the like-for-like speed-up
    start = lines.index("| path | images | images/s | ms/image | speed-up |")
    rows = [line for line in lines[start + 2:] if line.startswith("| ")][:3]
    assert rows[0].startswith("| per-image loop") and rows[0].endswith("| 1.00x |")
    assert "(infer.py)" in rows[-1] and float(rows[-1].split("|")[3]) > 0


# ---- an exported .onnx through onnxruntime (issue 13) ---------------------------------------------

def test_onnx_gives_the_same_outputs_as_the_checkpoint_on_a_labelled_folder(weights, trained_onnx, digits_root,
                                                                            tmp_path):
    """infer.py on best.onnx (onnxruntime) and on best.pth (PyTorch): same top-1 for every image,
    every class probability within 1e-4, the same metrics and the same files."""
    runs = {}
    for name, model_file in (("pth", weights), ("onnx", str(trained_onnx))):
        result = infer_run("--weights", model_file, "--image_path", str(digits_root / "test"), "--topk", "10",
                           "--device", "cpu", save_dir=tmp_path / name)
        assert result.returncode == 0, result.stderr
        runs[name] = (result.stdout, run_dir_of(tmp_path / name))
    assert "onnxruntime on CPU" in runs["onnx"][0] and "onnxruntime" not in runs["pth"][0]
    (pth_rows, pth_report), (onnx_rows, onnx_report) = [
        check_outputs_agree(run_dir, [r["path"] for r in read_csv(run_dir / "predictions.csv")])
        for _, run_dir in runs.values()]
    assert len(onnx_rows) == 270 and [r["path"] for r in onnx_rows] == [r["path"] for r in pth_rows]
    assert [r["top1_class"] for r in onnx_rows] == [r["top1_class"] for r in pth_rows]
    for pth_record, onnx_record in zip(pth_report["predictions"], onnx_report["predictions"]):
        pth_probs = {pair["class"]: pair["probability"] for pair in pth_record["topk"]}
        onnx_probs = {pair["class"]: pair["probability"] for pair in onnx_record["topk"]}
        assert onnx_probs.keys() == pth_probs.keys() == set(DIGITS)
        assert max(abs(onnx_probs[c] - pth_probs[c]) for c in DIGITS) <= 1e-4 + 1e-6  # + the 6-decimal rounding
    pth_metrics, onnx_metrics = pth_report["metrics"], onnx_report["metrics"]
    assert onnx_metrics.keys() == pth_metrics.keys()
    for name, value in pth_metrics.items():  # float32 sums in another order: equal to 1e-6
        assert onnx_metrics[name] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), name
    pth_dir, onnx_dir = runs["pth"][1], runs["onnx"][1]
    assert read_csv(onnx_dir / "per_class.csv") == read_csv(pth_dir / "per_class.csv")
    mistakes = [[(r["path"], r["predicted_class"]) for r in read_csv(d / "misclassified.csv")] for d in (pth_dir, onnx_dir)]
    assert sorted(mistakes[0]) == sorted(mistakes[1])
    pictures = {p.name for p in pth_dir.iterdir() if p.suffix in (".png", ".jpg")}
    assert pictures >= {"confusion_matrix.png", "samples.png"}
    assert {p.name for p in onnx_dir.iterdir() if p.suffix in (".png", ".jpg")} == pictures
    assert onnx_report["checkpoint"] == str(trained_onnx)


def test_onnx_is_told_by_its_content_and_onnx_flags_are_explained(weights, trained_onnx, photos, tmp_path, capsys):
    renamed_onnx, renamed_pth = tmp_path / "model.bin", tmp_path / "really_a_checkpoint.onnx"
    shutil.copy(trained_onnx, renamed_onnx)
    shutil.copy(weights, renamed_pth)
    assert Predictor.from_file(str(renamed_onnx), "cpu").backend.name == "onnxruntime"
    assert Predictor.from_file(str(renamed_pth), "cpu").backend.name == "torch"
    onnx_predictor = Predictor.from_file(str(trained_onnx), "cpu", class_names=[f"d{d}" for d in DIGITS])
    assert onnx_predictor.class_names[:2] == ["d0", "d1"] and onnx_predictor.model is None

    one_image = str(photos / "img2.png")
    summary = infer.main(["--weights", str(renamed_onnx), "--image_path", one_image, "--amp", "--model", "vgg11",
                          "--input_shape", "64", "--save_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert summary["readable"] == 1 and "onnxruntime on CPU" in out
    assert "note: --amp ignored: " in out and "note: --model vgg11 ignored" in out and "note: --input_shape ignored" in out

    images = ["--image_path", one_image, "--save_dir", str(tmp_path / "bad")]
    assert "--device mps: onnxruntime models run on auto, cpu, cuda or cuda:N" in fatal(
        ["--weights", str(trained_onnx), "--device", "mps", *images], capsys)
    assert "gives 3 names but" in fatal(["--weights", str(trained_onnx), "--categories", "a,b,c", *images], capsys)
    assert "--cam needs the PyTorch checkpoint" in fatal(["--weights", str(trained_onnx), "--cam", *images], capsys)
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model")
    assert "junk.onnx is not a readable ONNX model" in fatal(["--weights", str(tmp_path / "junk.onnx"), *images],
                                                             capsys)
    assert not (tmp_path / "bad").exists()


# ---- hostile files, folders and checkpoints (issue 11) -------------------------------------------

MEASURED = ("import resource, subprocess, sys\n"  # runs the script as its only child, then reports its peak memory
            "code = subprocess.run([sys.executable, *sys.argv[1:]]).returncode\n"
            "print(f'peak_rss_kib={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr)\n"
            "sys.exit(code)")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_huge_strip_and_corrupt_images_are_skipped_in_bounded_memory(weights, digits_root, tmp_path):
    """A 30000 x 30000 PNG (2.7 GB decoded; it peaked at 6.1 GB), a 1 x 200000 strip (2 GB in crop
    mode) and files that fail to decode, in a labelled tree: listed as unreadable with their
    reasons, never decoded, no OpenCV log lines, metrics over the readable images only."""
    tree = tmp_path / "tree"
    for digit, count in (("3", 3), ("7", 2)):
        for source in sorted((digits_root / "test" / digit).glob("*.png"))[:count]:
            (tree / digit).mkdir(parents=True, exist_ok=True)
            shutil.copy(source, tree / digit / source.name)
    huge = write_blank_png(tree / "3" / "huge.png", 30000, 30000)
    strip = write_blank_png(tree / "7" / "strip.png", 200000, 1)
    good_png = sorted((digits_root / "test" / "7").glob("*.png"))[0].read_bytes()
    (tree / "7" / "cut.png").write_bytes(good_png[:len(good_png) // 2])  # OpenCV warned "[ WARN ...]" here
    (tree / "3" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = run_script("-c", MEASURED, "infer.py", "--weights", weights, "--image_path", str(tree),
                        "--save_dir", str(tmp_path / "out"), "--num_show", "2")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "[ WARN" not in output and "[ERROR" not in output and "Traceback" not in output
    assert "DecompressionBomb" not in output
    rows = {Path(r["path"]).name: r for r in read_csv(run_dir_of(tmp_path / "out") / "predictions.csv")}
    assert rows["huge.png"]["error"] == f"{huge}: too large: 900,000,000 pixels, over the limit of 178,956,970 (shrink it first)"
    assert rows["strip.png"]["error"] == f"{strip}: extreme aspect ratio: 200000x1, over 100:1 (crop or split it into pictures first)"
    assert "cannot decode image" in rows["cut.png"]["error"] and rows["broken.jpg"]["status"] == "unreadable"
    assert sum(r["status"] == "ok" for r in rows.values()) == 5
    report = json.loads((run_dir_of(tmp_path / "out") / "predictions.json").read_text(encoding="utf-8"))
    assert report["metrics"]["count"] == 5
    assert "warning: 4 unreadable image(s)" in result.stderr and "Metrics over 5 labelled images" in result.stdout
    peak_kib = int(result.stderr.rsplit("peak_rss_kib=", 1)[1])
    # the imports alone take ~0.85 GiB (torch built with CUDA); decoding the PNG alone would add 2.7 GB
    assert peak_kib < 2 * 2**20, f"infer.py peaked at {peak_kib / 2**20:.2f} GiB"


@pytest.mark.skipif(os.name == "nt", reason="chmod 000 does not lock a folder on Windows")
def test_folders_that_cannot_be_listed_are_named(weights, photos, tmp_path):
    """Were skipped in silence: now a warning naming the folder and the OS error, the rest predicted;
    a top folder that cannot be listed is one line and exit 2."""
    tree = tmp_path / "tree"
    shutil.copytree(photos, tree)
    locked = tree / "sub"
    locked.chmod(0)
    try:
        result = run_script_with_permissions("infer.py", "--weights", weights, "--image_path", str(tree),
                                             "--save_dir", str(tmp_path / "out"), "--num_show", "0", locked=locked)
        top = run_script_with_permissions("infer.py", "--weights", weights, "--image_path", str(locked),
                                          "--save_dir", str(tmp_path / "out2"), locked=locked)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert f"warning: cannot list folder {locked} (Permission denied): its images are not predicted" in result.stderr
    rows = read_csv(run_dir_of(tmp_path / "out") / "predictions.csv")
    assert len(rows) == 5 and not any("/sub/" in r["path"] for r in rows)
    assert top.returncode == 2
    assert top.stderr == f"error: --image_path {locked}: cannot list folder {locked}: Permission denied\n"


@pytest.fixture(scope="module")
def crafted(weights, tmp_path_factory):
    """crafted(field=value, ...) -> a copy of the trained checkpoint with those fields changed
    ("preprocess.std" changes one entry of the preprocess record)."""
    folder = tmp_path_factory.mktemp("crafted")
    original = torch.load(weights, weights_only=True)

    def make(**changes) -> str:
        checkpoint = {**original, "preprocess": dict(original["preprocess"])}
        for key, value in changes.items():
            if key.startswith("preprocess_"):
                checkpoint["preprocess"][key.removeprefix("preprocess_")] = value
            else:
                checkpoint[key] = value
        path = folder / f"crafted_{len(list(folder.iterdir()))}.pth"
        torch.save(checkpoint, path)
        return str(path)

    return make


def test_malformed_checkpoint_fields_and_devices_in_a_real_process(weights, crafted, photos, tmp_path):
    """std 0 gave NaN probabilities marked ok and --device meta a traceback: now one line naming the
    file and the field (or the flag), exit 2, nothing written."""
    zero_std = crafted(preprocess_std=[0.0, 0.0, 0.0])
    cases = [
        (["--weights", zero_std], f"error: checkpoint {zero_std}: field 'preprocess.std' must be 3 positive numbers "
                                  "(one per RGB channel), got [0.0, 0.0, 0.0] (edited or damaged? train.py writes "
                                  "valid ones)\n"),
        (["--weights", weights, "--device", "meta"], "error: --device 'meta' is not a device this project runs on "
                                                     "(use auto, cpu, cuda, cuda:N or mps)\n"),
    ]
    for argv, expected in cases:
        result = infer_run(*argv, "--image_path", str(photos), save_dir=tmp_path / "out")
        assert (result.returncode, result.stderr) == (2, expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, message", [
    ({"preprocess_interpolation": "sideways"}, "field 'preprocess.interpolation' must be one of nearest"),
    ({"preprocess_std": [0.2, -0.1, 0.2]}, "field 'preprocess.std' must be 3 positive numbers"),
    ({"preprocess_input_size": [60000, 60000]},  # was OOM-killed at 22 GB
     "field 'preprocess.input_size' must be [height, width], whole numbers from 1 to 4096, got [60000, 60000]"),
    ({"preprocess_input_size": [0, 32]}, "field 'preprocess.input_size' must be [height, width]"),
    ({"preprocess": "crop"}, "field 'preprocess' must be a dict, got str"),
    ({"class_names": "0123456789"}, "field 'class_names' must be a list of class names"),
    ({"class_names": list(range(10))}, "field 'class_names' must be a list of class names"),
    ({"class_names": ["0", "1", "1", *DIGITS[3:]]}, "field 'class_names' names 1 more than once"),
    ({"model": None}, "field 'model' must be a model name, got None"),
    ({"model_kwargs": ["transform_input"]}, "field 'model_kwargs' must be a dict of names to plain values"),
    ({"model_kwargs": {"weights": "DEFAULT"}}, "cannot be built: model_kwargs may not set weights"),
    ({"model_kwargs": {"bogus": 1}}, "cannot be built: model_kwargs {'bogus': 1} do not fit resnet18"),
])
def test_malformed_checkpoint_fields(crafted, photos, tmp_path, capsys, changes, message):
    path = crafted(**changes)
    err = fatal(["--weights", path, "--image_path", str(photos), "--save_dir", str(tmp_path)], capsys)
    assert err.startswith(f"error: checkpoint {path}") and message in err
    assert not list(tmp_path.iterdir())


# ---- the pieces, in-process ----------------------------------------------------------------------

def test_list_entries_fall_back_to_the_current_folder(tmp_path, monkeypatch):
    write_image(tmp_path / "here" / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    write_image(tmp_path / "lists" / "b.png", np.zeros((8, 8, 3), dtype=np.uint8))
    (tmp_path / "lists" / "l.txt").write_text("here/a.png\nb.png\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    inputs = resolve_inputs([str(Path("lists") / "l.txt")])
    assert inputs.paths == ["here/a.png", str(Path("lists") / "b.png")]
    assert not inputs.single and inputs.folder is None


def test_labelled_tree_detection(tmp_path):
    for relative in ("3/a.png", "7/deeper/b.png", "7/c.png"):
        write_image(tmp_path / "tree" / relative, np.zeros((8, 8, 3), dtype=np.uint8))
    labels, note = find_labels(resolve_inputs([str(tmp_path / "tree")]), DIGITS)
    assert labels is not None and note is None
    assert labels.indices == [3, 7, 7] and labels.class_folders == ["3", "7"]
    write_image(tmp_path / "tree" / "loose.png", np.zeros((8, 8, 3), dtype=np.uint8))
    labels, note = find_labels(resolve_inputs([str(tmp_path / "tree")]), DIGITS)
    assert labels is None and "1 image(s) lie directly in" in note
    labels, note = find_labels(resolve_inputs([str(tmp_path / "tree")]), ["cat", "dog"])
    assert labels is None and note is None  # nothing class-like: a plain folder
    labels, note = find_labels(resolve_inputs([str(tmp_path / "tree" / "3" / "a.png")]), DIGITS)
    assert labels is None and note is None


def test_parse_categories():
    assert parse_categories(["daisy", "dandelion"]) == ["daisy", "dandelion"]
    assert parse_categories(["daisy,dandelion", "rose"]) == ["daisy", "dandelion", "rose"]
    assert parse_categories(["sea lion, seal"]) == ["sea lion", "seal"]
    assert parse_categories(None) is None
    with pytest.raises(UsageError, match="names a more than once"):
        parse_categories(["a", "b", "a"])


def test_min_confidence_unknown_counts_match_a_hand_count(weights, trained_run, digits_root, tmp_path):
    """--min_confidence 0.9: below it the answer is 'unknown' in txt, CSV and JSON, counted apart;
    the calibration train.py stored is used and reported (issue 14)."""
    checkpoint = torch.load(weights, weights_only=True)
    assert checkpoint["temperature"] > 0 and "suggested_min_confidence" in checkpoint
    trained = json.loads((trained_run / "test_metrics.json").read_text(encoding="utf-8"))
    assert {"auroc", "ece", "ece_calibrated"} <= set(trained) and trained["temperature"] == checkpoint["temperature"]
    for name in ("roc", "pr", "reliability", "roc_test", "pr_test", "reliability_test"):
        assert (trained_run / "plots" / f"{name}.png").stat().st_size > 5_000, name

    result = infer_run("--weights", weights, "--image_path", str(digits_root / "test"), "--min_confidence", "0.9",
                       save_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path)
    rows = read_csv(run_dir / "predictions.csv")
    unsure = [r for r in rows if float(r["top1_probability"]) < 0.9]
    answered = [r for r in rows if float(r["top1_probability"]) >= 0.9]
    assert 0 < len(unsure) < len(rows)  # the test means something only when both kinds occur
    assert [r["path"] for r in rows if r["status"] == "unknown"] == [r["path"] for r in unsure]
    assert all(r["correct"] == "" for r in unsure)
    report = json.loads((run_dir / "predictions.json").read_text(encoding="utf-8"))
    metrics = report["metrics"]
    assert metrics["unknown"] == len(unsure) and metrics["coverage"] == pytest.approx(len(answered) / len(rows))
    right = sum(r["true_class"] == r["top1_class"] for r in answered)
    assert metrics["covered_accuracy"] == pytest.approx(right / len(answered))
    assert sum(p["class"] == "unknown" for p in report["predictions"]) == len(unsure)
    blocks = read_txt_blocks(run_dir / "predictions.txt")
    assert sum(b["Predicted class"] == "unknown" for b in blocks) == len(unsure)
    assert {"auroc", "ece", "ece_calibrated"} <= set(metrics) and report["temperature"] == checkpoint["temperature"]
    assert f"Unknown (top probability below 90.00%): {len(unsure)} of {len(rows)}" in result.stdout
    assert not {r["path"] for r in read_csv(run_dir / "misclassified.csv")} & {r["path"] for r in unsure}
    for name in ("roc", "pr", "reliability"):
        assert (run_dir / f"{name}.png").stat().st_size > 5_000, name


def test_min_confidence_auto_and_bad_values(weights, bare_weights, digits_root, tmp_path, capsys):
    predictor = Predictor.from_checkpoint(weights, "cpu")
    args = infer.get_args_parser().parse_args(["--weights", weights, "--image_path", "x", "--min_confidence", "auto"])
    suggested = torch.load(weights, weights_only=True)["suggested_min_confidence"]
    if suggested is None:
        with pytest.raises(UsageError, match="no threshold kept 99%"):
            infer.resolve_min_confidence(args, predictor)
    else:
        assert infer.resolve_min_confidence(args, predictor) == suggested
    bare = Predictor.from_checkpoint(bare_weights, "cpu", model_name="resnet18", class_names=DIGITS, input_shape=[32])
    assert bare.temperature == 1.0  # absent: 1.0
    with pytest.raises(UsageError, match="has no suggested_min_confidence"):
        infer.resolve_min_confidence(args, bare)
    for bad in ("1.5", "often", "-0.1"):
        line = fatal(["--weights", weights, "--image_path", str(digits_root / "test"), "--min_confidence", bad,
                      "--save_dir", str(tmp_path)], capsys)
        assert f"--min_confidence must be a probability between 0 and 1 or 'auto', got {bad}" in line


def test_cam_pictures_on_the_original_and_in_the_grids(weights, digits_root, tmp_path, capsys):
    """--cam: one cam/<name>.jpg per image at the ORIGINAL image's size, the layer said and stored, and
    the sample and worst-mistakes grids made of the heat-map pictures (so they differ from plain ones).
    The digits of 0 sit in folder 1 and back: mistakes are certain."""
    tree = tmp_path / "tree"
    for digit, folder in (("0", "1"), ("1", "0"), ("2", "2")):
        (tree / folder).mkdir(parents=True, exist_ok=True)
        for source in sorted((digits_root / "val" / digit).iterdir())[:3]:
            shutil.copy(source, tree / folder / source.name)
    args = ["--weights", weights, "--image_path", str(tree), "--num_show", "4", "--workers", "0"]
    plain = Path(infer.main([*args, "--save_dir", str(tmp_path / "plain")])["run_dir"])
    cam = Path(infer.main([*args, "--cam", "--save_dir", str(tmp_path / "cam")])["run_dir"])
    assert "note: --cam: gradcam heat maps from layer layer1, a 8x8 map (layer4 gives only 1x1" in capsys.readouterr().out
    pictures = sorted((cam / "cam").iterdir())
    assert len(pictures) == 9 and all(read_rgb(p).shape == (32, 32, 3) for p in pictures)  # 8x8 scans, enlarged to the input
    assert json.loads((cam / "predictions.json").read_text(encoding="utf-8"))["cam"] == {
        "method": "gradcam", "layer": "layer1", "map_size": [8, 8]}
    for grid in ("samples.png", "worst_mistakes.png"):
        with_cam, without = read_rgb(cam / grid), read_rgb(plain / grid)
        assert with_cam.shape == without.shape and np.abs(with_cam.astype(int) - without).mean() > 5, grid
    images = ["--image_path", str(tree), "--save_dir", str(tmp_path / "bad"), "--cam"]
    assert "--cam_layer layer9: resnet18 has no such layer" in fatal(["--weights", weights, "--cam_layer", "layer9", *images], capsys)
    assert "--cam_layer fc: its output (1, 10) is not a map" in fatal(["--weights", weights, "--cam_layer", "fc", *images], capsys)
    assert not (tmp_path / "bad").exists()  # refused before predicting
