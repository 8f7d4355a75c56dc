"""Is the viewer responsive while it classifies thousands of images? Measures event-loop stalls.

A 10 ms QTimer in the GUI thread records how late each tick comes; a late tick is a frozen window.
Three rows, measured in the same process:
    idle          the open window doing nothing (baseline: what the timer itself jitters)
    worker run    Run over the folder, classification in the viewer's QThread worker
    GUI thread    the same Predictor over the same folder, called in the GUI thread (a naive viewer)

    QT_QPA_PLATFORM=offscreen python bench/bench_ui.py --weights logs/<run>/best.pth --copies 10
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

from PyQt5.QtCore import QElapsedTimer, QTimer  # noqa: E402
from PyQt5.QtWidgets import QApplication  # noqa: E402

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
    deadline = time.perf_counter() + timeout_s
    while not condition() and time.perf_counter() < deadline:
        app.processEvents()
        time.sleep(0.001)


def build_folder(root: Path, copies: int) -> Path:
    """`copies` copies of the digits test split (270 real images each), in class folders."""
    digits = make_digits_dataset(root / "digits") / "test"
    folder = root / "many"
    for k in range(copies):
        for path in list_images(digits):
            target = folder / Path(path).parent.name / f"{k}_{Path(path).name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--copies", type=int, default=10, help="copies of the 270 digits test images")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    app = QApplication(sys.argv[:1])
    with tempfile.TemporaryDirectory() as temp:
        folder = build_folder(Path(temp), args.copies)
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

        meter.start()
        started = time.perf_counter()
        window.start_run()
        spin(app, lambda: not window.running, 3600)
        rows.append(("worker run", count, time.perf_counter() - started, meter.stop()))

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

    print(f"{count} images, batch {args.batch_size}, device {args.device}, timer every {TICK_MS} ms")
    print(f"{'mode':<20} {'images':>7} {'seconds':>8} {'max stall ms':>13} {'p99 stall ms':>13}")
    for name, images, seconds, stall in rows:
        print(f"{name:<20} {images:>7} {seconds:>8.1f} {stall['max']:>13.0f} {stall['p99']:>13.0f}")


if __name__ == "__main__":
    main()
