"""The inference worker: lives in its own QThread and owns the model for the window's lifetime.

The window asks it to load a checkpoint or run a folder with queued signals. Stop and pause go
through the run's own thread-safe events, which the worker checks between batches (its thread
is busy inside `run`); a fresh pair per run means a stop can never leak into the next run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from PyQt5.QtCore import QObject, pyqtSignal, pyqtSlot

from inference.cam import HeatMaps, find_target_layer, overlay_on_original
from inference.options import resolve_min_confidence
from inference.predictor import PredictionBatch, Predictor
from ui_classification.annotate import annotate, save_annotated
from ui_classification.results import TOP_K, ImagePrediction, predictions_from_batch
from ui_classification.strings import Text
from utils.data import ImageReadError, read_rgb
from utils.errors import UsageError

PAUSE_POLL_SECONDS = 0.05


@dataclass
class ModelInfo:
    """What the window needs to know about the loaded model (the model itself stays in the worker)."""

    checkpoint: str
    model_name: str
    class_names: list[str]
    device: str
    temperature: float = 1.0  # Predictor.temperature: what predictions.json reports with the metrics
    backend: str = "torch"  # or "onnxruntime" (Predictor.backend.name): no layers, so no heat maps
    heat_map_problem: str = ""  # why heat maps cannot be drawn for this model ("" when they can)
    min_confidence: Optional[float] = None  # --min_confidence resolved for this checkpoint ("auto" read from it)
    min_confidence_problem: str = ""  # why --min_confidence auto found no threshold in it


@dataclass
class HeatMapRequest:
    path: str
    class_index: int  # the predicted class, whose heat map is drawn


@dataclass
class HeatMap:
    """The answer to a HeatMapRequest: the original image with the heat map blended on where the model
    looked (what infer.py --cam writes to cam/<name>.jpg), or why there is none."""

    request: HeatMapRequest
    overlay: Optional[np.ndarray] = None  # RGB uint8: the original image (at most 2048 px a side)
    error: str = ""
    thread_id: int = 0  # the thread that computed it (never the window's)


class PendingHeatMap:
    """The one heat map the window waits for. A newer request replaces an older one, so keys held
    down never queue up work; the worker takes it when idle, or between two batches of a run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._request: Optional[HeatMapRequest] = None

    def put(self, request: HeatMapRequest) -> None:
        with self._lock:
            self._request = request

    def take(self) -> Optional[HeatMapRequest]:
        with self._lock:
            request, self._request = self._request, None
        return request


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
    min_confidence: Optional[float] = None  # below it the answer is "unknown"
    stop_requested: threading.Event = field(default_factory=threading.Event)
    not_paused: threading.Event = field(default_factory=_running_event)

    def stop(self) -> None:
        self.stop_requested.set()

    def pause(self) -> None:
        self.not_paused.clear()

    def resume(self) -> None:
        self.not_paused.set()

    def may_continue(self, while_paused: Callable[[], None] = lambda: None) -> bool:
        """Blocks while paused, calling `while_paused` between polls; False once a stop was requested."""
        while not self.not_paused.wait(PAUSE_POLL_SECONDS):
            if self.stop_requested.is_set():
                return False
            while_paused()
        return not self.stop_requested.is_set()


