"""The viewer window: pick a checkpoint and a folder, Run, browse the predictions, watch the metrics.

Everything slow happens in the InferenceWorker's thread; the window only reads the one image it
shows. Torch is imported only once the window is on screen, in a "loading" state (_start_engine). Dialogs sit behind small methods (choose_*, confirm) and the setters they call (set_*)
are public, so tests drive the real window without clicking through file dialogs. Messages go
through `show_message`, which keeps the last one in `last_message` and never blocks.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from PyQt5.QtCore import QLibraryInfo, Qt, QThread, QTimer, QTranslator, pyqtSignal
from PyQt5.QtGui import QCloseEvent, QFont, QKeySequence
from PyQt5.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMainWindow,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QShortcut,
    QSizePolicy,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ui_classification.charts import PerClassBars
from ui_classification.confusion import ConfusionView
from ui_classification.heat_maps import HeatMapCache
from ui_classification.image_view import ImageView
from ui_classification.results_table import ResultsPanel
from ui_classification.strings import Text
from utils.files import IMAGE_EXTENSIONS, list_images, unique_path

if TYPE_CHECKING:  # torch-heavy: imported at run time only once the window is up (_start_engine)
    from ui_classification.results import ImagePrediction, LiveMetrics
    from ui_classification.worker import InferenceWorker, ModelInfo, RunJob

TITLE_CLASSES_SHOWN = 8
LOG_LINES_KEPT_ON_SCREEN = 5000  # the full log is still kept for Record
METRICS_PANEL_LINES = 8  # LiveMetrics.panel with labels: 3 counts, 4 metrics, speed (--min_confidence adds 2)
ENGINE_START_DELAY_MS = 100  # lets the window show itself before torch's import holds the GUI thread
RUN_FOLDER_PREFIX = "run"  # each run with a save folder writes into <save folder>/run-<date>-<time>/
_installed_translators: list[QTranslator] = []  # Qt's own texts (dialog buttons); kept alive while installed


def install_qt_translation(lang: str) -> bool:
    """Qt's own dialogs (Yes/No/OK, file dialogs) in the window's language: Qt's qtbase_zh_CN, shipped
    with PyQt5. English removes it again. True when the translation is active."""
    app = QApplication.instance()
    while _installed_translators:
        app.removeTranslator(_installed_translators.pop())
    if lang != "zh":
        return False
    translator = QTranslator()
    if not translator.load("qtbase_zh_CN", QLibraryInfo.location(QLibraryInfo.TranslationsPath)):
        return False
    app.installTranslator(translator)
    _installed_translators.append(translator)
    return True


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
    model: Optional[str] = None  # bare state_dict only: --model, --categories, --input_shape
    categories: Optional[list[str]] = None
    input_shape: Optional[list[int]] = None
    cam_method: str = "gradcam"  # the heat-map toggle's method and layer (inference.cam)
    cam_layer: Optional[str] = None
    min_confidence: Optional[str] = None  # "P" or "auto": below it the answer is "unknown", as in infer.py


class ViewerWindow(QMainWindow):
    request_load = pyqtSignal(str, str)  # checkpoint, device -> worker
    request_run = pyqtSignal(object)  # RunJob -> worker
    request_heat_map = pyqtSignal()  # -> worker: serve the pending heat map

    def __init__(self, options: ViewerOptions):
        super().__init__()
        self.options = options
        self.text = Text(options.lang)
        install_qt_translation(options.lang)
        self.worker: Optional[InferenceWorker] = None  # set once EngineLoader has built it
        self.model_info: Optional[ModelInfo] = None
        self.loading_checkpoint: Optional[str] = None
        self.image_dir = options.image_dir
        self.save_dir = options.save_dir
        self.predictions: list[ImagePrediction] = []  # readable images of the current run, in order
        self.run_items: list[ImagePrediction] = []  # every image of the current run, unreadable ones too
        self.run_labelled = False  # the run's folder is a labelled tree (inference.inputs.find_labels)
        self.current = -1
        self.run_total = 0  # images in the current run, readable or not
        self.run_folder: Optional[str] = None  # the current run's subfolder of the save folder
        self.run_info: Optional[dict] = None  # checkpoint, model, device... of the run: predictions.json's head
        self.live: Optional[LiveMetrics] = None
        self.job: Optional[RunJob] = None  # set while a run is active
        self.stopping = False
        self.paused = False
        self.log_lines: list[str] = []
        self.last_message: Optional[str] = None
        self.message_box: Optional[QMessageBox] = None
        self.closed = False
        self.heat_maps = HeatMapCache()
        self.last_heat_thread = 0  # the thread that drew the last heat map (the worker's, never this one)
        self._build_widgets()
        self._build_layout()
        self._start_worker()
        self._bind_keys()
        self.autoplay_timer = QTimer(self)
        self.autoplay_timer.timeout.connect(self._autoplay_step)
        self.interval_box.setValue(options.interval)
        self._apply_interval()
        self.set_title(options.title or self.text("window_title_loading"))
        self.resize(1440, 860)
        if options.weights:
            self.set_checkpoint(options.weights)
        self._refresh_labels()
        self.update_controls()
        self.image_view.setFocus()

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
        self.heat_button = self._button("heat_map", self._on_heat_map_toggled, checkable=True)
        self.heat_button.setToolTip(t("heat_map_tip"))
        self.interval_box = QDoubleSpinBox()
        self.interval_box.setRange(0.05, 3600.0)
        self.interval_box.setDecimals(2)
        self.interval_box.setSingleStep(0.5)
        self.interval_box.setSuffix(t("interval_suffix"))
        self.interval_box.setToolTip(t("interval_tip"))
        self.interval_box.valueChanged.connect(self._apply_interval)
        # Typing in the box needs the arrows and Space; it takes focus only when clicked, and gives it
        # back to the image on Enter, so the viewer keys work again.
        self.interval_box.setFocusPolicy(Qt.ClickFocus)
        self.interval_box.editingFinished.connect(lambda: self.image_view.setFocus())
        self.checkpoint_label, self.images_label, self.save_label = QLabel(), QLabel(), QLabel()
        for label in (self.checkpoint_label, self.images_label, self.save_label):
            label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)  # long paths must not widen the window
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.title_label = QLabel()  # the title again inside the window, where screenshots and full-screen show it
        self.title_label.setStyleSheet("font-size: 16px; font-weight: bold;")
        self.image_view = ImageView(t("no_image"))
        self.image_view.setFocusPolicy(Qt.StrongFocus)  # holds the focus, so the window-wide keys reach the viewer
        # queued: the view asks from inside a zoom or a resize, and gets the full image after it
        self.image_view.full_image_wanted.connect(self._show_full_image, Qt.QueuedConnection)
        self.current_label, self.topk_label = QLabel(), QLabel()
        for label in (self.current_label, self.topk_label):
            label.setAlignment(Qt.AlignTop | Qt.AlignLeft)
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
            label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        self.topk_label.setFont(QFont("DejaVu Sans Mono", 10))
        self.verdict_label = QLabel()
        self.metrics_view = self._text_panel()
        self.class_table = self._class_table()
        self.log_view = self._text_panel()
        self.log_view.setMaximumBlockCount(LOG_LINES_KEPT_ON_SCREEN)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m")
        self._build_result_views()

    def _build_result_views(self) -> None:
        """The results table with its filters, the confusion matrix and the per-class bars (issue 16, 8/9/13)."""
        self.results_panel = ResultsPanel(self.text)
        self.results_panel.image_chosen.connect(self.show_index)
        self.results_panel.below_spin.editingFinished.connect(lambda: self.image_view.setFocus())
        self.confusion_view = ConfusionView(self.text)
        self.confusion_view.cell_chosen.connect(lambda true, predicted: self.results_panel.set_cell((true, predicted)))
        self.class_chart = PerClassBars(self.text)
        proxy = self.results_panel.proxy  # a filter or sort changes what Previous/Next can reach
        for signal in (proxy.layoutChanged, proxy.modelReset, proxy.rowsInserted, proxy.rowsRemoved):
            signal.connect(lambda *_: self.update_controls())

    @staticmethod
    def _text_panel() -> QPlainTextEdit:
        panel = QPlainTextEdit()
        panel.setReadOnly(True)
        panel.setFocusPolicy(Qt.NoFocus)
        panel.setFont(QFont("DejaVu Sans Mono", 9))
        return panel

    def _class_table(self) -> QTableWidget:
        """Per-class precision, recall, F1 and support: a real table, so CJK headers line up."""
        keys = ("column_class", "column_precision", "column_recall", "column_f1", "column_support")
        table = QTableWidget(0, len(keys))
        table.setHorizontalHeaderLabels([self.text(key) for key in keys])
        table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        table.setFocusPolicy(Qt.NoFocus)
        table.verticalHeader().setVisible(False)
        table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)  # every column visible, no scrolling
        return table

    def _build_layout(self) -> None:
        t = self.text
        controls = QHBoxLayout()
        for widget in (self.checkpoint_button, self.images_button, self.save_button, self.run_button,
                       self.previous_button, self.next_button, self.autoplay_button, self.interval_box,
                       self.pause_button, self.heat_button, self.record_button, self.exit_button):
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
        top.addWidget(self._group(t("results_title"), self.results_panel))
        top.addWidget(self._metrics_column())
        top.setSizes([560, 480, 400])
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

    def _metrics_column(self) -> QSplitter:
        """The summary, the per-class bars / table (tabs) and the progress above the confusion matrix."""
        t = self.text
        self._fit_metrics_panel(METRICS_PANEL_LINES)
        chart_scroll = QScrollArea()
        chart_scroll.setWidget(self.class_chart)
        chart_scroll.setWidgetResizable(True)
        self.metrics_tabs = QTabWidget()
        self.metrics_tabs.setFocusPolicy(Qt.NoFocus)
        self.metrics_tabs.addTab(chart_scroll, t("tab_chart"))
        self.metrics_tabs.addTab(self.class_table, t("tab_table"))
        column = QSplitter(Qt.Vertical)
        column.addWidget(self._group(t("metrics_title"), self.metrics_view, self.metrics_tabs, self.progress))
        column.addWidget(self._group(t("confusion_title"), self.confusion_view))
        column.setSizes([420, 260])
        return column

    def _fit_metrics_panel(self, lines: int) -> None:
        """Tall enough for `lines` lines of the metrics without a scroll bar (the splitter used to squeeze
        it to about 6); it only grows, so the panels below do not jump at every batch."""
        view = self.metrics_view
        margins = 2 * (view.frameWidth() + round(view.document().documentMargin())) + 2
        height = lines * view.fontMetrics().height() + margins  # a line takes the font's height (measured)
        if height > view.minimumHeight():
            view.setFixedHeight(height)

    @staticmethod
    def _group(title: str, *widgets: QWidget) -> QGroupBox:
        box = QGroupBox(title)
        layout = QVBoxLayout(box)
        for widget in widgets:
            layout.addWidget(widget)
        return box

    def _start_worker(self) -> None:
        self.worker_thread = QThread(self)
        QTimer.singleShot(ENGINE_START_DELAY_MS, self._start_engine)

    def _start_engine(self) -> None:
        """Import torch and the model code (seconds) once the window is painted with its "loading" state.
        In the GUI thread: importing torch's extensions in a QThread crashes under X11."""
        if self.closed:
            return
        QApplication.processEvents()
        from inference.predictor import parse_categories
        from ui_classification.worker import InferenceWorker

        options = self.options
        worker = InferenceWorker(self.text, options.cam_method, options.cam_layer, options.min_confidence,
                                 model_name=options.model, class_names=parse_categories(options.categories),
                                 input_shape=options.input_shape)
        worker.moveToThread(self.worker_thread)
        self.worker = worker  # lives in worker_thread: every connection below is queued
        self.request_load.connect(worker.load)
        self.request_run.connect(worker.run)
        worker.loaded.connect(self._on_loaded)
        worker.load_failed.connect(self._on_load_failed)
        worker.batch_done.connect(self._on_batch)
        worker.run_finished.connect(self._on_run_finished)
        worker.run_failed.connect(self._on_run_failed)
        self.request_heat_map.connect(worker.serve_heat_map)
        worker.heat_map_ready.connect(self._on_heat_map)
        self.worker_thread.start()
        if self.loading_checkpoint:  # chosen (or given on the command line) while torch was loading
            self.request_load.emit(self.loading_checkpoint, self.options.device)

    def _bind_keys(self) -> None:
        """Window-wide keys: they work whichever widget has the focus, except while typing in the
        interval box (it keeps the arrows and Space for editing; Enter hands them back)."""
        view = self.image_view
        for key, slot in (("Right", self.show_next), ("Left", self.show_previous), ("Space", self.toggle_pause),
                          ("Home", self.show_first), ("End", self.show_last), ("R", self.toggle_run),
                          ("Ctrl+S", self.record), ("H", self.toggle_heat_map),
                          ("+", view.zoom_in), ("=", view.zoom_in), ("-", view.zoom_out),  # = is + without Shift
                          ("F", view.fit), ("0", view.fit)):
            shortcut = QShortcut(QKeySequence(key), self, slot)
            shortcut.setContext(Qt.WindowShortcut)

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
        self.run_button.setEnabled(not self.stopping and (self.running or bool(
            (self.model_info or self.loading_checkpoint) and self.image_dir)))
        self.previous_button.setEnabled(self.step_target(-1) is not None)
        self.next_button.setEnabled(self.step_target(1) is not None)
        self.autoplay_button.setEnabled(bool(self.predictions) or self.running)
        self.pause_button.setEnabled(self.running or self.autoplaying)
        self.pause_button.setText(self.text("resume" if self.paused else "pause"))
        self.record_button.setEnabled(bool(self.predictions))
        self.heat_button.setEnabled(self.heat_map_problem() is None and bool(self.predictions))
        waiting = self.heat_button.isChecked() and self.heat_maps.waiting_for is not None
        self.heat_button.setText(self.text("heat_map_busy" if waiting else "heat_map"))

    def _refresh_labels(self) -> None:
        t = self.text
        checkpoint = self.loading_checkpoint or (self.model_info.checkpoint if self.model_info else None)
        self.checkpoint_label.setText(t("checkpoint_label", path=checkpoint or t("not_set")))
        self.images_label.setText(t("images_label", path=self.image_dir or t("not_set")))
        self.save_label.setText(t("save_label", path=self.save_dir or t("not_set")))
        for label in (self.checkpoint_label, self.images_label, self.save_label):
            label.setToolTip(label.text())
        if not self.predictions:
            self.image_view.set_placeholder(self._placeholder())

    def _placeholder(self) -> str:
        """What to do next, given what is already set (a checkpoint from the command line is not asked for)."""
        if self.loading_checkpoint:
            return self.text("placeholder_loading", path=os.path.basename(self.loading_checkpoint))
        if self.model_info is None:
            return self.text("no_image")
        return self.text("placeholder_run" if self.image_dir else "placeholder_folder")

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
        if self.message_box is None:  # one box, reused: a new problem replaces the text, boxes never stack
            self.message_box = QMessageBox(QMessageBox.Warning, self.text("title_error"), "", QMessageBox.Ok, self)
            self.message_box.setWindowModality(Qt.NonModal)
        self.message_box.setText(message)
        self.message_box.show()
        self.message_box.raise_()

    def confirm(self, question: str) -> bool:
        answer = QMessageBox.question(self, self.text("title_confirm"), question,
                                      QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        return answer == QMessageBox.Yes

    # ---- choosing paths (dialogs -> setters)
    def choose_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, self.text("dialog_checkpoint"), self.checkpoint_start_dir(),
                                              self.text("dialog_checkpoint_filter"))
        if path:
            self.set_checkpoint(path)

    def choose_image_dir(self) -> None:
        path = QFileDialog.getExistingDirectory(self, self.text("dialog_images"), self.image_dir or self.last_folder)
        if path:
            self.set_image_dir(path)

    def choose_save_dir(self) -> None:
        path = QFileDialog.getExistingDirectory(self, self.text("dialog_save"), self.save_dir or self.last_folder)
        if path:
            self.set_save_dir(path)

    def checkpoint_start_dir(self) -> str:
        """Where the checkpoint dialog opens: beside the current checkpoint, else logs/ (train.py's default)."""
        current = self.loading_checkpoint or (self.model_info.checkpoint if self.model_info else None)
        if current:
            return os.path.dirname(os.path.abspath(current))
        return "logs" if os.path.isdir("logs") else ""

    @property
    def last_folder(self) -> str:
        """Where the folder dialogs open when nothing is set yet: the last folder used."""
        return self.image_dir or self.save_dir or ""

    def set_checkpoint(self, path: str) -> None:
        """Load in the worker; the title and classes change once it reports back."""
        self.loading_checkpoint = path
        self.log(self.text("log_loading", path=path, device=self.options.device))
        if self.worker is not None:  # else _start_engine sends it
            self.request_load.emit(path, self.options.device)
        self._refresh_labels()
        self.update_controls()

    def set_image_dir(self, path: str) -> bool:
        """A new folder clears the results of the old one. Refused during a run (stop it first)."""
        if self.running:
            self.show_message(self.text("err_busy"))
            return False
        if path != self.image_dir:
            self.clear_results()
        self.image_dir = path
        self._refresh_labels()
        self.update_controls()
        return True

    def set_save_dir(self, path: Optional[str]) -> None:
        self.save_dir = path or None
        self._refresh_labels()

    def clear_results(self) -> None:
        """Forget the last run: its images, metrics and the picture shown."""
        self.predictions, self.run_items, self.current, self.live = [], [], -1, None
        self.run_total, self.run_folder = 0, None
        self.progress.reset()
        self.results_panel.start(None, [])
        self.confusion_view.set_matrix([], None)
        for label in (self.current_label, self.topk_label, self.verdict_label):
            label.clear()
        self._refresh_metrics()
        self._refresh_labels()

    def _on_loaded(self, info: ModelInfo) -> None:
        self.model_info = info
        if self.loading_checkpoint == info.checkpoint:  # else another checkpoint is still on its way
            self.loading_checkpoint = None
        self.log(self.text("log_loaded", model=info.model_name, count=len(info.class_names), path=info.checkpoint,
                           device=info.device))
        self.set_title(self.options.title or self.default_title(info))
        self.heat_maps.clear()  # drawn by the model before
        if info.min_confidence is not None:
            self.log(self.text("log_min_confidence", threshold=f"{info.min_confidence:.2%}"))
        if info.min_confidence_problem:
            self.show_message(self.text("err_min_confidence", message=info.min_confidence_problem))
        problem = self.heat_map_problem()
        self.heat_button.setToolTip(problem or self.text("heat_map_tip"))
        if problem and self.heat_button.isChecked():
            self.heat_button.setChecked(False)
        self._refresh_labels()
        self.update_controls()

    def _on_load_failed(self, path: str, reason: str) -> None:
        if self.loading_checkpoint == path:
            self.loading_checkpoint = None
        self._refresh_labels()
        self.update_controls()
        self.show_message(self.text("err_bad_checkpoint", message=reason))

    # ---- running
    def toggle_run(self) -> None:
        if self.running:
            self.stop_run()
        else:
            self.start_run()

    def start_run(self) -> bool:
        """Check the inputs (a message box for each problem), then hand the folder to the worker."""
        from ui_classification.results import LiveMetrics, folder_labels, run_description  # already loaded
        from ui_classification.worker import RunJob

        paths = self._run_inputs()
        run_folder = self._make_run_folder() if paths is not None and self.save_dir else None
        if paths is None or (self.save_dir and run_folder is None):
            return False
        self.clear_results()
        self.run_total, self.run_folder = len(paths), run_folder
        self.live = LiveMetrics(self.model_info.class_names, self.model_info.min_confidence)
        self.results_panel.start(self.image_dir, self.model_info.class_names)
        info = self.model_info
        self.run_info = run_description(info.checkpoint, info.model_name, info.device, info.temperature, self.image_dir)
        labels, why_not = folder_labels(self.image_dir, paths, self.model_info.class_names)  # infer.py's rule
        self.run_labelled = labels is not None
        self.job = RunJob(paths, self.options.batch_size, run_folder, labels=labels,
                          min_confidence=self.model_info.min_confidence)
        if self.paused:  # a new run starts unpaused, autoplay included
            self.toggle_pause()
        self.progress.setRange(0, len(paths))
        self.progress.setValue(0)
        self.log(self.text("log_run_started", count=len(paths), folder=self.image_dir))
        if why_not:
            self.log(self.text("log_not_labelled", reason=why_not))
        if run_folder:
            self.log(self.text("log_saving", folder=run_folder))
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

    def _make_run_folder(self) -> Optional[str]:
        """A new <save folder>/run-<date>-<time> for this run's annotated images and records, so runs
        into the same save folder never mix (or get "-1" copies); None (and a message) on failure."""
        folder = unique_path(self.save_dir, f"{RUN_FOLDER_PREFIX}-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.mkdir(folder)
        except OSError as error:
            self.show_message(self.text("err_record_failed", path=folder, message=error.strerror or error))
            return None
        return folder

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
        self.results_panel.append(items)
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
                               metrics=self.live.summary(self.text)))
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
        panel = self.live.panel(self.text) if self.live else ""
        self.metrics_view.setPlainText(panel)
        self._fit_metrics_panel(panel.count("\n") + 1)
        rows = self.live.per_class() if self.live else []
        self.class_table.setRowCount(len(rows))
        for index, row in enumerate(rows):
            cells = [row["class"], f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}",
                     str(row["support"])]
            for column, value in enumerate(cells):
                item = QTableWidgetItem(value)
                item.setTextAlignment(Qt.AlignVCenter | (Qt.AlignLeft if column == 0 else Qt.AlignRight))
                self.class_table.setItem(index, column, item)
        self.class_chart.set_rows(rows)
        if self.live:
            self.confusion_view.set_matrix(self.live.class_names, self.live.values["confusion"] if self.live.values else None)

    # ---- browsing
    def show_index(self, index: int) -> None:
        if not 0 <= index < len(self.predictions):
            return
        self.current = index
        item = self.predictions[index]
        class_names = self.live.class_names  # the run's classes, even if another checkpoint was loaded since
        readable_total = self.run_total - self.live.skipped  # the whole run's, not just the images classified yet
        position = self.text("position", index=index + 1, total=readable_total, path=self._shown_path(item))
        self._draw(item)
        self.current_label.setText(self._describe(item, position))
        self.topk_label.setText(self._describe_topk(item))
        self._show_verdict(item.correct)
        self.results_panel.follow(index)
        self.log(self.text("log_shown", position=position, name=class_names[item.predicted_index],
                           probability=f"{item.probability:.1%}"))
        self.update_controls()

    def _draw(self, item: ImagePrediction) -> None:
        """The picture of `item`: the image, or with the heat map on, the image with its heat map
        (once the worker has drawn it; the plain image meanwhile). A large JPEG is decoded at the
        size the view shows it (a 12 MP photo: 1/8 or 1/4, about 3x faster a key), in full once zoomed in."""
        from ui_classification.annotate import picture, to_qimage  # loaded with the worker already
        from utils.data import ImageReadError, read_rgb_reduced

        heat = self._heat_overlay(item) if self.heat_button.isChecked() else None
        try:
            array, shrink = (heat, 1) if heat is not None else read_rgb_reduced(item.path, self._display_min_size)
        except ImageReadError as error:  # deleted or changed since it was classified
            self.image_view.set_placeholder(str(error))
            return
        shown = picture(array, item, self.live.class_names, self.text)
        self.image_view.set_picture(to_qimage(shown.bar), to_qimage(shown.image), shown.pixel, shrink)

    def _display_min_size(self, height: int, width: int) -> list[int]:
        """read_rgb's min_size for the picture on screen. read_rgb keeps REDUCED_DECODE_MARGIN times
        min_size, for an antialiased resize; here Qt does the shrinking, area-averaged, from anything
        at least the screen's size. Never under annotate's MIN_SIDE, which would enlarge it again."""
        from ui_classification.annotate import MIN_SIDE
        from utils.data import REDUCED_DECODE_MARGIN

        shown = self.image_view.decode_size(height, width)
        return [math.ceil(max(side, MIN_SIDE) / REDUCED_DECODE_MARGIN) for side in shown]

    def _show_full_image(self) -> None:
        """The view is zoomed in past the pixels of a reduced decode: decode the image in full."""
        from ui_classification.annotate import to_qimage
        from utils.data import ImageReadError, read_rgb

        if not self.image_view.needs_full_image() or not 0 <= self.current < len(self.predictions):
            return  # already answered (the view asks at every zoom step), or another picture since
        item = self.predictions[self.current]
        try:
            full = read_rgb(item.path)
        except ImageReadError as error:  # deleted or changed since it was shown
            self.image_view.set_placeholder(str(error))
            return
        if not self.image_view.set_full_image(to_qimage(full)):
            self._draw(item)  # another size now: changed on disk since it was shown

    # ---- heat maps (inference.cam, drawn in the worker thread)
    def heat_map_problem(self) -> Optional[str]:
        """Why the heat-map toggle is off limits (its tooltip), or None when heat maps can be drawn."""
        if self.model_info is None:
            return self.text("heat_map_no_model")
        if self.model_info.backend != "torch":
            return self.text("heat_map_onnx")
        if self.model_info.heat_map_problem:
            return self.text("heat_map_unavailable", reason=self.model_info.heat_map_problem)
        if self.live is not None and self.live.class_names != self.model_info.class_names:
            return self.text("heat_map_other_model")
        return None

    def toggle_heat_map(self) -> None:
        if self.heat_button.isEnabled():
            self.heat_button.toggle()  # the toggled signal redraws

    def _on_heat_map_toggled(self, on: bool) -> None:
        if 0 <= self.current < len(self.predictions):
            self._draw(self.predictions[self.current])
        self.update_controls()

    def _heat_key(self, item: ImagePrediction) -> tuple[str, str, int]:
        return self.model_info.checkpoint, item.path, item.predicted_index

    def _heat_overlay(self, item: ImagePrediction):
        """The cached heat map of `item`, or None after asking the worker for it (never waits)."""
        from ui_classification.worker import HeatMapRequest

        if self.heat_map_problem() is not None:
            return None
        key = self._heat_key(item)
        overlay = self.heat_maps.get(key)
        if overlay is None and self.heat_maps.waiting_for != key:
            self.heat_maps.waiting_for = key
            self.worker.pending_heat_map.put(HeatMapRequest(item.path, item.predicted_index))
            self.request_heat_map.emit()  # queued: served when the worker is free, or between two batches
        return overlay

    def _on_heat_map(self, heat) -> None:
        key = (self.model_info.checkpoint if self.model_info else "", heat.request.path, heat.request.class_index)
        if self.heat_maps.waiting_for == key:
            self.heat_maps.waiting_for = None
        if heat.error:
            self.heat_button.setChecked(False)
            self.show_message(self.text("err_heat_map", message=heat.error))
            return
        self.heat_maps.put(key, heat.overlay)
        self.last_heat_thread = heat.thread_id
        shown = self.predictions[self.current] if 0 <= self.current < len(self.predictions) else None
        if shown is not None and self.heat_button.isChecked() and self._heat_key(shown) == key:
            self._draw(shown)
        self.update_controls()

    def _shown_path(self, item: ImagePrediction) -> str:
        return os.path.relpath(item.path, self.image_dir) if self.image_dir else item.path

    def _describe(self, item: ImagePrediction, position: str) -> str:
        t = self.text
        class_names = self.live.class_names
        truth = t("true_class", name=class_names[item.true_index]) if item.true_index is not None else t("no_true_class")
        key = "prediction_unknown" if item.unknown else "prediction"
        prediction = t(key, name=class_names[item.predicted_index], probability=f"{item.probability:.2%}")
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

    def step_target(self, step: int) -> Optional[int]:
        """The image `step` places from the shown one: in the results table's order while a filter or
        a sort is on there (Next walks the mistakes only), else in run order; None past either end."""
        if self.results_panel.uses_table_order():
            return self.results_panel.step_from(self.current, step)
        target = self.current + step
        return target if 0 <= target < len(self.predictions) else None

    def _show_target(self, target: Optional[int]) -> None:
        if target is not None:
            self.show_index(target)

    def show_next(self) -> None:
        self._show_target(self.step_target(1))

    def show_previous(self) -> None:
        self._show_target(self.step_target(-1))

    def show_first(self) -> None:
        if self.results_panel.uses_table_order():
            self._show_target(self.results_panel.step_from(-1, 1))
        else:
            self._show_target(0 if self.predictions else None)

    def show_last(self) -> None:
        if self.results_panel.uses_table_order():
            self._show_target(self.results_panel.step_from(-1, -1))
        else:
            self._show_target(len(self.predictions) - 1 if self.predictions else None)

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
        target = self.step_target(1)
        if target is not None:
            self.show_index(target)
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
        folder = self.run_folder or self.save_dir or self.choose_record_dir()
        if folder:
            self.export_to(folder)

    def choose_record_dir(self) -> str:
        return QFileDialog.getExistingDirectory(self, self.text("dialog_record"))

    def export_to(self, folder: str) -> list[str]:
        """predictions.csv, predictions.json (with the metrics), per_class.csv and the log into `folder`;
        returns the files written ([] on failure)."""
        from ui_classification.results import export_records  # loaded with the worker already

        if not os.path.isdir(folder):
            self.show_message(self.text("err_missing_save", path=folder))
            return []
        try:
            files = export_records(folder, self.run_items, self.live.class_names, self.run_labelled, self.log_lines,
                                   self.live.min_confidence, self.run_info)
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
        self.closed = True  # a window closed before its engine started never starts it
        if self.job is not None:
            self.job.stop()
        self.worker_thread.quit()
        self.worker_thread.wait()
        self.results_panel.shutdown()
        self.job = None  # its finished signal will not be delivered any more
