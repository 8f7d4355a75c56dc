"""Is the viewer responsive while it classifies thousands of images? Measures event-loop stalls,
then the time one Right key takes on large photos.

A 10 ms QTimer in the GUI thread records how late each tick comes; a late tick is a frozen window.
Three rows, measured in the same process:
    idle          the open window doing nothing (baseline: what the timer itself jitters)
    worker run    Run over the folder, classification in the viewer's QThread worker; the results
                  table fills batch by batch, sorted by confidence (its costliest state), with
                  its thumbnails made as rows are drawn
    GUI thread    the same Predictor over the same folder, called in the GUI thread (a naive viewer)

Then Next (the Right key) through 12 MP photos (made up, or your own with --photo_dir), the window
at its default size or --window's: the time from the key to the picture painted, with each photo decoded at the size
the view shows it (a reduced JPEG decode) against decoding it in full (the viewer before), the two
alternated round by round.

    QT_QPA_PLATFORM=offscreen python bench/bench_ui.py --weights logs/<run>/best.pth --images 5000
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.memory import let_waiting_threads_sleep  # noqa: E402

let_waiting_threads_sleep()  # as runui.py does, before torch loads OpenMP

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchlib import machine_description, photo_like  # noqa: E402
from PIL import Image  # noqa: E402
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


def write_photos(folder: Path, count: int, height: int, width: int) -> Path:
    """`count` photo-like JPEGs (quality 90) of height x width, every other one turned portrait."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for index in range(count):
        size = (height, width) if index % 2 else (width, height)
        bgr = cv2.cvtColor(photo_like(rng, *size), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(folder / f"photo_{index:03d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def time_keys(app: QApplication, window: ViewerWindow, full_decode: bool) -> list[float]:
    """Milliseconds per Next, from the key to the picture painted, over the whole run's images."""
    # in full: a min_size as large as the image, which read_rgb may not reduce (the viewer before)
    window._display_min_size = (lambda height, width: [height, width]) if full_decode else \
        functools.partial(ViewerWindow._display_min_size, window)
    window.show_first()
    times = []
    for _ in range(len(window.predictions) - 1):
        started = time.perf_counter()
        window.show_next()
        window.image_view.viewport().repaint()
        app.processEvents()
        times.append(1000 * (time.perf_counter() - started))
    return times


def step_through_photos(app: QApplication, args: argparse.Namespace, temp: Path) -> None:
    folder = Path(args.photo_dir) if args.photo_dir else write_photos(temp / "photos", args.photos, *args.photo_size)
    window = ViewerWindow(ViewerOptions(weights=args.weights, image_dir=str(folder), device=args.device))
    if args.window:
        window.resize(*args.window)
    window.show()
    spin(app, lambda: window.model_info is not None, 120)
    window.start_run()
    spin(app, lambda: not window.running, 3600)
    samples: dict[bool, list[float]] = {False: [], True: []}
    for round_index in range(args.rounds):
        for full_decode in (False, True) if round_index % 2 == 0 else (True, False):
            samples[full_decode] += time_keys(app, window, full_decode)
    view = window.image_view.viewport().size()
    shown = window.predictions[window.current]
    window.shutdown()
    width, height = Image.open(shown.path).size
    print(f"\nNext through {len(window.predictions)} photos ({height} x {width} or turned) in a "
          f"{view.width()} x {view.height()} view, {args.rounds} alternated rounds")
    print(f"{'decode':<22} {'keys':>5} {'median ms':>10} {'p90 ms':>7} {'max ms':>7}")
    for full_decode, name in ((True, "in full (before)"), (False, "for the screen")):
        times = sorted(samples[full_decode])
        print(f"{name:<22} {len(times):>5} {np.median(times):>10.0f} {times[int(0.9 * (len(times) - 1))]:>7.0f} "
              f"{times[-1]:>7.0f}")
    print(f"median key, in full / for the screen: {np.median(samples[True]) / np.median(samples[False]):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", type=int, default=5000, help="images in the run (copies of the 270 digits test images)")
    parser.add_argument("--copies", type=int, default=None, help="instead of --images: copies of the 270 digits test images")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--photos", type=int, default=12, help="made-up photos to step through (0: skip that part)")
    parser.add_argument("--photo_size", type=int, nargs=2, default=(3024, 4032), metavar=("H", "W"))
    parser.add_argument("--photo_dir", help="step through your own photos instead")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over the photos, alternating the decodes")
    parser.add_argument("--window", type=int, nargs=2, metavar=("W", "H"), help="window size for the photos")
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    app = QApplication(sys.argv[:1])
    # The GUI thread's torch threads are fixed at its first torch call. Made now, before the worker's
    # decode threads lower the default for threads that start later (inference/decoding.py), the naive
    # row gets every core, as a viewer that classified in its GUI thread would (it got one).
    torch.get_num_threads()
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
    if args.photos or args.photo_dir:
        with tempfile.TemporaryDirectory() as temp:
            step_through_photos(app, args, Path(temp))


if __name__ == "__main__":
    main()
