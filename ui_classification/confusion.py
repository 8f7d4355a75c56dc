"""The confusion matrix of the run so far, as a clickable table: rows are the true classes,
columns the predicted ones (as utils.metrics and infer.py's confusion_matrix.png).

Each cell holds its count, shaded by its share of the row (the recall of the diagonal, the
confusion rate elsewhere): green on the diagonal, red off it. Clicking a cell emits
`ConfusionView.cell_chosen(true, predicted)`; the window filters the results table to it.
A model, not a table of items: a 100-class matrix is refreshed after every batch by one
dataChanged, and Qt draws only the cells on screen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from PyQt5.QtCore import QAbstractTableModel, QModelIndex, Qt, pyqtSignal
from PyQt5.QtGui import QBrush, QColor
from PyQt5.QtWidgets import QAbstractItemView, QHeaderView, QTableView

from ui_classification.strings import Text

if TYPE_CHECKING:  # the window imports this module before torch is loaded
    import torch

DIAGONAL, OFF_DIAGONAL = (30, 142, 62), (217, 48, 37)  # the green and red of the window's verdicts


def shade(share: float, rgb: tuple[int, int, int]) -> QColor:
    """White at share 0, the full colour at share 1."""
    return QColor(*(round(255 - (255 - channel) * share) for channel in rgb))


class ConfusionModel(QAbstractTableModel):
    def __init__(self, text: Text):
        super().__init__()
        self.text = text
        self.class_names: list[str] = []
        self.counts: list[list[int]] = []
        self.row_totals: list[int] = []

    def set_matrix(self, class_names: Sequence[str], confusion: Optional[torch.Tensor]) -> None:
        """The counts (rows = true, columns = predicted); None empties the matrix (class names kept)."""
        names = list(class_names)
        counts = confusion.tolist() if confusion is not None else [[0] * len(names) for _ in names]
        if names != self.class_names:
            self.beginResetModel()
            self.class_names, self.counts, self.row_totals = names, counts, [sum(row) for row in counts]
            self.endResetModel()
            return
        self.counts, self.row_totals = counts, [sum(row) for row in counts]
        if names:
            self.dataChanged.emit(self.index(0, 0), self.index(len(names) - 1, len(names) - 1))

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.class_names)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:
        return self.rowCount(parent)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.DisplayRole):
        if role == Qt.DisplayRole:
            return self.class_names[section]
        if role == Qt.ToolTipRole:
            return self.text("confusion_true" if orientation == Qt.Vertical else "confusion_predicted",
                             name=self.class_names[section])
        return None

    def data(self, index: QModelIndex, role: int = Qt.DisplayRole):
        true, predicted = index.row(), index.column()
        count = self.counts[true][predicted]
        if role == Qt.DisplayRole:
            return str(count)
        if role == Qt.TextAlignmentRole:
            return int(Qt.AlignCenter)
        if role == Qt.BackgroundRole and count:
            share = count / self.row_totals[true]
            return QBrush(shade(share, DIAGONAL if true == predicted else OFF_DIAGONAL))
        if role == Qt.ForegroundRole and count and count / self.row_totals[true] > 0.5:
            return QBrush(Qt.white)
        if role == Qt.ToolTipRole:
            return self.text("confusion_cell", count=count, true=self.class_names[true],
                             predicted=self.class_names[predicted])
        return None


class ConfusionView(QTableView):
    cell_chosen = pyqtSignal(int, int)  # true class index, predicted class index

    def __init__(self, text: Text):
        super().__init__()
        self.matrix = ConfusionModel(text)
        self.setModel(self.matrix)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.setSelectionMode(QAbstractItemView.SingleSelection)
        self.setFocusPolicy(Qt.NoFocus)
        self.setToolTip(text("confusion_tip"))
        for header in (self.horizontalHeader(), self.verticalHeader()):
            header.setSectionResizeMode(QHeaderView.ResizeToContents)
            header.setMinimumSectionSize(24)
        self.clicked.connect(lambda index: self.cell_chosen.emit(index.row(), index.column()))

    def set_matrix(self, class_names: Sequence[str], confusion: Optional[torch.Tensor]) -> None:
        self.matrix.set_matrix(class_names, confusion)

    def click_cell(self, true: int, predicted: int) -> None:
        """What a click on cell (true, predicted) does."""
        index = self.matrix.index(true, predicted)
        self.setCurrentIndex(index)
        self.clicked.emit(index)
