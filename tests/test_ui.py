"""The desktop viewer (ui_classification/, runui.py), driven for real with pytest-qt, offscreen.

The window loads the checkpoint the session trained on the digits (conftest `trained_run`),
classifies real PNG folders in its worker thread, and is compared with the Predictor and
ClassificationMetrics run directly on the same files.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import string
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script
from PyQt5.QtCore import Qt, QTimer
from PyQt5.QtWidgets import QApplication, QMessageBox

from inference.predictor import Predictor
from ui_classification import app
from ui_classification.results import LOG_FILE, PREDICTIONS_CSV
from ui_classification.strings import TEXT, Text
from ui_classification.window import ViewerOptions, ViewerWindow, install_qt_translation
from utils.files import list_images
from utils.metrics import ClassificationMetrics

# The README's screenshot is refreshed only on request (UPDATE_SCREENSHOT=1), so a test run never
# rewrites a tracked file; otherwise the screenshot goes to the test's temporary folder.
README_SCREENSHOT = REPO / "docs" / "ui_screenshot.png"
RUN_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> str:
    return str(trained_run / "best.pth")


@pytest.fixture(scope="module")
def test_dir(digits_root) -> Path:
    return digits_root / "test"


@pytest.fixture(scope="module")
def reference(checkpoint, test_dir) -> dict:
    """What the shared Predictor + ClassificationMetrics give on the folder, without the window."""
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    paths = list_images(test_dir)
    probs = torch.cat([batch.probs for batch in predictor.predict_paths(paths, batch_size=64)])
    targets = torch.tensor([predictor.class_names.index(Path(p).parent.name) for p in paths])
    metrics = ClassificationMetrics(len(predictor.class_names))
    metrics.update(probs, targets)
    predicted = [predictor.class_names[i] for i in probs.argmax(1).tolist()]
    return {"metrics": metrics.compute(), "paths": paths, "predicted": dict(zip(paths, predicted)),
            "probability": dict(zip(paths, probs.max(1).values.tolist())), "class_names": predictor.class_names}


@pytest.fixture
def open_window(qtbot, checkpoint):
    """Opens a viewer on the trained checkpoint and waits until the worker has loaded it."""
    windows = []

    def open_(**options) -> ViewerWindow:
        window = ViewerWindow(ViewerOptions(weights=checkpoint, device="cpu", **options))
        qtbot.addWidget(window)
        window.show()
        windows.append(window)
        qtbot.waitUntil(lambda: window.model_info is not None or window.last_message is not None, timeout=60_000)
        return window

    yield open_
    for window in windows:
        window.shutdown()


def run_to_end(qtbot, window: ViewerWindow) -> None:
    assert window.start_run(), window.last_message
    qtbot.waitUntil(lambda: not window.running, timeout=RUN_TIMEOUT_MS)


def answer_next_question(button: QMessageBox.StandardButton) -> None:
    """Click `button` in the next modal question box as soon as it is open (a real click, no mock)."""

    def click() -> None:
        box = QApplication.activeModalWidget()
        if isinstance(box, QMessageBox):
            box.button(button).click()
        else:
            QTimer.singleShot(20, click)

    QTimer.singleShot(20, click)


def press(qtbot, window: ViewerWindow, key: Qt.Key, modifier=Qt.NoModifier) -> None:
    """A key press as a user makes it: to the widget that has the keyboard focus in the active window."""
    window.activateWindow()
    qtbot.waitUntil(lambda: QApplication.focusWidget() is not None and QApplication.focusWidget().window() is window,
                    timeout=5_000)
    qtbot.keyClick(QApplication.focusWidget(), key, modifier)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_text_tables_have_the_same_keys_and_placeholders():
    def placeholders(value: str) -> set:
        return {name for _, name, _, _ in string.Formatter().parse(value) if name}

    english, chinese = TEXT["en"], TEXT["zh"]
    assert set(english) == set(chinese)
    mismatched = [key for key in english if placeholders(english[key]) != placeholders(chinese[key])]
    assert mismatched == []


def test_run_browse_record_match_the_shared_metrics(qtbot, open_window, test_dir, reference, trained_run,
                                                     tmp_path):
    save_dir = tmp_path / "saved"
    save_dir.mkdir()
    window = open_window(image_dir=str(test_dir), save_dir=str(save_dir), batch_size=16)
    assert window.windowTitle().startswith("resnet18: 10 classes (0, 1, 2")
    run_to_end(qtbot, window)
    count = len(reference["paths"])

    # the live metrics after the run are the shared ones over the same folder
    assert window.live.total == window.live.labelled == len(window.predictions) == count
    expected = reference["metrics"]
    for name in ("top1", "precision", "recall", "f1"):
        assert window.live.values[name] == pytest.approx(expected[name], abs=1e-6), name
    assert torch.equal(window.live.values["confusion"], expected["confusion"])
    trained = json.loads((trained_run / "test_metrics.json").read_text())  # train.py's own test evaluation
    assert window.live.values["top1"] == pytest.approx(trained["top1"], abs=1e-6)
    assert window.live.values["f1"] == pytest.approx(trained["f1"], abs=1e-6)
    # ... and those infer.py reports for the same folder (a separate process, its own output files)
    result = run_script("infer.py", "--weights", str(trained_run / "best.pth"), "--image_path", str(test_dir),
                        "--save_dir", str(tmp_path / "infer"), "--workers", "0")
    assert result.returncode == 0, result.stderr
    (infer_json,) = (tmp_path / "infer").rglob("predictions.json")
    infer_metrics = json.loads(infer_json.read_text(encoding="utf-8"))["metrics"]
    for name in ("top1", "precision", "recall", "f1"):
        assert window.live.values[name] == pytest.approx(infer_metrics[name], abs=1e-6), name
    assert window.live.values["confusion"].tolist() == infer_metrics["confusion_matrix"]
    panel = window.metrics_view.toPlainText()
    assert f"Accuracy: {expected['top1']:.2%}" in panel
    assert f"F1 (macro): {expected['f1']:.4f}" in panel
    assert [p.path for p in window.predictions] == reference["paths"]
    class_names = reference["class_names"]
    assert [class_names[p.predicted_index] for p in window.predictions] == [reference["predicted"][p] for p in reference["paths"]]

    # browsing: buttons, keys, bounds
    assert window.current == 0 and not window.previous_button.isEnabled()
    window.show_next()
    press(qtbot, window, Qt.Key_Right)
    assert window.current == 2
    press(qtbot, window, Qt.Key_Left)
    assert window.current == 1
    press(qtbot, window, Qt.Key_End)
    assert window.current == count - 1 and f"[{count} / {count}]" in window.current_label.text()
    press(qtbot, window, Qt.Key_Home)
    assert window.current == 0
    # typing in the interval box keeps its keys; Enter hands the viewer keys back
    window.interval_box.setFocus(Qt.MouseFocusReason)
    press(qtbot, window, Qt.Key_Right)
    assert window.current == 0 and QApplication.focusWidget() is window.interval_box
    press(qtbot, window, Qt.Key_Return)
    press(qtbot, window, Qt.Key_Right)
    assert window.current == 1
    window.show_previous()
    window.show_previous()
    assert window.current == 0
    shown = window.predictions[0]
    assert f"Prediction: {class_names[shown.predicted_index]}" in window.current_label.text()
    assert f"True class: {Path(shown.path).parent.name}" in window.current_label.text()
    assert window.verdict_label.text() == ("✓ correct" if shown.correct else "✗ incorrect")
    assert not window.image_view.pixmap().isNull()

    # one annotated copy per image, under distinct names, in this run's own subfolder of the save folder
    (run_folder,) = save_dir.iterdir()
    assert run_folder.name.startswith("run-") and str(run_folder) == window.run_folder
    saved = sorted(p.saved_path for p in window.predictions)
    assert len(set(saved)) == count and all(Path(p).parent == run_folder and Path(p).is_file() for p in saved)

    # Record (Ctrl+S): predictions.csv + the log into the run folder; a second Record does not overwrite the first
    press(qtbot, window, Qt.Key_S, Qt.ControlModifier)
    rows = read_csv(run_folder / PREDICTIONS_CSV)
    assert [row["path"] for row in rows] == reference["paths"]
    for row in rows:  # infer.py's predictions.csv format, written by its own writer
        assert row["status"] == "ok" and row["error"] == ""
        assert row["top1_class"] == reference["predicted"][row["path"]]
        assert float(row["top1_probability"]) == pytest.approx(reference["probability"][row["path"]], abs=1e-5)
        assert row["true_class"] == Path(row["path"]).parent.name
        assert row["correct"] == str(int(row["top1_class"] == row["true_class"]))
    assert "Finished: " in (run_folder / LOG_FILE).read_text(encoding="utf-8")
    window.record()
    assert (run_folder / "predictions-1.csv").is_file() and len(read_csv(run_folder / PREDICTIONS_CSV)) == count

    # the screenshot for the README: show a mistake, if the short training left one, to show the red mark
    wrong = next((i for i, p in enumerate(window.predictions) if p.correct is False), 0)
    window.show_index(wrong)
    screenshot = README_SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "ui_screenshot.png"
    screenshot.parent.mkdir(exist_ok=True)
    assert window.grab().save(str(screenshot))
    assert screenshot.stat().st_size > 10_000


def test_onnx_model_loads_and_classifies_like_the_checkpoint(qtbot, trained_onnx, test_dir, reference):
    """runui.py --weights best.onnx: onnxruntime behind the same worker, same answers and metrics."""
    window = ViewerWindow(ViewerOptions(weights=str(trained_onnx), device="cpu", image_dir=str(test_dir),
                                        batch_size=32))
    qtbot.addWidget(window)
    window.show()
    try:
        qtbot.waitUntil(lambda: window.model_info is not None or window.last_message is not None, timeout=60_000)
        assert window.model_info is not None, window.last_message
        assert window.model_info.class_names == reference["class_names"]
        run_to_end(qtbot, window)
        assert [p.path for p in window.predictions] == reference["paths"]
        class_names = reference["class_names"]
        assert [class_names[p.predicted_index] for p in window.predictions] == \
            [reference["predicted"][p] for p in reference["paths"]]
        assert max(abs(float(p.probabilities.max()) - reference["probability"][p.path])
                   for p in window.predictions) <= 1e-4
        assert torch.equal(window.live.values["confusion"], reference["metrics"]["confusion"])
        assert window.live.values["top1"] == pytest.approx(reference["metrics"]["top1"], abs=1e-6)
    finally:
        window.shutdown()


def test_autoplay_pause_and_resume(qtbot, open_window, test_dir):
    window = open_window(image_dir=str(test_dir), interval=0.02)
    run_to_end(qtbot, window)
    window.set_autoplay(True)
    qtbot.waitUntil(lambda: window.current >= 3, timeout=10_000)
    press(qtbot, window, Qt.Key_Space)
    assert window.paused and window.pause_button.text() == "Resume"
    stopped_at = window.current
    qtbot.wait(300)  # fifteen intervals: autoplay would have moved on
    assert window.current == stopped_at
    window.toggle_pause()
    qtbot.waitUntil(lambda: window.current > stopped_at, timeout=10_000)
    window.show_index(len(window.predictions) - 2)
    qtbot.waitUntil(lambda: not window.autoplaying, timeout=10_000)
    assert window.current == len(window.predictions) - 1
    assert "Autoplay reached the last image" in window.log_lines[-1]


def test_corrupt_image_same_names_and_unlabelled_folder(qtbot, open_window, test_dir, tmp_path):
    images = tmp_path / "images"
    three, five = sorted((test_dir / "3").iterdir())[0], sorted((test_dir / "5").iterdir())[0]
    for source, target in ((three, images / "3" / "same.png"), (five, images / "5" / "same.png"),
                           (five, images / "unsorted" / "other.png")):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    (images / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    save_dir = tmp_path / "saved"
    save_dir.mkdir()
    (save_dir / "same.png").write_bytes(b"the user's own file")
    window = open_window(image_dir=str(images), save_dir=str(save_dir))
    run_to_end(qtbot, window)

    assert window.last_message is None  # a bad image is logged, not a message box
    # infer.py's labelling rule: "unsorted" is no class, so the folder is not a labelled tree, and the log says why
    assert window.live.total == 4 and window.live.skipped == 1 and window.live.labelled == 0
    assert any("not evaluated as a labelled tree" in line and "unsorted" in line for line in window.log_lines)
    assert any("Skipped unreadable image" in line and "broken.png" in line for line in window.log_lines)
    assert [Path(p.path).name for p in window.predictions] == ["same.png", "same.png", "other.png"]
    assert all(p.true_index is None and p.correct is None for p in window.predictions)
    assert (save_dir / "same.png").read_bytes() == b"the user's own file"
    assert all(Path(p.saved_path).parent == Path(window.run_folder) for p in window.predictions)
    saved = {Path(p.saved_path).name for p in window.predictions}
    assert saved == {"same.png", "same-1.png", "other.png"}
    assert "Images classified: 3\n" in window.metrics_view.toPlainText()  # the unreadable one is counted apart
    window.record()
    rows = read_csv(Path(window.run_folder) / PREDICTIONS_CSV)  # every image, the unreadable one too, as infer.py writes them
    assert [(Path(row["path"]).name, row["status"]) for row in rows] == \
        [("broken.png", "unreadable"), ("same.png", "ok"), ("same.png", "ok"), ("other.png", "ok")]
    assert "true_class" not in rows[0] and rows[0]["error"] and rows[0]["top1_class"] == ""


def test_problems_give_a_message_and_keep_the_window(qtbot, open_window, test_dir, tmp_path, checkpoint):
    window = open_window()
    assert window.image_view.text() == "Choose an image folder, then press Run."  # the checkpoint is given
    assert not window.run_button.isEnabled()
    assert window.checkpoint_start_dir() == str(Path(checkpoint).parent)
    window.record()
    assert window.last_message == "Nothing to record yet: press Run first."
    assert not window.start_run() and window.last_message == "Choose an image folder first."

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    window.set_image_dir(str(empty))
    assert not window.start_run()
    assert window.last_message.startswith(f"No images in {empty}")
    assert window.message_box.isVisible() and not window.message_box.isModal()
    window.record()  # a second problem replaces the text of the one box: boxes never stack
    assert [box.text() for box in window.findChildren(QMessageBox) if box.isVisible()] == [window.last_message]

    window.set_image_dir(str(test_dir))
    window.set_save_dir(str(tmp_path / "missing"))
    assert not window.start_run() and "missing does not exist" in window.last_message

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    window.set_checkpoint(str(bad))
    qtbot.waitUntil(lambda: "bad.pth" in (window.last_message or ""), timeout=30_000)
    assert window.last_message.startswith("Cannot load the checkpoint:")
    assert window.model_info.model_name == "resnet18"  # the earlier model stays loaded and usable
    window.set_save_dir(None)
    run_to_end(qtbot, window)
    assert len(window.predictions) == len(list_images(test_dir))
    # another folder: the old results leave the screen
    assert window.set_image_dir(str(empty))
    assert window.predictions == [] and window.current == -1 and window.class_table.rowCount() == 0
    assert window.metrics_view.toPlainText() == "" and window.current_label.text() == ""
    assert window.image_view.text() == "Press Run (R) to classify the folder."


def test_bare_state_dict_with_model_categories_and_input_shape(qtbot, checkpoint, test_dir, tmp_path):
    """runui.py --model --categories --input_shape, as infer.py takes them; the window is up before torch's model."""
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    bare = tmp_path / "bare.pth"
    torch.save(stored["state_dict"], bare)
    args = app.get_args_parser().parse_args(["--weights", str(bare), "--model", "resnet18", "--categories",
                                             ",".join(stored["class_names"]), "--input_shape", "32", "--device", "cpu"])
    app.check_args(args)
    window = ViewerWindow(app.options_from_args(args))
    qtbot.addWidget(window)
    assert window.worker is None and window.image_view.text() == "Loading the model bare.pth…"
    window.show()
    try:
        qtbot.waitUntil(lambda: window.model_info is not None or window.last_message is not None, timeout=60_000)
        assert window.last_message is None and window.model_info.class_names == stored["class_names"]
        assert window.windowTitle().startswith("resnet18: 10 classes")
    finally:
        window.shutdown()


