"""The results table: every image of the run, sortable and filtered, beside the picture.

    ResultsModel      the run's ImagePrediction items as rows; batches are appended with
                      beginInsertRows (never a reset), so a 5,000-image run stays smooth
    ResultsFilter     the sort/filter proxy: mistakes only, a class, confidence below X,
                      unreadable only, one confusion-matrix cell
    ThumbnailLoader   small pictures made on demand, only for rows Qt draws, in a background
                      thread, kept in a bounded LRU cache
    ResultsPanel      the filter widgets above the table; says which image was chosen

Choosing a row emits `ResultsPanel.image_chosen(index)`: the index into the window's readable
images (`ViewerWindow.predictions`), which `ViewerWindow.show_index` shows.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Optional

from PyQt5.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QObject,
    QSize,
    QSortFilterProxyModel,
    Qt,
    QThreadPool,
    pyqtSignal,
)
from PyQt5.QtGui import QBrush, QColor, QImage, QPixmap
from PyQt5.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from ui_classification.strings import Text

if TYPE_CHECKING:  # torch-heavy; the window imports this module before torch is loaded
    from ui_classification.results import ImagePrediction

THUMBNAIL_SIDE = 40  # pixels; rows are this tall
THUMBNAILS_CACHED = 400  # ~40*40*4 bytes each: under 3 MB whatever the folder holds
THUMBNAILS_QUEUED = 64  # more requests than this (fast scrolling) drop the ones not started yet
COLUMNS = ("column_thumbnail", "column_file", "column_prediction", "column_confidence", "column_true",
           "column_correct")
THUMBNAIL, FILE, PREDICTION, CONFIDENCE, TRUE_CLASS, CORRECT = range(len(COLUMNS))
SORT_ROLE = Qt.UserRole  # numbers for the numeric columns, so 9.5% sorts below 10.2%
GREEN, RED = QColor("#1e8e3e"), QColor("#d93025")


class Row(NamedTuple):
    """What the table reads of an ImagePrediction, as plain Python values made once per image: sorting
    and filtering 5,000 rows then costs no tensor operation."""

    path: str
    error: str
    true_index: Optional[int]
    predicted_index: int
    probability: float
    correct: Optional[bool]

    @classmethod
    def of(cls, item: ImagePrediction) -> Row:
        if item.error:
            return cls(item.path, item.error, item.true_index, -1, -1.0, None)
        return cls(item.path, "", item.true_index, item.predicted_index, item.probability, item.correct)


def make_thumbnail(path: str, side: int) -> QImage:
    """The image shrunk to fit side x side (read by utils.data.read_rgb: its pixel limits apply).
    Thread-safe (numpy and QImage only); a null QImage when the file cannot be read."""
    import cv2

    from ui_classification.annotate import to_qimage
    from utils.data import ImageReadError, read_rgb

    try:
        array = read_rgb(path, [side, side])  # a large JPEG is decoded smaller (libjpeg's DCT scaling)
    except ImageReadError:
        return QImage()
    height, width = array.shape[:2]
    scale = min(1.0, side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    return to_qimage(cv2.resize(array, size, interpolation=interpolation))


class ThumbnailLoader(QObject):
    """Thumbnails decoded in one background thread as the table asks for them; `ready(path)` once
    one is in the cache. Only rows on screen are asked for, so 5,000 images are never decoded upfront."""

    ready = pyqtSignal(str)
    _made = pyqtSignal(str, QImage)  # from the pool thread; queued to the GUI thread

    def __init__(self, side: int = THUMBNAIL_SIDE, capacity: int = THUMBNAILS_CACHED):
        super().__init__()
        self.side, self.capacity = side, capacity
        self.cache: OrderedDict[str, QPixmap] = OrderedDict()
        self.queued: set[str] = set()
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(1)  # the classification needs the other cores
        self._made.connect(self._store)

    def get(self, path: str) -> Optional[QPixmap]:
        """The thumbnail if cached (else None, and it is queued: `ready` follows)."""
        pixmap = self.cache.get(path)
        if pixmap is not None:
            self.cache.move_to_end(path)
            return pixmap
        if path not in self.queued:
            if len(self.queued) >= THUMBNAILS_QUEUED:  # rows scrolled past: asked again if shown again
                self.pool.clear()
                self.queued.clear()
            self.queued.add(path)
            self.pool.start(lambda: self._made.emit(path, make_thumbnail(path, self.side)))
        return None

    def _store(self, path: str, image: QImage) -> None:
        self.queued.discard(path)
        self.cache[path] = QPixmap.fromImage(image)  # a null pixmap for an unreadable file: not asked again
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        self.ready.emit(path)

    def clear(self) -> None:
        self.pool.clear()
        self.queued.clear()
        self.cache.clear()

    def shutdown(self) -> None:
        self.pool.clear()
        self.pool.waitForDone()


class ResultsModel(QAbstractTableModel):
    """One row per image of the run, unreadable ones included, in the order they were classified."""

    def __init__(self, text: Text, thumbnails: ThumbnailLoader):
        super().__init__()
        self.text = text
        self.thumbnails = thumbnails
        thumbnails.ready.connect(self._thumbnail_ready)
        self.items: list[ImagePrediction] = []
        self.rows: list[Row] = []  # the same images, as the table reads them
        self.shown_index: list[int] = []  # per row: its index among the readable images, -1 if unreadable
        self.readable_rows: list[int] = []  # the other way round: the row of each readable image
        self.rows_of: dict[str, list[int]] = {}
        self.class_names: list[str] = []
        self.root: Optional[str] = None

    def start(self, root: Optional[str], class_names: Sequence[str]) -> None:
        self.beginResetModel()
        self.items, self.rows, self.shown_index, self.readable_rows, self.rows_of = [], [], [], [], {}
        self.root, self.class_names = root, list(class_names)
        self.thumbnails.clear()
        self.endResetModel()

    def append(self, items: Sequence[ImagePrediction]) -> None:
        if not items:
            return
        first = len(self.items)
        self.beginInsertRows(QModelIndex(), first, first + len(items) - 1)
        for row, item in enumerate(items, start=first):
            self.items.append(item)
            self.rows.append(Row.of(item))
            self.shown_index.append(-1 if item.error else len(self.readable_rows))
            if not item.error:
                self.readable_rows.append(row)
            self.rows_of.setdefault(item.path, []).append(row)
        self.endInsertRows()

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.items)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.DisplayRole):
        if orientation == Qt.Horizontal and role == Qt.DisplayRole:
            return self.text(COLUMNS[section])
        return None

    def data(self, index: QModelIndex, role: int = Qt.DisplayRole):
        item, column = self.rows[index.row()], index.column()
        if role == Qt.DisplayRole:
            return self._display(item, column)
        if role == SORT_ROLE:
            return self._sort_key(item, index.row(), column)
        if role == Qt.DecorationRole and column == THUMBNAIL and not item.error:
            return self.thumbnails.get(item.path)
        if role == Qt.ForegroundRole and column == CORRECT and item.correct is not None:
            return QBrush(GREEN if item.correct else RED)
        if role == Qt.ToolTipRole:
            return item.error or item.path
        if role == Qt.TextAlignmentRole and column == CONFIDENCE:
            return int(Qt.AlignRight | Qt.AlignVCenter)
        return None

    def _display(self, item: Row, column: int) -> Optional[str]:
        if column == FILE:
            return os.path.relpath(item.path, self.root) if self.root else item.path
        if column == TRUE_CLASS:
            return self.class_names[item.true_index] if item.true_index is not None else ""
        if item.error:
            return self.text("table_unreadable") if column == PREDICTION else ""
        if column == PREDICTION:
            return self.class_names[item.predicted_index]
        if column == CONFIDENCE:
            return f"{item.probability:.1%}"
        if column == CORRECT:
            return "" if item.correct is None else "✓" if item.correct else "✗"
        return None

    def _sort_key(self, item: Row, row: int, column: int):
        if column == CONFIDENCE:
            return -1.0 if item.error else item.probability
        if column == CORRECT:
            return -1 if item.correct is None else int(item.correct)
        if column == THUMBNAIL:
            return row  # the order of the run
        return self._display(item, column)

    def _thumbnail_ready(self, path: str) -> None:
        for row in self.rows_of.get(path, []):
            cell = self.index(row, THUMBNAIL)
            self.dataChanged.emit(cell, cell, [Qt.DecorationRole])


class ResultsFilter(QSortFilterProxyModel):
    """The rows the filters let through; all set filters apply together."""

    def __init__(self):
        super().__init__()
        self.setSortRole(SORT_ROLE)
        self.mistakes_only = False
        self.unreadable_only = False
        self.class_index: Optional[int] = None  # rows predicted as, or truly of, this class
        self.below: Optional[float] = None  # rows whose confidence is below this
        self.cell: Optional[tuple[int, int]] = None  # (true, predicted): one confusion-matrix cell

    def set_filters(self, **values: object) -> None:
        for name, value in values.items():
            if not hasattr(self, name):
                raise AttributeError(name)
            setattr(self, name, value)
        self.invalidateFilter()

    def filterAcceptsRow(self, source_row: int, source_parent: QModelIndex) -> bool:
        return self.accepts(self.sourceModel().rows[source_row])

    def accepts(self, item: Row) -> bool:
        if self.unreadable_only and not item.error:
            return False
        if item.error:  # an unreadable image has no prediction: only the unreadable filter shows it with others
            return not (self.mistakes_only or self.cell or self.below is not None or self.class_index is not None)
        if self.mistakes_only and item.correct is not False:
            return False
        if self.class_index is not None and self.class_index not in (item.predicted_index, item.true_index):
            return False
        if self.below is not None and not item.probability < self.below:
            return False
        return self.cell is None or self.cell == (item.true_index, item.predicted_index)

    def item_at(self, row: int) -> ImagePrediction:
        return self.sourceModel().items[self.mapToSource(self.index(row, 0)).row()]


class ResultsPanel(QWidget):
    """The filters, the table and a "shown of total" count."""

    image_chosen = pyqtSignal(int)  # index into the window's readable images

    def __init__(self, text: Text):
        super().__init__()
        self.text = text
        self.thumbnails = ThumbnailLoader()
        self.model = ResultsModel(text, self.thumbnails)
        self.proxy = ResultsFilter()
        self.proxy.setSourceModel(self.model)
        self._build_filters()
        self.table = self._build_table()
        self._following = False  # set while follow() moves the selection: that is no choice of the user
        self.count_label = QLabel()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self._filter_rows())
        layout.addWidget(self.table, 1)
        layout.addWidget(self.count_label)
        for signal in (self.proxy.rowsInserted, self.proxy.rowsRemoved, self.proxy.modelReset,
                       self.proxy.layoutChanged):
            signal.connect(self._update_count)
        self._update_count()

    def _build_filters(self) -> None:
        t = self.text
        self.mistakes_box = QCheckBox(t("filter_mistakes"))
        self.unreadable_box = QCheckBox(t("filter_unreadable"))
        self.below_box = QCheckBox(t("filter_below"))
        self.below_spin = QDoubleSpinBox()
        self.below_spin.setRange(0.0, 1.0)
        self.below_spin.setSingleStep(0.05)
        self.below_spin.setValue(0.5)
        self.below_spin.setFocusPolicy(Qt.ClickFocus)  # typing needs the arrows; the window takes them back on Enter
        self.class_combo = QComboBox()
        self.class_combo.setSizeAdjustPolicy(QComboBox.AdjustToContents)  # "All classes" unclipped
        self.class_combo.setToolTip(t("filter_class_tip"))
        self.cell_label = QLabel()
        self.clear_button = QPushButton(t("filter_clear"))
        for widget in (self.mistakes_box, self.unreadable_box, self.below_box, self.class_combo, self.clear_button):
            widget.setFocusPolicy(Qt.NoFocus)  # Space and the arrows stay the viewer's keys
        self.mistakes_box.toggled.connect(lambda on: self.proxy.set_filters(mistakes_only=on))
        self.unreadable_box.toggled.connect(lambda on: self.proxy.set_filters(unreadable_only=on))
        self.below_box.toggled.connect(self._apply_below)
        self.below_spin.valueChanged.connect(self._apply_below)
        self.class_combo.currentIndexChanged.connect(self._apply_class)
        self.clear_button.clicked.connect(self.clear_filters)

    def _filter_rows(self) -> QVBoxLayout:
        first, second = QHBoxLayout(), QHBoxLayout()
        for widget in (self.mistakes_box, self.unreadable_box, self.class_combo):
            first.addWidget(widget)
        first.addStretch(1)
        for widget in (self.below_box, self.below_spin, self.cell_label):
            second.addWidget(widget)
        second.addStretch(1)
        second.addWidget(self.clear_button)
        rows = QVBoxLayout()
        rows.addLayout(first)
        rows.addLayout(second)
        return rows

    def _build_table(self) -> QTableView:
        table = QTableView()
        table.setModel(self.proxy)
        table.setSelectionBehavior(QAbstractItemView.SelectRows)
        table.setSelectionMode(QAbstractItemView.SingleSelection)
        table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        table.setIconSize(QSize(THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        table.setWordWrap(False)
        table.verticalHeader().setVisible(False)
        table.verticalHeader().setDefaultSectionSize(THUMBNAIL_SIDE + 4)
        table.horizontalHeader().setSortIndicator(-1, Qt.AscendingOrder)  # the run's order until a header is clicked
        table.setSortingEnabled(True)
        header = table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.Interactive)
        header.resizeSection(THUMBNAIL, THUMBNAIL_SIDE + 8)
        header.resizeSection(FILE, 150)
        header.setStretchLastSection(True)
        table.selectionModel().currentRowChanged.connect(self._on_current_row)
        return table

    # ---- the run
    def start(self, root: Optional[str], class_names: Sequence[str]) -> None:
        """A new run (or none: clear): empty table, the class list of its checkpoint, filters kept."""
        self.model.start(root, class_names)
        chosen = self.class_combo.currentText() if self.class_combo.currentIndex() > 0 else None
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        self.class_combo.addItems([self.text("filter_all_classes"), *class_names])
        self.class_combo.setCurrentIndex(class_names.index(chosen) + 1 if chosen in class_names else 0)
        self.class_combo.blockSignals(False)
        self._apply_class()
        self.set_cell(None)

    def append(self, items: Sequence[ImagePrediction]) -> None:
        self.model.append(items)

    def shutdown(self) -> None:
        self.thumbnails.shutdown()

    # ---- filters
    def _apply_below(self) -> None:
        self.proxy.set_filters(below=self.below_spin.value() if self.below_box.isChecked() else None)

    def _apply_class(self) -> None:
        index = self.class_combo.currentIndex()
        self.proxy.set_filters(class_index=index - 1 if index > 0 else None)

    def set_cell(self, cell: Optional[tuple[int, int]]) -> None:
        """Show only the images of true class i predicted as j (a confusion-matrix cell); the other
        filters are cleared, so the rows are exactly that cell's count."""
        if cell is not None:
            for box in (self.mistakes_box, self.unreadable_box, self.below_box):
                box.blockSignals(True)
                box.setChecked(False)
                box.blockSignals(False)
            self.class_combo.blockSignals(True)
            self.class_combo.setCurrentIndex(0)
            self.class_combo.blockSignals(False)
            self.proxy.set_filters(mistakes_only=False, unreadable_only=False, below=None, class_index=None)
        self.proxy.set_filters(cell=cell)
        self._show_cell()

    def _show_cell(self) -> None:
        cell, names = self.proxy.cell, self.model.class_names
        self.cell_label.setText(self.text("filter_cell", true=names[cell[0]], predicted=names[cell[1]])
                                if cell else "")

    def clear_filters(self) -> None:
        self.set_cell(None)
        for box in (self.mistakes_box, self.unreadable_box, self.below_box):
            box.setChecked(False)
        self.class_combo.setCurrentIndex(0)

    def _update_count(self) -> None:
        self.count_label.setText(self.text("shown_count", shown=self.proxy.rowCount(), total=self.model.rowCount()))

    # ---- choosing a row
    def _on_current_row(self, current: QModelIndex, _previous: QModelIndex) -> None:
        if not current.isValid() or self._following:
            return
        shown = self.model.shown_index[self.proxy.mapToSource(current).row()]
        if shown >= 0:
            self.image_chosen.emit(shown)

    def follow(self, shown: int) -> None:
        """Select and scroll to the row of readable image `shown` (the viewer moved to it with a key,
        autoplay or the first batch), when the filters let it through."""
        if not 0 <= shown < len(self.model.readable_rows):
            return
        index = self.proxy.mapFromSource(self.model.index(self.model.readable_rows[shown], FILE))
        if not index.isValid():
            return
        self._following = True
        try:
            self.table.setCurrentIndex(index)
            self.table.scrollTo(index)
        finally:
            self._following = False

    def uses_table_order(self) -> bool:
        """Whether Next/Previous follow the table: while a filter or a sort by a column is on (so they
        walk, say, the mistakes, or the least confident first)."""
        proxy = self.proxy
        filtering = proxy.mistakes_only or proxy.unreadable_only or proxy.class_index is not None \
            or proxy.below is not None or proxy.cell is not None
        return filtering or proxy.sortColumn() not in (-1, THUMBNAIL)  # the thumbnail column sorts by run order

    def step_from(self, shown: int, step: int) -> Optional[int]:
        """The readable image `step` rows from readable image `shown` in the table's order (from before
        the first row, or after the last, when `shown` is not in the table: -1 gives the first or the
        last row); None past either end. Cheap: the proxy maps one row, not the whole table."""
        proxy, model = self.proxy, self.model
        row = -1
        if 0 <= shown < len(model.readable_rows):
            index = proxy.mapFromSource(model.index(model.readable_rows[shown], 0))
            row = index.row() if index.isValid() else -1
        if row < 0:
            row = -1 if step > 0 else proxy.rowCount()
        row += step
        while 0 <= row < proxy.rowCount():  # unreadable rows have no picture to show: skipped
            image = model.shown_index[proxy.mapToSource(proxy.index(row, 0)).row()]
            if image >= 0:
                return image
            row += step
        return None

    def visible_items(self) -> list[ImagePrediction]:
        """The rows as the table shows them: filtered and sorted."""
        return [self.proxy.item_at(row) for row in range(self.proxy.rowCount())]
