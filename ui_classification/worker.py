"""The inference worker: lives in its own QThread and owns the model for the window's lifetime.

The window asks it to load a checkpoint or run a folder with queued signals. Stop and pause go
through the run's own thread-safe events, which the worker checks between batches (its thread
is busy inside `run`); a fresh pair per run means a stop can never leak into the next run.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch
from PyQt5.QtCore import QObject, pyqtSignal, pyqtSlot

from inference.predictor import PredictionBatch, Predictor
from ui_classification.annotate import annotate, save_annotated
from ui_classification.results import TOP_K, ImagePrediction, predictions_from_batch
from ui_classification.strings import Text
from utils.data import ImageReadError, available_cores, read_rgb
from utils.errors import UsageError

PAUSE_POLL_SECONDS = 0.05


@contextlib.contextmanager
def one_core_for_the_window(device: object) -> Iterator[None]:
    """The CPU forward pass on every core but one, which the window's thread keeps, then restore.

    With every core in torch's OpenMP team, each wake-up of the GUI thread (a timer, a repaint)
    deschedules a team member that the others wait for at every layer: bench/bench_ui.py's
    500-image run took 16.5 s instead of 2.6 s on a loaded 2-core machine (cf. predictor._cpu_share).
    """
    if getattr(device, "type", str(device)) != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, available_cores() - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class ModelInfo:
    """What the window needs to know about the loaded model (the model itself stays in the worker)."""

    checkpoint: str
    model_name: str
    class_names: list[str]
    device: str
    temperature: float = 1.0  # Predictor.temperature: what predictions.json reports with the metrics


def _running_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class RunJob:
    """One Run: the files, and the controls the window uses while the worker is busy with it."""

    paths: list[str]
    batch_size: int
    save_dir: Optional[str] = None  # annotated copies go here when set
    labels: Optional[dict] = None  # {path: true class index} when the folder is a labelled tree
    stop_requested: threading.Event = field(default_factory=threading.Event)
    not_paused: threading.Event = field(default_factory=_running_event)

    def stop(self) -> None:
        self.stop_requested.set()

    def pause(self) -> None:
        self.not_paused.clear()

    def resume(self) -> None:
        self.not_paused.set()

    def may_continue(self) -> bool:
        """Blocks while paused; False once a stop was requested."""
        while not self.not_paused.wait(PAUSE_POLL_SECONDS):
            if self.stop_requested.is_set():
                return False
        return not self.stop_requested.is_set()


class InferenceWorker(QObject):
    loaded = pyqtSignal(object)  # ModelInfo
    load_failed = pyqtSignal(str, str)  # checkpoint path, reason
    batch_done = pyqtSignal(object)  # list[ImagePrediction]
    run_finished = pyqtSignal(bool)  # True: every image classified; False: stopped
    run_failed = pyqtSignal(str)

    def __init__(self, text: Text, **checkpoint_options: object):
        super().__init__()
        self.text = text
        self.checkpoint_options = checkpoint_options  # Predictor.from_file's model_name, class_names, input_shape
        self.predictor: Optional[Predictor] = None

    @pyqtSlot(str, str)
    def load(self, path: str, device: str) -> None:
        try:
            predictor = Predictor.from_file(path, device=device, **self.checkpoint_options)  # .pth, or .onnx
        except UsageError as error:
            self.load_failed.emit(path, str(error))
            return
        except Exception as error:  # model/torch errors a user's file can still trigger; the window lives on
            self.load_failed.emit(path, f"{type(error).__name__}: {error}")
            return
        self.predictor = predictor  # replaced only once the new one loaded: a bad file keeps the old model
        self.loaded.emit(ModelInfo(path, predictor.model_name, predictor.class_names, str(predictor.device),
                                   predictor.temperature))

    @pyqtSlot(object)
    def run(self, job: RunJob) -> None:
        try:
            with one_core_for_the_window(self.predictor.device if self.predictor else "cpu"):
                completed = self._classify(job)
        except Exception as error:  # e.g. out of memory: end this run and report it, keep the window
            self.run_failed.emit(f"{type(error).__name__}: {error}")
            return
        self.run_finished.emit(completed)

    def _classify(self, job: RunJob) -> bool:
        if self.predictor is None:
            raise RuntimeError("run requested before a model was loaded")
        batches: Iterator[PredictionBatch] = self.predictor.predict_paths(job.paths, job.batch_size)
        while job.may_continue():
            batch = next(batches, None)
            if batch is None:
                return True
            items = predictions_from_batch(batch, self.predictor.class_names, job.labels, TOP_K)
            if job.save_dir:
                self._save_annotated(items, job.save_dir)
            self.batch_done.emit(items)
        return False

    def _save_annotated(self, items: list[ImagePrediction], folder: str) -> None:
        for item in items:
            if item.error:
                continue
            try:
                array = read_rgb(item.path)
            except ImageReadError:  # changed on disk since it was classified: saved_path stays empty
                continue
            image = annotate(array, item, self.predictor.class_names, self.text)
            item.saved_path = save_annotated(image, folder, item.path)