def test_stop_ends_the_run_and_the_next_run_is_complete(qtbot, open_window, test_dir):
    window = open_window(image_dir=str(test_dir), batch_size=1)
    total = len(list_images(test_dir))
    assert window.start_run()
    qtbot.waitUntil(lambda: window.current == 0, timeout=RUN_TIMEOUT_MS)
    assert f"[1 / {total}]" in window.current_label.text()  # the run's total, not the batch's
    assert not window.set_image_dir(str(test_dir.parent)) and window.last_message.startswith("A run is active")
    assert window.image_dir == str(test_dir)
    window.toggle_run()  # the Run button reads Stop while a run is active
    assert window.run_button.text() == "Stopping…" and not window.run_button.isEnabled()
    qtbot.waitUntil(lambda: not window.running, timeout=RUN_TIMEOUT_MS)
    assert "Stopped after" in window.log_lines[-1] and window.run_button.text() == "Run"
    assert len(window.predictions) < len(list_images(test_dir))
    window.options.batch_size = 64
    run_to_end(qtbot, window)
    assert len(window.predictions) == window.live.total == len(list_images(test_dir))


def test_closing_during_a_run_asks_first(qtbot, open_window, test_dir):
    window = open_window(image_dir=str(test_dir), batch_size=1)
    assert window.start_run()
    window.toggle_pause()  # hold the run open
    answer_next_question(QMessageBox.No)
    assert not window.close()
    assert window.isVisible() and window.running
    answer_next_question(QMessageBox.Yes)
    assert window.close()
    assert not window.isVisible() and not window.running
    assert window.worker_thread.isFinished()
    assert len(window.predictions) < len(list_images(test_dir))


