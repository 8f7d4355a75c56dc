"""Is the viewer responsive while it classifies thousands of images? Measures event-loop stalls.

A 10 ms QTimer in the GUI thread records how late each tick comes; a late tick is a frozen window.
Three rows, measured in the same process:
    idle          the open window doing nothing (baseline: what the timer itself jitters)
    worker run    Run over the folder, classification in the viewer's QThread worker; the results
                  table fills batch by batch, sorted by confidence (its costliest state), with
                  its thumbnails made as rows are drawn
    GUI thread    the same Predictor over the same folder, called in the GUI thread (a naive viewer)

    QT_QPA_PLATFORM=offscreen python bench/bench_ui.py --weights logs/<run>/best.pth --images 5000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import machine_description  # noqa: E402
from PyQt5.QtCore import QElapsedTimer, QEventLoop, Qt, QTimer  # noqa: E402
from PyQt5.QtWidgets import QApplication  # noqa: E402

from ui_classification.results_table import CONFIDENCE  # noqa: E402
from ui_classification.window import ViewerOptions, ViewerWindow  # noqa: E402
from utils.demo import make_digits_dataset  # noqa: E402
from utils.files import list_images  # noqa: E402

TICK_MS = 10


class StallMeter:
    """Records the gaps between the ticks of a TICK_MS timer."""

    def __init__(self):
        self.clock = QElapsedTimer()
        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self.gaps: list[float] = []

    def start(self) -> None:
        self.gaps = []
        self.clock.start()
        self.timer.start()

    def _tick(self) -> None:
        self.gaps.append(self.clock.restart())

    def stop(self) -> dict:
        self.timer.stop()
        gaps = sorted(self.gaps) or [0.0]
        return {"max": gaps[-1], "p99": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], "ticks": len(self.gaps)}


def spin(app: QApplication, condition, timeout_s: float) -> None:
    """Run the event loop until `condition()` (checked every 20 ms) or the timeout. The GUI thread
    sleeps between events as in the real app; a processEvents() polling loop would instead fight the
    worker for the GIL and slow the run down (several times over on a loaded machine)."""
    if condition():
        return
    loop = QEventLoop()
    check = QTimer()
    check.setInterval(20)
    check.timeout.connect(lambda: condition() and loop.quit())
    check.start()
    QTimer.singleShot(int(timeout_s * 1000), loop.quit)
    loop.exec_()
    check.stop()


def build_folder(root: Path, count: int) -> Path:
    """`count` real images: copies of the digits test split (270 images) in class folders."""
    digits = list_images(make_digits_dataset(root / "digits") / "test")
    folder = root / "many"
    for k in range(count):
        path = Path(digits[k % len(digits)])
        target = folder / path.parent.name / f"{k // len(digits)}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", type=int, default=5000, help="images in the run (copies of the 270 digits test images)")
    parser.add_argument("--copies", type=int, default=None, help="instead of --images: copies of the 270 digits test images")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    app = QApplication(sys.argv[:1])
    with tempfile.TemporaryDirectory() as temp:
        folder = build_folder(Path(temp), args.copies * 270 if args.copies else args.images)
        count = len(list_images(folder))
        window = ViewerWindow(ViewerOptions(weights=args.weights, image_dir=str(folder), device=args.device,
                                            batch_size=args.batch_size))
        window.show()
        spin(app, lambda: window.model_info is not None, 120)
        meter, rows = StallMeter(), []

        meter.start()
        started = time.perf_counter()
        spin(app, lambda: time.perf_counter() - started > 3, 3)
        rows.append(("idle (baseline)", 0, time.perf_counter() - started, meter.stop()))

        table = window.results_panel.table
        table.sortByColumn(CONFIDENCE, Qt.AscendingOrder)  # rows land in sorted places as batches arrive
        meter.start()
        started = time.perf_counter()
        window.start_run()
        spin(app, lambda: not window.running, 3600)
        rows.append(("worker run", count, time.perf_counter() - started, meter.stop()))
        table_rows = window.results_panel.proxy.rowCount()
        thumbnails = len(window.results_panel.thumbnails.cache)

        predictor = window.worker.predictor  # only for the naive row; the viewer never does this
        paths = list_images(folder)
        finished: list[float] = []

        def classify_in_gui_thread() -> None:
            for _ in predictor.predict_paths(paths, args.batch_size):
                pass
            finished.append(time.perf_counter())

        meter.start()
        started = time.perf_counter()
        QTimer.singleShot(0, classify_in_gui_thread)
        spin(app, lambda: bool(finished), 3600)
        spin(app, lambda: time.perf_counter() - finished[0] > 0.1, 1)  # let the overdue tick land
        rows.append(("GUI thread (naive)", count, finished[0] - started, meter.stop()))
        window.shutdown()

    print(machine_description())
    print(f"{count} images, batch {args.batch_size}, device {args.device}, timer every {TICK_MS} ms")
    print(f"results table after the run: {table_rows} rows (sorted by confidence), {thumbnails} thumbnails made")
    print(f"{'mode':<20} {'images':>7} {'seconds':>8} {'max stall ms':>13} {'p99 stall ms':>13}")
    for name, images, seconds, stall in rows:
        print(f"{name:<20} {images:>7} {seconds:>8.1f} {stall['max']:>13.0f} {stall['p99']:>13.0f}")


if __name__ == "__main__":
    main()
