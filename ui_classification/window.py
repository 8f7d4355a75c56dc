"""The viewer window: pick a checkpoint and a folder, Run, browse the predictions, watch the metrics.

Everything slow happens in the InferenceWorker's thread; the window only reads the one image it
shows. Dialogs sit behind small methods (choose_*, confirm) and the setters they call (set_*)
are public, so tests drive the real window without clicking through file dialogs. Messages go
through `show_message`, which keeps the last one in `last_message` and never blocks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

from PyQt5.QtCore import Qt, QThread, QTimer, pyqtSignal
from PyQt5.QtGui import QCloseEvent, QFont, QImage, QKeySequence, QPixmap, QResizeEvent
from PyQt5.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QShortcut,
    QSizePolicy,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from ui_classification.annotate import annotate, to_qimage
from ui_classification.results import ImagePrediction, LiveMetrics, export_records, folder_labels
from ui_classification.strings import Text
from ui_classification.worker import InferenceWorker, ModelInfo, RunJob
from utils.data import ImageReadError, read_rgb
from utils.files import IMAGE_EXTENSIONS, list_images

TITLE_CLASSES_SHOWN = 8
LOG_LINES_KEPT_ON_SCREEN = 5000  # the full log is still kept for Record


@dataclass
class ViewerOptions:
    weights: Optional[str] = None
    image_dir: Optional[str] = None
    save_dir: Optional[str] = None
    title: Optional[str] = None
    lang: str = "en"
    device: str = "auto"
    batch_size: int = 32
    interval: float = 1.0  # autoplay seconds per image


class ImageView(QLabel):
    """A picture scaled to the available space, keeping its aspect ratio, re-fitted on resize."""

    def __init__(self, placeholder: str):
        super().__init__(placeholder)
        self.source: Optional[QPixmap] = None
        self.setAlignment(Qt.AlignCenter)
        self.setWordWrap(True)
        self.setMinimumSize(240, 180)
        self.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Ignored)  # the picture must not grow the window
        self.setStyleSheet("background-color: #202124; color: #e8eaed;")

    def set_image(self, image: QImage) -> None:
        self.source = QPixmap.fromImage(image)
        self._refit()

    def set_placeholder(self, text: str) -> None:
        self.source = None
        self.setPixmap(QPixmap())
        self.setText(text)

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self._refit()

    def _refit(self) -> None:
        if self.source is not None:
            self.setPixmap(self.source.scaled(self.size(), Qt.KeepAspectRatio, Qt.SmoothTransformation))


class ViewerWindow(QMainWindow):
    request_load = pyqtSignal(str, str)  # checkpoint, device -> worker
    request_run = pyqtSignal(object)  # RunJob -> worker

    def __init__(self, options: ViewerOptions):
        super().__init__()
        self.options = options
        self.text = Text(options.lang)
        self.model_info: Optional[ModelInfo] = None
        self.loading_checkpoint: Optional[str] = None
        self.image_dir = options.image_dir
        self.save_dir = options.save_dir
        self.predictions: list[ImagePrediction] = []  # readable images of the current run, in order
        self.run_items: list[ImagePrediction] = []  # every image of the current run, unreadable ones too
        self.run_labelled = False  # the run's folder is a labelled tree (inference.inputs.find_labels)
        self.current = -1
        self.live: Optional[LiveMetrics] = None
        self.job: Optional[RunJob] = None  # set while a run is active
        self.stopping = False
        self.paused = False
        self.log_lines: list[str] = []
        self.last_message: Optional[str] = None
        self.message_box: Optional[QMessageBox] = None
        self._build_widgets()
        self._build_layout()
        self._start_worker()
        self._bind_keys()
        self.autoplay_timer = QTimer(self)
        self.autoplay_timer.timeout.connect(self._autoplay_step)
        self.interval_box.setValue(options.interval)
        self._apply_interval()
        self.set_title(options.title or self.text("window_title_loading"))
        self.resize(1280, 820)
        self._refresh_labels()
        if options.weights:
            self.set_checkpoint(options.weights)
        self.update_controls()

    # ---- construction
    def _button(self, key: str, slot, checkable: bool = False) -> QPushButton:
        button = QPushButton(self.text(key))
        button.setFocusPolicy(Qt.NoFocus)  # Space and arrows belong to the viewer shortcuts
        button.setCheckable(checkable)
        (button.toggled if checkable else button.clicked).connect(slot)
        return button

    def _build_widgets(self) -> None:
        t = self.text
        self.checkpoint_button = self._button("choose_checkpoint", self.choose_checkpoint)
        self.images_button = self._button("choose_images", self.choose_image_dir)
        self.save_button = self._button("choose_save", self.choose_save_dir)
        self.run_button = self._button("run", self.toggle_run)
        self.previous_button = self._button("previous", self.show_previous)
        self.next_button = self._button("next", self.show_next)
        self.autoplay_button = self._button("autoplay", self._on_autoplay_toggled, checkable=True)
        self.pause_button = self._button("pause", self.toggle_pause)
        self.record_button = self._button("record", self.record)
        self.exit_button = self._button("exit", self.close)
        self.interval_box = QDoubleSpinBox()
        self.interval_box.setRange(0.05, 3600.0)
        self.interval_box.setDecimals(2)
        self.interval_box.setSingleStep(0.5)
        self.interval_box.setSuffix(t("interval_suffix"))
        self.interval_box.setToolTip(t("interval_tip"))
        self.interval_box.valueChanged.connect(self._apply_interval)
        self.checkpoint_label, self.images_label, self.save_label = QLabel(), QLabel(), QLabel()
        for label in (self.checkpoint_label, self.images_label, self.save_label):
            label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)  # long paths must not widen the window
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.title_label = QLabel()  # the title again inside the window, where screenshots and full-screen show it
        self.title_label.setStyleSheet("font-size: 16px; font-weight: bold;")
        self.image_view = ImageView(t("no_image"))
        self.current_label, self.topk_label = QLabel(), QLabel()
        for label in (self.current_label, self.topk_label):
            label.setAlignment(Qt.AlignTop | Qt.AlignLeft)
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
            label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        self.topk_label.setFont(QFont("DejaVu Sans Mono", 10))
        self.verdict_label = QLabel()
        self.metrics_view = self._text_panel()
        self.log_view = self._text_panel()
        self.log_view.setMaximumBlockCount(LOG_LINES_KEPT_ON_SCREEN)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m")

    @staticmethod
    def _text_panel() -> QPlainTextEdit:
        panel = QPlainTextEdit()
        panel.setReadOnly(True)
        panel.setFocusPolicy(Qt.NoFocus)
        panel.setFont(QFont("DejaVu Sans Mono", 9))
        return panel

    def _build_layout(self) -> None:
        t = self.text
        controls = QHBoxLayout()
        for widget in (self.checkpoint_button, self.images_button, self.save_button, self.run_button,
                       self.previous_button, self.next_button, self.autoplay_button, self.interval_box,
                       self.pause_button, self.record_button, self.exit_button):
            controls.addWidget(widget)
        paths = QVBoxLayout()
        paths.setSpacing(0)
        for label in (self.checkpoint_label, self.images_label, self.save_label):
            paths.addWidget(label)
        summary = QVBoxLayout()
        summary.addWidget(self.current_label)
        summary.addWidget(self.verdict_label)
        summary.addStretch(1)
        current = QGroupBox(t("current_title"))
        current_layout = QHBoxLayout(current)
        current_layout.addLayout(summary, 3)
        current_layout.addWidget(self.topk_label, 2)
        image_column = QVBoxLayout()
        image_column.setContentsMargins(0, 0, 0, 0)
        image_column.addWidget(self.image_view, 1)
        image_column.addWidget(current)
        image_panel = QWidget()
        image_panel.setLayout(image_column)
        top = QSplitter(Qt.Horizontal)
        top.addWidget(image_panel)
        top.addWidget(self._group(t("metrics_title"), self.metrics_view, self.progress))
        top.setSizes([880, 400])
        body = QSplitter(Qt.Vertical)
        body.addWidget(top)
        body.addWidget(self._group(t("log_title"), self.log_view))
        body.setSizes([640, 120])
        outer = QVBoxLayout()
        outer.addWidget(self.title_label)
        outer.addLayout(controls)
        outer.addLayout(paths)
        outer.addWidget(body, 1)
        central = QWidget()
        central.setLayout(outer)
        self.setCentralWidget(central)

    @staticmethod
    def _group(title: str, *widgets: QWidget) -> QGroupBox:
        box = QGroupBox(title)
        layout = QVBoxLayout(box)
        for widget in widgets:
            layout.addWidget(widget)
        return box

    def _start_worker(self) -> None:
        self.worker_thread = QThread(self)
        self.worker = InferenceWorker(self.text)
        self.worker.moveToThread(self.worker_thread)
        self.request_load.connect(self.worker.load)
        self.request_run.connect(self.worker.run)
        self.worker.loaded.connect(self._on_loaded)
        self.worker.load_failed.connect(self._on_load_failed)
        self.worker.batch_done.connect(self._on_batch)
        self.worker.run_finished.connect(self._on_run_finished)
        self.worker.run_failed.connect(self._on_run_failed)
        self.worker_thread.start()

    def _bind_keys(self) -> None:
        for key, slot in ((Qt.Key_Right, self.show_next), (Qt.Key_Left, self.show_previous),
                          (Qt.Key_Space, self.toggle_pause)):
            QShortcut(QKeySequence(key), self, slot)

    # ---- state shown in the controls
    @property
    def running(self) -> bool:
        return self.job is not None

    @property
    def autoplaying(self) -> bool:
        return self.autoplay_button.isChecked()

    def update_controls(self) -> None:
        idle = not self.running
        for button in (self.checkpoint_button, self.images_button, self.save_button):
            button.setEnabled(idle)
        self.run_button.setText(self.text("stopping" if self.stopping else "run" if idle else "stop"))
        self.run_button.setEnabled(not self.stopping)
        self.previous_button.setEnabled(self.current > 0)
        self.next_button.setEnabled(self.current + 1 < len(self.predictions))
        self.autoplay_button.setEnabled(bool(self.predictions) or self.running)
        self.pause_button.setEnabled(self.running or self.autoplaying)
        self.pause_button.setText(self.text("resume" if self.paused else "pause"))
        self.record_button.setEnabled(bool(self.predictions))

    def _refresh_labels(self) -> None:
        t = self.text
        checkpoint = self.loading_checkpoint or (self.model_info.checkpoint if self.model_info else None)
        self.checkpoint_label.setText(t("checkpoint_label", path=checkpoint or t("not_set")))
        self.images_label.setText(t("images_label", path=self.image_dir or t("not_set")))
        self.save_label.setText(t("save_label", path=self.save_dir or t("not_set")))
        for label in (self.checkpoint_label, self.images_label, self.save_label):
            label.setToolTip(label.text())

    def set_title(self, title: str) -> None:
        self.setWindowTitle(title)
        self.title_label.setText(title)

    def default_title(self, info: ModelInfo) -> str:
        shown = info.class_names[:TITLE_CLASSES_SHOWN]
        classes = ", ".join(shown) + (", …" if len(info.class_names) > len(shown) else "")
        return self.text("window_title", model=info.model_name, count=len(info.class_names), classes=classes)

    # ---- messages and logging
    def log(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')}  {message}"
        self.log_lines.append(line)
        self.log_view.appendPlainText(line)

    def show_message(self, message: str) -> None:
        """Tell the user about a problem without blocking: logged, kept in last_message, shown non-modal."""
        self.last_message = message
        self.log(self.text("log_error", message=message))
        box = QMessageBox(QMessageBox.Warning, self.text("title_error"), message, QMessageBox.Ok, self)
        box.setWindowModality(Qt.NonModal)
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.show()
        self.message_box = box

    def confirm(self, question: str) -> bool:
        answer = QMessageBox.question(self, self.text("title_confirm"), question,
                                      QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        return answer == QMessageBox.Yes

    # ---- choosing paths (dialogs -> setters)
    def choose_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, self.text("dialog_checkpoint"), "",
                                              self.text("dialog_checkpoint_filter"))
        if path:
            self.set_checkpoint(path)

    def choose_image_dir(self) -> None:
        path = QFileDialog.getExistingDirectory(self, self.text("dialog_images"), self.image_dir or "")
        if path:
            self.set_image_dir(path)

    def choose_save_dir(self) -> None:
        path = QFileDialog.getExistingDirectory(self, self.text("dialog_save"), self.save_dir or "")
        if path:
            self.set_save_dir(path)

    def set_checkpoint(self, path: str) -> None:
        """Load in the worker; the title and classes change once it reports back."""
        self.loading_checkpoint = path
        self.log(self.text("log_loading", path=path, device=self.options.device))
        self.request_load.emit(path, self.options.device)
        self._refresh_labels()

    def set_image_dir(self, path: str) -> None:
        self.image_dir = path
        self._refresh_labels()

    def set_save_dir(self, path: Optional[str]) -> None:
        self.save_dir = path or None
        self._refresh_labels()

    def _on_loaded(self, info: ModelInfo) -> None:
        self.model_info = info
        if self.loading_checkpoint == info.checkpoint:  # else another checkpoint is still on its way
            self.loading_checkpoint = None
        self.log(self.text("log_loaded", summary=f"{info.model_name}, {len(info.class_names)} classes "
                           f"({info.checkpoint})", device=info.device))
        self.set_title(self.options.title or self.default_title(info))
        self._refresh_labels()

    def _on_load_failed(self, path: str, reason: str) -> None:
        if self.loading_checkpoint == path:
            self.loading_checkpoint = None
        self._refresh_labels()
        self.show_message(self.text("err_bad_checkpoint", message=reason))

    # ---- running
    def toggle_run(self) -> None:
        if self.running:
            self.stop_run()
        else:
            self.start_run()

    def start_run(self) -> bool:
        """Check the inputs (a message box for each problem), then hand the folder to the worker."""
        paths = self._run_inputs()
        if paths is None:
            return False
        self.predictions, self.run_items, self.current = [], [], -1
        self.live = LiveMetrics(self.model_info.class_names)
        labels, why_not = folder_labels(self.image_dir, paths, self.model_info.class_names)  # infer.py's rule
        self.run_labelled = labels is not None
        self.job = RunJob(paths, self.options.batch_size, self.save_dir, labels=labels)
        if self.paused:  # a new run starts unpaused, autoplay included
            self.toggle_pause()
        self.progress.setRange(0, len(paths))
        self.progress.setValue(0)
        self.image_view.set_placeholder(self.text("no_image"))
        for label in (self.current_label, self.topk_label, self.verdict_label):
            label.clear()
        self.log(self.text("log_run_started", count=len(paths), folder=self.image_dir))
        if why_not:
            self.log(why_not)
        if self.save_dir:
            self.log(self.text("log_saving", folder=self.save_dir))
        self._refresh_metrics()
        self.request_run.emit(self.job)
        self.update_controls()
        return True

    def _run_inputs(self) -> Optional[list[str]]:
        t = self.text
        problem = None
        if self.loading_checkpoint:
            problem = t("err_loading")
        elif self.model_info is None:
            problem = t("err_no_checkpoint")
        elif not self.image_dir:
            problem = t("err_no_folder")
        elif not os.path.isdir(self.image_dir):
            problem = t("err_missing_folder", path=self.image_dir)
        elif self.save_dir and not os.path.isdir(self.save_dir):
            problem = t("err_missing_save", path=self.save_dir)
        unreadable: list[tuple[str, str]] = []  # folders that cannot be listed: named, never skipped in silence
        paths = list_images(self.image_dir, unreadable=unreadable) if problem is None else []
        for folder, reason in unreadable:
            self.log(t("log_unreadable_folder", folder=folder, reason=reason))
        if problem is None and not paths and unreadable:
            problem = t("err_unreadable_folder", folder=unreadable[0][0], reason=unreadable[0][1])
        elif problem is None and not paths:
            problem = t("err_no_images", path=self.image_dir, extensions=" ".join(IMAGE_EXTENSIONS))
        if problem:
            self.show_message(problem)
            return None
        return paths

    def stop_run(self) -> None:
        if self.job is not None and not self.stopping:
            self.stopping = True
            self.job.stop()
            self.update_controls()

    def _on_batch(self, items: list[ImagePrediction]) -> None:
        if self.job is None:  # delivered after shutdown() ended the run
            return
        self.live.add(items)
        self.run_items += items  # every image, unreadable ones too: what Record writes
        for item in items:
            if item.error:
                self.log(self.text("log_skipped", reason=item.error))
                continue
            if self.job.save_dir and not item.saved_path:
                self.log(self.text("log_not_saved", path=item.path))
            self.predictions.append(item)
        self.progress.setValue(self.live.total)
        self._refresh_metrics()
        if self.current < 0 and self.predictions:
            self.show_index(0)
        self.update_controls()

    def _on_run_finished(self, completed: bool) -> None:
        if self.job is None:  # delivered after shutdown() ended the run
            return
        if completed:
            self.log(self.text("log_run_finished", count=self.live.total, seconds=self.live.elapsed,
                               metrics=self.live.summary()))
        else:
            self.log(self.text("log_run_stopped", count=self.live.total))
        self._end_run()

    def _on_run_failed(self, message: str) -> None:
        if self.job is None:
            return
        self._end_run()
        self.show_message(self.text("err_run_failed", message=message))

    def _end_run(self) -> None:
        self.job = None
        self.stopping = False
        if not self.autoplaying:
            self.paused = False
        self.update_controls()

    def _refresh_metrics(self) -> None:
        self.metrics_view.setPlainText(self.live.panel(self.text) if self.live else "")

    # ---- browsing
    def show_index(self, index: int) -> None:
        if not 0 <= index < len(self.predictions):
            return
        self.current = index
        item = self.predictions[index]
        class_names = self.live.class_names  # the run's classes, even if another checkpoint was loaded since
        position = self.text("position", index=index + 1, total=len(self.predictions), path=self._shown_path(item))
        try:
            self.image_view.set_image(to_qimage(annotate(read_rgb(item.path), item, class_names, self.text)))
        except ImageReadError as error:  # deleted or changed since it was classified
            self.image_view.set_placeholder(str(error))
        self.current_label.setText(self._describe(item, position))
        self.topk_label.setText(self._describe_topk(item))
        self._show_verdict(item.correct)
        self.log(self.text("log_shown", position=position, name=class_names[item.predicted_index],
                           probability=f"{item.probability:.1%}"))
        self.update_controls()

    def _shown_path(self, item: ImagePrediction) -> str:
        return os.path.relpath(item.path, self.image_dir) if self.image_dir else item.path

    def _describe(self, item: ImagePrediction, position: str) -> str:
        t = self.text
        class_names = self.live.class_names
        truth = t("true_class", name=class_names[item.true_index]) if item.true_index is not None else t("no_true_class")
        prediction = t("prediction", name=class_names[item.predicted_index], probability=f"{item.probability:.2%}")
        return "\n".join([position, prediction, truth])

    def _describe_topk(self, item: ImagePrediction) -> str:
        width = max(len(name) for name, _ in item.top)
        rows = [f"{name:<{width}} {probability:8.2%}" for name, probability in item.top]
        return "\n".join([self.text("topk", k=len(item.top)), *rows])

    def _show_verdict(self, correct: Optional[bool]) -> None:
        if correct is None:
            self.verdict_label.clear()
            return
        self.verdict_label.setText(self.text("correct" if correct else "incorrect"))
        colour = "#1e8e3e" if correct else "#d93025"
        self.verdict_label.setStyleSheet(f"color: {colour}; font-weight: bold; font-size: 16px;")

    def show_next(self) -> None:
        self.show_index(self.current + 1)

    def show_previous(self) -> None:
        self.show_index(self.current - 1)

    # ---- autoplay and pause
    def _apply_interval(self) -> None:
        self.autoplay_timer.setInterval(round(self.interval_box.value() * 1000))

    def set_autoplay(self, on: bool) -> None:
        self.autoplay_button.setChecked(on)  # the toggled signal does the rest

    def _on_autoplay_toggled(self, on: bool) -> None:
        if on and not self.paused:
            self.autoplay_timer.start()
        else:
            self.autoplay_timer.stop()
        if not on and not self.running:
            self.paused = False  # nothing left to resume
        self.update_controls()

    def _autoplay_step(self) -> None:
        if self.current + 1 < len(self.predictions):
            self.show_next()
        elif not self.running:
            self.set_autoplay(False)
            self.log(self.text("log_autoplay_end"))
        # else: the worker has not classified the next image yet; try again at the next tick

    def toggle_pause(self) -> None:
        """Pause or resume both the worker and the autoplay."""
        if not (self.running or self.autoplaying):
            return
        self.paused = not self.paused
        if self.job is not None:
            (self.job.pause if self.paused else self.job.resume)()
        if self.autoplaying:
            (self.autoplay_timer.stop if self.paused else self.autoplay_timer.start)()
        self.update_controls()

    # ---- record
    def record(self) -> None:
        if not self.predictions:
            self.show_message(self.text("err_nothing_to_record"))
            return
        folder = self.save_dir or self.choose_record_dir()
        if folder:
            self.export_to(folder)

    def choose_record_dir(self) -> str:
        return QFileDialog.getExistingDirectory(self, self.text("dialog_record"))

    def export_to(self, folder: str) -> list[str]:
        """predictions.csv and the log into `folder`; returns the files written ([] on failure)."""
        if not os.path.isdir(folder):
            self.show_message(self.text("err_missing_save", path=folder))
            return []
        try:
            files = export_records(folder, self.run_items, self.live.class_names, self.run_labelled, self.log_lines)
        except OSError as error:
            self.show_message(self.text("err_record_failed", path=folder, message=error.strerror or error))
            return []
        self.log(self.text("log_recorded", files=", ".join(files)))
        return files

    # ---- closing
    def closeEvent(self, event: QCloseEvent) -> None:
        if self.running and not self.confirm(self.text("confirm_close")):
            event.ignore()
            return
        self.shutdown()
        event.accept()

    def shutdown(self) -> None:
        """Stop the run and end the worker thread (waits for the batch in progress). Safe to repeat."""
        self.autoplay_timer.stop()
        if self.job is not None:
            self.job.stop()
        self.worker_thread.quit()
        self.worker_thread.wait()
        self.job = None  # its finished signal will not be delivered any more