def test_chinese_text(qtbot, open_window, tmp_path, test_dir):
    window = open_window(lang="zh", title="数字识别")
    zh = Text("zh")
    assert window.windowTitle() == "数字识别"
    assert window.run_button.text() == zh("run") and window.record_button.text() == zh("record")
    window.set_image_dir(str(tmp_path))
    assert not window.start_run()
    assert window.last_message.startswith(f"{tmp_path} 中没有图片")
    assert any("已加载 resnet18，10 类" in line for line in window.log_lines)
    assert window.class_table.horizontalHeaderItem(0).text() == zh("column_class")
    question = QMessageBox(QMessageBox.Question, "", "", QMessageBox.Yes | QMessageBox.No)
    assert question.button(QMessageBox.Yes).text() == "是(&Y)"  # Qt's own texts, from its qtbase_zh_CN
    # a run in Chinese: the results table speaks it too; the screenshot for docs/zh-CN (UPDATE_SCREENSHOT=1)
    assert window.set_image_dir(str(test_dir))
    run_to_end(qtbot, window)
    count = len(window.predictions)
    assert window.results_panel.count_label.text() == zh("shown_count", shown=count, total=count)
    window.show_index(next((i for i, p in enumerate(window.predictions) if p.correct is False), 0))
    screenshot = README_SCREENSHOT.with_name("ui_screenshot_zh.png") if os.environ.get("UPDATE_SCREENSHOT") == "1" \
        else tmp_path / "ui_screenshot_zh.png"
    assert window.grab().save(str(screenshot)) and screenshot.stat().st_size > 10_000
    install_qt_translation("en")


@pytest.mark.parametrize("flags, message", [
    (["--weights", "missing.pth"], "error: --weights missing.pth does not exist or is not a file"),
    (["--image_dir", "no_such_folder"], "error: --image_dir no_such_folder does not exist or is not a folder"),
    (["--interval", "0"], "error: --interval must be more than 0 seconds, got 0.0"),
    (["--device", "gpu"], "error: --device 'gpu' is not a device this project runs on (use auto, cpu, cuda, cuda:N or mps)"),
])
def test_runui_refuses_bad_flags_in_one_line(flags, message):
    result = run_script("runui.py", *flags)
    assert result.returncode == 2
    assert result.stderr.strip() == message
