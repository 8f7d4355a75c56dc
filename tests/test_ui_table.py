"""The viewer's results table, filters, confusion-matrix navigation, per-class bars and Record
(issue 16 items 8, 9, 12, 13), driven for real with pytest-qt on the session's trained checkpoint.

Counts are checked against hand counts over the window's own predictions; Record against the
files infer.py writes for the same folder (a separate process).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import run_script
from PyQt5.QtCore import QPoint, Qt
from test_ui import checkpoint, open_window, press, run_to_end, test_dir  # noqa: F401  (fixtures and helpers)

from ui_classification.charts import METRICS
from ui_classification.results import PER_CLASS_CSV, PREDICTIONS_CSV, PREDICTIONS_JSON
from ui_classification.results_table import CONFIDENCE, FILE, THUMBNAIL, THUMBNAIL_SIDE
from ui_classification.strings import Text


def click_cell(qtbot, view, index) -> None:
    """A left click in the middle of a cell of a table view, as a user makes it."""
    view.scrollTo(index)
    qtbot.mouseClick(view.viewport(), Qt.LeftButton, pos=view.visualRect(index).center())


def click_header(qtbot, table, column: int) -> None:
    header = table.horizontalHeader()
    position = QPoint(header.sectionViewportPosition(column) + header.sectionSize(column) // 2, header.height() // 2)
    qtbot.mouseClick(header.viewport(), Qt.LeftButton, pos=position)


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def test_filters_sorting_row_and_confusion_clicks(qtbot, open_window, test_dir):  # noqa: F811
    window = open_window(image_dir=str(test_dir), batch_size=16)
    panel = window.results_panel
    inserted, rows_at_reset = [], []
    panel.model.rowsInserted.connect(lambda parent, first, last: inserted.append(last - first + 1))
    panel.model.modelAboutToBeReset.connect(lambda: rows_at_reset.append(panel.model.rowCount()))
    run_to_end(qtbot, window)
    items = window.predictions
    # rows arrive batch by batch, appended (a reset only empties the table for the run, never drops rows)
    assert inserted == [16] * (len(items) // 16) + ([len(items) % 16] if len(items) % 16 else [])
    assert set(rows_at_reset) == {0}
    names = window.live.class_names
    assert panel.model.rowCount() == panel.proxy.rowCount() == len(window.run_items) == len(items)
    assert [item.path for item in panel.visible_items()] == [item.path for item in items]  # the run's order

    # mistakes only: the rows are exactly the hand-counted mistakes
    mistakes = [item.path for item in items if item.correct is False]
    panel.mistakes_box.click()
    assert [item.path for item in panel.visible_items()] == mistakes
    assert panel.count_label.text() == f"{len(mistakes)} of {len(items)} images shown"
    # with a filter on, Home/Next/End walk the filtered rows only (the mistakes), not the whole run
    press(qtbot, window, Qt.Key_Home)
    assert window.current == (items.index(next(i for i in items if i.path == mistakes[0])) if mistakes else 0)
    press(qtbot, window, Qt.Key_End)
    if mistakes:
        assert items[window.current].path == mistakes[-1] and not window.next_button.isEnabled()
        press(qtbot, window, Qt.Key_Left)
        assert items[window.current].path == mistakes[max(0, len(mistakes) - 2)]
    panel.mistakes_box.click()
    assert window.next_button.isEnabled()  # the whole run again
    # a class (predicted or true), then confidence below X on top of it
    panel.class_combo.setCurrentIndex(names.index("3") + 1)
    of_three = [i for i in items if "3" in (names[i.predicted_index], names[i.true_index])]
    assert len(panel.visible_items()) == len(of_three) > 0
    panel.below_box.click()
    panel.below_spin.setValue(0.9)
    assert [i.path for i in panel.visible_items()] == [i.path for i in of_three if i.probability < 0.9]
    panel.clear_button.click()
    assert panel.proxy.rowCount() == len(items) and not panel.below_box.isChecked()

    # sorting by confidence: a click on its header, then another for the other direction
    click_header(qtbot, panel.table, CONFIDENCE)
    shown = [item.probability for item in panel.visible_items()]
    assert shown == sorted(shown)
    click_header(qtbot, panel.table, CONFIDENCE)
    shown = [item.probability for item in panel.visible_items()]
    assert shown == sorted(shown, reverse=True)

    # clicking a row shows its image; the viewer's keys keep working with the table focused
    click_cell(qtbot, panel.table, panel.proxy.index(5, FILE))
    chosen = panel.visible_items()[5]
    assert window.current == items.index(chosen) and window.current_label.text().startswith("[")
    assert Path(chosen.path).name in window.current_label.text()
    press(qtbot, window, Qt.Key_Right)  # sorted by a column: Next walks the table's order
    assert items[window.current] is panel.visible_items()[6]
    assert panel.visible_items()[panel.table.currentIndex().row()] is items[window.current]  # the table follows

    # a confusion-matrix cell lists exactly its images; Clear filter brings every row back
    confusion = window.live.values["confusion"]
    assert window.confusion_view.matrix.counts == confusion.tolist()
    off_diagonal = [(t, p) for t in range(len(names)) for p in range(len(names)) if t != p and confusion[t, p] > 0]
    true, predicted = off_diagonal[0] if off_diagonal else (0, 0)
    click_cell(qtbot, window.confusion_view, window.confusion_view.matrix.index(true, predicted))
    rows = panel.visible_items()
    assert len(rows) == int(confusion[true, predicted])
    assert all((row.true_index, row.predicted_index) == (true, predicted) for row in rows)
    assert panel.cell_label.text() == f"true {names[true]}, predicted {names[predicted]}"
    panel.clear_button.click()
    assert panel.proxy.rowCount() == len(items) and panel.cell_label.text() == ""

    # thumbnails are made on demand, small, and the cache is bounded
    first = panel.proxy.index(0, THUMBNAIL)
    panel.table.scrollTo(first)
    qtbot.waitUntil(lambda: panel.proxy.data(first, Qt.DecorationRole) is not None, timeout=10_000)
    thumbnail = panel.proxy.data(first, Qt.DecorationRole)
    assert 0 < max(thumbnail.width(), thumbnail.height()) <= THUMBNAIL_SIDE
    assert len(panel.thumbnails.cache) <= panel.thumbnails.capacity


def test_per_class_bars_draw_the_metrics(qtbot, open_window, test_dir):  # noqa: F811
    window = open_window(image_dir=str(test_dir), batch_size=64)
    run_to_end(qtbot, window)
    chart = window.class_chart
    rows = window.live.per_class()
    assert chart.rows == rows and len(rows) == 10
    window.metrics_tabs.setCurrentIndex(0)
    chart.resize(400, chart.minimumSizeHint().height())
    picture = chart.grab().toImage()
    rects = chart.bar_rects()
    assert len(rects) == len(rows) * len(METRICS)
    widest = max(rect.width() / rows[row][name] for row, name, rect in rects if rows[row][name] > 0)
    colours = {name: colour for name, _, colour in METRICS}
    for row, name, rect in rects:  # each bar's length is its value on one scale, in its metric's colour
        assert rect.width() == pytest.approx(rows[row][name] * widest, abs=1e-6)
        if rect.width() > 4:
            assert picture.pixelColor(rect.center().toPoint()) == colours[name], (row, name)


@pytest.fixture(scope="module")
def small_tree(test_dir, tmp_path_factory) -> Path:  # noqa: F811
    """A labelled tree of 15 digits (classes 3, 5, 8) and one unreadable file."""
    root = tmp_path_factory.mktemp("small") / "images"
    for name in ("3", "5", "8"):
        (root / name).mkdir(parents=True)
        for source in sorted((test_dir / name).iterdir())[:5]:
            shutil.copy(source, root / name / source.name)
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    return root


@pytest.fixture(scope="module")
def infer_run(checkpoint, small_tree, tmp_path_factory) -> Path:  # noqa: F811
    """infer.py's run folder for the same tree."""
    out = tmp_path_factory.mktemp("infer")
    result = run_script("infer.py", "--weights", checkpoint, "--image_path", str(small_tree), "--save_dir", str(out),
                        "--workers", "0")
    assert result.returncode == 0, result.stderr
    (predictions,) = out.rglob(PREDICTIONS_JSON)
    return predictions.parent


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_record_writes_infer_files_and_unreadable_filter(qtbot, open_window, small_tree, infer_run, lang,  # noqa: F811
                                                         tmp_path):
    text = Text(lang)
    window = open_window(image_dir=str(small_tree), save_dir=str(tmp_path), lang=lang)
    run_to_end(qtbot, window)
    panel = window.results_panel
    # the new widgets speak the window's language
    assert panel.model.headerData(FILE, Qt.Horizontal) == text("column_file")
    assert panel.mistakes_box.text() == text("filter_mistakes") and panel.clear_button.text() == text("filter_clear")
    assert panel.class_combo.itemText(0) == text("filter_all_classes")
    assert window.metrics_tabs.tabText(0) == text("tab_chart")
    assert panel.count_label.text() == text("shown_count", shown=16, total=16)
    # unreadable only: the one broken file, named as such; it never shows under the prediction filters
    panel.unreadable_box.click()
    (broken,) = panel.visible_items()
    assert Path(broken.path).name == "broken.png"
    assert panel.proxy.index(0, 2).data() == text("table_unreadable")
    panel.unreadable_box.click()
    panel.mistakes_box.click()
    assert all(not item.error for item in panel.visible_items())
    panel.clear_button.click()

    press(qtbot, window, Qt.Key_S, Qt.ControlModifier)  # Record
    folder = Path(window.run_folder)
    ours_fields, ours = read_csv(folder / PREDICTIONS_CSV)
    theirs_fields, theirs = read_csv(infer_run / PREDICTIONS_CSV)
    assert ours_fields == theirs_fields and [r["path"] for r in ours] == [r["path"] for r in theirs]
    for mine, infer in zip(ours, theirs):
        for field in ours_fields:
            if field.endswith("_probability") and infer[field]:
                assert float(mine[field]) == pytest.approx(float(infer[field]), abs=1e-5)
            else:
                assert mine[field] == infer[field], field
    report, infer_report = (json.loads(p.read_text(encoding="utf-8"))
                            for p in (folder / PREDICTIONS_JSON, infer_run / PREDICTIONS_JSON))
    assert set(report) == set(infer_report) and set(report["metrics"]) == set(infer_report["metrics"])
    for name, value in infer_report["metrics"].items():
        if isinstance(value, float):
            assert report["metrics"][name] == pytest.approx(value, abs=1e-5), name
        elif name != "per_class":
            assert report["metrics"][name] == value, name
    assert report["metrics"]["top1"] == pytest.approx(window.live.values["top1"], abs=1e-6)
    assert report["unreadable"] == infer_report["unreadable"] and report["count"] == 16
    (fields, per_class), (infer_fields, infer_per_class) = read_csv(folder / PER_CLASS_CSV), read_csv(infer_run / PER_CLASS_CSV)
    assert fields == infer_fields and [r["class"] for r in per_class] == [r["class"] for r in infer_per_class]
    assert [r["support"] for r in per_class] == [r["support"] for r in infer_per_class]


def test_thumbnail_of_a_large_jpeg_keeps_its_shape_and_colours(tmp_path):
    """A 12 MP-class photo is read at a reduced size for its thumbnail (utils.data.read_rgb's
    min_size) and still fills the thumbnail side with the photo's aspect ratio and colours."""
    import cv2
    import numpy as np

    from ui_classification.results_table import make_thumbnail

    photo = np.zeros((1536, 2048, 3), np.uint8)
    photo[:, :1024] = (200, 30, 30)  # left half red, right half blue (RGB)
    photo[:, 1024:] = (30, 30, 200)
    path = tmp_path / "large photo é.jpg"
    cv2.imencode(".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))[1].tofile(str(path))
    thumbnail = make_thumbnail(str(path), THUMBNAIL_SIDE)
    assert (thumbnail.width(), thumbnail.height()) == (THUMBNAIL_SIDE, round(THUMBNAIL_SIDE * 0.75))
    left, right = thumbnail.pixelColor(2, 2), thumbnail.pixelColor(thumbnail.width() - 3, 2)
    assert left.red() > 150 and left.blue() < 80 and right.blue() > 150 and right.red() < 80
