"""The viewer's picture (ui_classification/image_view.py): zoom, pan, fit, the pixel grid of small
images, the heat-map toggle and --min_confidence, driven in the real window with pytest-qt.

Keys are pressed on the widget that has the keyboard focus, as a user's key press arrives.
"""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script, write_image
from PIL import Image
from PyQt5.QtCore import QEvent, QPoint, QPointF, QSize, QSizeF, Qt
from PyQt5.QtGui import QMouseEvent, QWheelEvent
from PyQt5.QtWidgets import QApplication
from test_ui import checkpoint, open_window, press, run_to_end  # noqa: F401  (fixtures and helpers)

from ui_classification.image_view import GRID_MIN_PIXELS, ZOOM_STEP
from ui_classification.window import ViewerOptions, ViewerWindow
from utils.data import read_rgb


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Three 8 x 8 images of random colours in a class folder "3": {file name: pixels}."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(1)
    pixels = {f"tiny_{i}.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(3)}
    for name, array in pixels.items():
        write_image(root / "3" / name, array)
    return root, pixels


@pytest.fixture
def viewer(open_window):  # noqa: F811
    """test_ui's open_window, which must have loaded the model."""
    def open_(**options) -> ViewerWindow:
        window = open_window(**options)
        assert window.model_info is not None, window.last_message
        return window

    return open_


def rendered(view):
    """The view's pixels as they are painted on screen (a QImage)."""
    return view.viewport().grab().toImage()


def rgb_at(image, point: QPoint) -> tuple[int, int, int]:
    colour = image.pixelColor(point)
    return colour.red(), colour.green(), colour.blue()


def test_small_image_shows_exact_pixel_blocks_and_a_grid(qtbot, viewer, tiny_images):
    folder, pixels = tiny_images
    window = viewer(image_dir=str(folder))
    run_to_end(qtbot, window)
    view = window.image_view
    source = pixels[Path(window.predictions[window.current].path).name]
    assert view.fitted and view.screen_pixels_per_source_pixel >= GRID_MIN_PIXELS  # 8 pixels fill the view
    image, top, size = rendered(view), view.image_item.pos().y(), view.pixel
    for row in range(8):
        for column in range(8):
            # nearest-neighbour: every screen pixel inside a source pixel has exactly its colour, no blur
            for dx, dy in ((0.5, 0.5), (0.2, 0.25), (0.8, 0.75)):
                point = view.mapFromScene(QPointF((column + dx) * size, top + (row + dy) * size))
                assert rgb_at(image, point) == tuple(source[row, column]), (row, column, dx, dy)
    # the grid: the screen column on each inner border has neither neighbour's colour
    for column in range(1, 8):
        border = view.mapFromScene(QPointF(column * size, top + 3.5 * size))
        left, right = tuple(source[3, column - 1]), tuple(source[3, column])
        on_line = [rgb_at(image, border + QPoint(dx, 0)) for dx in (-1, 0)]
        assert any(colour not in (left, right) for colour in on_line), column

    # zoomed out until a pixel is under GRID_MIN_PIXELS screen pixels: no grid, the blocks stay exact
    for _ in range(20):  # ZOOM_STEP ** 20 is a factor of 87: far enough
        if view.screen_pixels_per_source_pixel < GRID_MIN_PIXELS:
            break
        press(qtbot, window, Qt.Key_Minus)
    assert 1 <= view.screen_pixels_per_source_pixel < GRID_MIN_PIXELS
    image = rendered(view)
    border = view.mapFromScene(QPointF(4 * size, top + 3.5 * size))
    assert rgb_at(image, border + QPoint(-2, 0)) == tuple(source[3, 3])


def test_keys_zoom_fit_and_the_wheel_zooms_around_the_cursor(qtbot, viewer, tiny_images, digits_root):
    window = viewer(image_dir=str(digits_root / "test"))
    run_to_end(qtbot, window)
    view = window.image_view
    fitted = view.zoom
    assert view.fitted and view.text() == ""
    press(qtbot, window, Qt.Key_Plus)
    assert view.zoom == pytest.approx(fitted * ZOOM_STEP) and not view.fitted
    press(qtbot, window, Qt.Key_Equal)  # + without Shift
    assert view.zoom == pytest.approx(fitted * ZOOM_STEP ** 2)
    press(qtbot, window, Qt.Key_Minus)
    assert view.zoom == pytest.approx(fitted * ZOOM_STEP)
    press(qtbot, window, Qt.Key_Right)  # the next image has the same size: the zoom stays
    assert window.current == 1 and view.zoom == pytest.approx(fitted * ZOOM_STEP)
    press(qtbot, window, Qt.Key_F)
    assert view.fitted and view.zoom == pytest.approx(fitted)
    press(qtbot, window, Qt.Key_Plus)
    press(qtbot, window, Qt.Key_0)
    assert view.fitted and view.zoom == pytest.approx(fitted)

    # the wheel: the picture's point under the cursor stays under it (once the picture is bigger than
    # the view: a smaller one stays centred, as in any viewer)
    for _ in range(10):
        shown = view.mapFromScene(view.sceneRect()).boundingRect()
        if shown.width() > view.viewport().width() and shown.height() > view.viewport().height():
            break
        press(qtbot, window, Qt.Key_Plus)
    zoom = view.zoom
    cursor = QPoint(view.viewport().width() // 3, view.viewport().height() // 3)
    held = view.mapToScene(cursor)
    wheel = QWheelEvent(QPointF(cursor), QPointF(view.viewport().mapToGlobal(cursor)), QPoint(0, 0), QPoint(0, 240),
                        Qt.NoButton, Qt.NoModifier, Qt.NoScrollPhase, False)
    QApplication.sendEvent(view.viewport(), wheel)
    assert view.zoom == pytest.approx(zoom * ZOOM_STEP ** 2)
    moved = view.mapToScene(cursor) - held
    assert abs(moved.x()) <= 2 / view.zoom and abs(moved.y()) <= 2 / view.zoom  # scroll positions are whole pixels

    # a drag pans the zoomed picture (mouse events with the button held, as a real drag sends them;
    # QTest's mouseMove carries no buttons)
    before = view.mapToScene(view.viewport().rect().center())
    for kind, offset, button, held_buttons in ((QEvent.MouseButtonPress, QPoint(0, 0), Qt.LeftButton, Qt.LeftButton),
                                               (QEvent.MouseMove, QPoint(20, 15), Qt.NoButton, Qt.LeftButton),
                                               (QEvent.MouseMove, QPoint(40, 30), Qt.NoButton, Qt.LeftButton),
                                               (QEvent.MouseButtonRelease, QPoint(40, 30), Qt.LeftButton, Qt.NoButton)):
        event = QMouseEvent(kind, QPointF(cursor + offset), button, held_buttons, Qt.NoModifier)
        QApplication.sendEvent(view.viewport(), event)
    after = view.mapToScene(view.viewport().rect().center())
    assert not view.fitted  # the picture moved with the mouse: right and down, so the view shows more of the left and top
    assert after.x() == pytest.approx(before.x() - 40 / view.zoom, abs=2 / view.zoom)
    assert after.y() == pytest.approx(before.y() - 30 / view.zoom, abs=2 / view.zoom)


def test_a_large_photo_is_decoded_for_the_screen_and_in_full_once_zoomed_in(qtbot, viewer, tmp_path):
    rng = np.random.default_rng(2)  # noise: a pixel of the full decode is told apart from a reduced one blown up
    turned = Image.fromarray(rng.integers(0, 256, (2048, 1536, 3), dtype=np.uint8))
    exif = turned.getexif()
    exif[0x0112] = 6  # EXIF orientation: shown a quarter turn round, 1536 x 2048 as the other
    (tmp_path / "3").mkdir()
    turned.save(tmp_path / "3" / "photo_0.jpg", exif=exif.tobytes(), quality=92)
    write_image(tmp_path / "3" / "photo_1.jpg", rng.integers(0, 256, (1536, 2048, 3), dtype=np.uint8))
    window = viewer(image_dir=str(tmp_path))
    run_to_end(qtbot, window)
    view = window.image_view
    assert view.fitted and view.shrink >= 2, view.shrink  # a window a few hundred pixels wide
    assert view.pixmap().size() == QSize(2048 // view.shrink, 1536 // view.shrink)
    assert view.image_item.sceneBoundingRect().size() == QSizeF(2048, 1536)  # the scene keeps the full size
    assert view.zoom * view.shrink <= 1  # no reduced pixel is blown up on screen

    # zoomed in past the reduced pixels: the full decode takes their place, and nothing moves
    while view.zoom * view.shrink <= 1:
        press(qtbot, window, Qt.Key_Plus)
    zoom, centre = view.zoom, view.mapToScene(view.viewport().rect().center())
    qtbot.waitUntil(lambda: view.shrink == 1, timeout=10_000)
    assert view.pixmap().size() == QSize(2048, 1536)
    assert view.zoom == zoom and view.mapToScene(view.viewport().rect().center()) == centre
    while view.screen_pixels_per_source_pixel < 4:
        press(qtbot, window, Qt.Key_Plus)
    full, image, top = read_rgb(window.predictions[window.current].path), rendered(view), view.image_item.pos().y()
    middle = view.mapToScene(view.viewport().rect().center())
    for dx, dy in ((0, 0), (1, 0), (0, 1), (-2, 3)):  # the real pixels, nearest-neighbour
        column, row = int(middle.x()) + dx, int(middle.y() - top) + dy
        point = view.mapFromScene(QPointF(column + 0.5, top + row + 0.5))
        assert rgb_at(image, point) == tuple(full[row, column]), (column, row)

    # the next photo has the same size: the zoom stays, and it is decoded in full at once
    zoom = view.zoom
    press(qtbot, window, Qt.Key_Right)
    assert window.current == 1 and not view.fitted and view.zoom == zoom and view.shrink == 1
    press(qtbot, window, Qt.Key_F)
    press(qtbot, window, Qt.Key_Left)  # fitted again: decoded for the screen
    assert window.current == 0 and view.fitted and view.shrink >= 2


def test_heat_map_toggle_draws_in_the_worker_and_is_cached(qtbot, viewer, digits_root):
    window = viewer(image_dir=str(digits_root / "test"))
    run_to_end(qtbot, window)
    view = window.image_view
    plain = rendered(view)
    assert window.heat_button.isEnabled() and not window.heat_button.isChecked()

    press(qtbot, window, Qt.Key_H)
    # the key returned before the heat map existed: it is drawn in the worker thread, the window waits for nothing
    assert window.heat_button.isChecked() and window.heat_maps.waiting_for is not None
    assert window.heat_button.text() == "Heat map …"
    qtbot.waitUntil(lambda: window.heat_maps.waiting_for is None, timeout=60_000)
    assert window.last_message is None
    assert window.last_heat_thread not in (0, threading.get_ident())
    assert window.heat_button.text() == "Heat map"
    heat = rendered(view)
    assert heat != plain  # the heat map's colours are on the picture now
    item = window.predictions[0]
    (overlay,) = window.heat_maps.overlays.values()
    assert overlay.shape == (32, 32, 3)  # the model's view of the image (its input size), as infer.py --cam draws it

    press(qtbot, window, Qt.Key_H)
    assert not window.heat_button.isChecked() and rendered(view) == plain

    # back on: the cached heat map is shown at once, no new request
    press(qtbot, window, Qt.Key_H)
    assert window.heat_maps.waiting_for is None and rendered(view) == heat
    press(qtbot, window, Qt.Key_Right)  # the next image is asked for; its own heat map follows
    assert window.heat_maps.waiting_for == (window.model_info.checkpoint, window.predictions[1].path,
                                            window.predictions[1].predicted_index)
    qtbot.waitUntil(lambda: window.heat_maps.waiting_for is None, timeout=60_000)
    assert len(window.heat_maps.overlays) == 2 and item.path != window.predictions[1].path


def test_heat_map_during_a_paused_run(qtbot, viewer, digits_root):
    """The worker is inside a run (paused): it still draws the heat map of the image on screen."""
    window = viewer(image_dir=str(digits_root / "test"), batch_size=1)
    assert window.start_run()
    qtbot.waitUntil(lambda: window.current == 0, timeout=60_000)
    press(qtbot, window, Qt.Key_Space)
    assert window.paused and window.running
    press(qtbot, window, Qt.Key_H)
    qtbot.waitUntil(lambda: window.heat_maps.waiting_for is None, timeout=60_000)
    assert window.running and window.paused and len(window.heat_maps.overlays) == 1
    window.stop_run()
    qtbot.waitUntil(lambda: not window.running, timeout=60_000)


def test_heat_map_is_off_limits_with_a_reason(qtbot, viewer, trained_onnx, digits_root):
    window = viewer(cam_layer="no.such.layer")
    assert window.heat_map_problem().startswith("No heat maps for this model: --cam_layer no.such.layer")
    window = ViewerWindow(ViewerOptions(weights=str(trained_onnx), device="cpu", image_dir=str(digits_root / "test")))
    qtbot.addWidget(window)
    window.show()
    try:
        qtbot.waitUntil(lambda: window.model_info is not None or window.last_message is not None, timeout=60_000)
        run_to_end(qtbot, window)
        assert not window.heat_button.isEnabled()
        assert window.heat_button.toolTip().startswith("No heat maps for an .onnx model")
        press(qtbot, window, Qt.Key_H)
        assert not window.heat_button.isChecked() and window.heat_maps.waiting_for is None
    finally:
        window.shutdown()


def test_min_confidence_answers_unknown_and_counts_as_infer_does(qtbot, viewer, digits_root, tmp_path):
    test_dir = digits_root / "test"
    window = viewer(image_dir=str(test_dir))
    run_to_end(qtbot, window)
    top = sorted(item.probability for item in window.predictions)
    gaps = [(top[i + 1] - top[i], i) for i in range(len(top) // 4, 3 * len(top) // 4)]
    _, at = max(gaps)
    threshold = (top[at] + top[at + 1]) / 2  # between two answers, far from both: no rounding decides
    window.shutdown()

    window = viewer(image_dir=str(test_dir), min_confidence=f"{threshold:.6f}")
    assert window.model_info.min_confidence == pytest.approx(threshold, abs=1e-6)
    run_to_end(qtbot, window)
    by_hand = [item for item in window.predictions if item.probability < threshold]
    assert len(by_hand) == at + 1 and window.live.unknown == len(by_hand)
    assert all(item.unknown and item.correct is None for item in by_hand)
    right = sum(item.true_index == item.predicted_index for item in window.predictions if not item.unknown)
    answered = len(window.predictions) - len(by_hand)
    assert window.live.coverage_summary() == {"min_confidence": pytest.approx(threshold, abs=1e-6),
                                              "unknown": len(by_hand), "coverage": answered / len(window.predictions),
                                              "covered_accuracy": right / answered}
    assert f"{len(by_hand)} of {len(window.predictions)}" in window.metrics_view.toPlainText()
    lines = window.metrics_view.toPlainText().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("Speed")  # all shown, not behind a scroll bar
    assert window.metrics_view.verticalScrollBar().maximum() == 0
    window.show_index(window.predictions.index(by_hand[0]))
    assert "Prediction: unknown (below --min_confidence" in window.current_label.text()

    files = window.export_to(str(tmp_path))  # infer.py's predictions.csv: status "unknown" for each of them
    with open(files[0], newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert sorted(row["path"] for row in rows if row["status"] == "unknown") == sorted(i.path for i in by_hand)


def test_min_confidence_auto_reads_the_checkpoint_and_bad_values_are_refused(viewer, checkpoint):  # noqa: F811
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    window = viewer(min_confidence="auto")
    suggested = stored.get("suggested_min_confidence")
    if suggested is None:
        assert window.model_info.min_confidence is None and "--min_confidence auto" in window.last_message
    else:
        assert window.model_info.min_confidence == pytest.approx(suggested)
    result = run_script("runui.py", "--min_confidence", "1.5")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --min_confidence must be a probability between 0 and 1 or 'auto', got 1.5"