class InferenceWorker(QObject):
    loaded = pyqtSignal(object)  # ModelInfo
    heat_map_ready = pyqtSignal(object)  # HeatMap
    load_failed = pyqtSignal(str, str)  # checkpoint path, reason
    batch_done = pyqtSignal(object)  # list[ImagePrediction]
    run_finished = pyqtSignal(bool)  # True: every image classified; False: stopped
    run_failed = pyqtSignal(str)

    def __init__(self, text: Text, cam_method: str = "gradcam", cam_layer: Optional[str] = None,
                 min_confidence: Optional[str] = None, **checkpoint_options: object):
        super().__init__()
        self.text = text
        self.checkpoint_options = checkpoint_options  # Predictor.from_file's model_name, class_names, input_shape
        self.cam_method, self.cam_layer = cam_method, cam_layer
        self.min_confidence = min_confidence  # --min_confidence as given: None, "auto" or a number
        self.predictor: Optional[Predictor] = None
        self.pending_heat_map = PendingHeatMap()

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
        import torchmetrics.classification  # noqa: F401  (here, not in the window's thread at its first batch: ~1 s)

        self.loaded.emit(self._describe(path, predictor))

    def _describe(self, path: str, predictor: Predictor) -> ModelInfo:
        info = ModelInfo(path, predictor.model_name, predictor.class_names, str(predictor.device),
                         predictor.temperature, predictor.backend.name)
        if predictor.model is not None:
            try:  # a wrong --cam_layer is named now, not at the first heat map
                find_target_layer(predictor.model, predictor.model_name, self.cam_layer,
                                  predictor.preprocess.input_size, predictor.device)
            except UsageError as error:
                info.heat_map_problem = str(error)
        try:
            info.min_confidence = resolve_min_confidence(self.min_confidence, predictor.checkpoint_info, path)
        except UsageError as error:  # auto, and this checkpoint has no threshold: answer every image
            info.min_confidence_problem = str(error)
        return info

    @pyqtSlot()
    def serve_heat_map(self) -> None:
        """The pending heat map, if any (the window asks through a queued signal; during a run
        `_classify` serves it between batches, as this slot waits until the run ends)."""
        request = self.pending_heat_map.take()
        if request is not None and self.predictor is not None:
            self.heat_map_ready.emit(self._heat_map(request))

    def _heat_map(self, request: HeatMapRequest) -> HeatMap:
        try:
            overlay = heat_map_overlay(self.predictor, read_rgb(request.path), request.class_index, self.cam_method,
                                       self.cam_layer)
        except (ImageReadError, UsageError) as error:
            return HeatMap(request, error=str(error), thread_id=threading.get_ident())
        except Exception as error:  # torch errors a user's model can still trigger: reported, the window lives on
            return HeatMap(request, error=f"{type(error).__name__}: {error}", thread_id=threading.get_ident())
        return HeatMap(request, overlay, thread_id=threading.get_ident())

    @pyqtSlot(object)
    def run(self, job: RunJob) -> None:
        try:
            completed = self._classify(job)  # on every core: runui.py lets OpenMP's idle threads sleep
        except Exception as error:  # e.g. out of memory: end this run and report it, keep the window
            self.run_failed.emit(f"{type(error).__name__}: {error}")
            return
        self.run_finished.emit(completed)

    def _classify(self, job: RunJob) -> bool:
        if self.predictor is None:
            raise RuntimeError("run requested before a model was loaded")
        batches: Iterator[PredictionBatch] = self.predictor.predict_paths(job.paths, job.batch_size)
        while job.may_continue(while_paused=self.serve_heat_map):  # a paused run still draws heat maps
            self.serve_heat_map()  # the image the user looks at comes before the rest of the folder
            batch = next(batches, None)
            if batch is None:
                return True
            items = predictions_from_batch(batch, self.predictor.class_names, job.labels, TOP_K, job.min_confidence)
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


def heat_map_overlay(predictor: Predictor, array: np.ndarray, class_index: int, method: str,
                     layer: Optional[str]) -> np.ndarray:
    """The original RGB image with the heat map of `class_index` on it, by inference.cam, as
    infer.py --cam draws cam/<name>.jpg. The hooks come off the model again at once."""
    view = predictor.transform(torch.from_numpy(array).permute(2, 0, 1))
    heat = HeatMaps(predictor.model, predictor.model_name, predictor.preprocess, predictor.device, method, layer)
    try:
        (heat_map,) = heat(view.unsqueeze(0), [class_index])
    finally:
        heat.release()
        predictor.model.zero_grad(set_to_none=True)  # the backward pass left a gradient per weight: free it
    return overlay_on_original(array, heat_map, predictor.preprocess)
