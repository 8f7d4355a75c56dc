"""Per-class bars for the metrics panel, drawn with QPainter (no plotting library in the GUI).

One row per class: its name, then a thin bar each for precision, recall and F1 on a 0-1 scale
with the value at its end, under a legend. The geometry is computed by `bar_rects`, which
paintEvent draws and the tests check, so what is drawn is what is tested.
"""

from __future__ import annotations

from collections.abc import Sequence

from PyQt5.QtCore import QRectF, QSize, Qt
from PyQt5.QtGui import QColor, QFontMetrics, QPainter, QPaintEvent
from PyQt5.QtWidgets import QSizePolicy, QWidget

from ui_classification.strings import Text

METRICS = (("precision", "chart_precision", QColor("#1a73e8")), ("recall", "chart_recall", QColor("#e8710a")),
           ("f1", "chart_f1", QColor("#188038")))
BAR_HEIGHT = 5
ROW_GAP = 6
MARGIN = 6
VALUE_WIDTH = 40  # room for "0.98" after the longest bar


class PerClassBars(QWidget):
    """Precision, recall and F1 per class as horizontal bars (utils.metrics.per_class_rows' rows)."""

    def __init__(self, text: Text):
        super().__init__()
        self.text = text
        self.rows: list[dict] = []
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Minimum)

    def set_rows(self, rows: Sequence[dict]) -> None:
        self.rows = list(rows)
        self.updateGeometry()  # the height follows the number of classes (the panel scrolls)
        self.update()

    def _legend_height(self) -> int:
        return QFontMetrics(self.font()).height() + ROW_GAP

    def _row_height(self) -> int:
        return max(len(METRICS) * BAR_HEIGHT, QFontMetrics(self.font()).height()) + ROW_GAP

    def _label_width(self) -> int:
        metrics = QFontMetrics(self.font())
        return max([metrics.horizontalAdvance(str(row["class"])) for row in self.rows] or [0]) + MARGIN

    def sizeHint(self) -> QSize:
        return QSize(240, self.minimumSizeHint().height())

    def minimumSizeHint(self) -> QSize:
        return QSize(160, 2 * MARGIN + self._legend_height() + len(self.rows) * self._row_height())

    def bar_rects(self) -> list[tuple[int, str, QRectF]]:
        """(row, metric name, rectangle) of every bar; a bar's width is its value times the scale."""
        left = MARGIN + self._label_width()
        scale = max(1.0, self.width() - left - MARGIN - VALUE_WIDTH)
        rects = []
        for row_number, row in enumerate(self.rows):
            top = MARGIN + self._legend_height() + row_number * self._row_height()
            for rank, (name, _, _) in enumerate(METRICS):
                rects.append((row_number, name, QRectF(left, top + rank * BAR_HEIGHT, row[name] * scale, BAR_HEIGHT - 1)))
        return rects

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), Qt.white)
        painter.setPen(Qt.black)
        if not self.rows:
            painter.drawText(self.rect().adjusted(MARGIN, MARGIN, -MARGIN, -MARGIN), Qt.TextWordWrap,
                             self.text("chart_empty"))
            return
        self._draw_legend(painter)
        colours = {name: colour for name, _, colour in METRICS}
        row_height = self._row_height()
        for row_number, name, rect in self.bar_rects():
            painter.fillRect(rect, colours[name])
            if name == METRICS[0][0]:  # the class name once per row
                label = QRectF(MARGIN, rect.top(), self._label_width(), row_height - ROW_GAP)
                painter.drawText(label, Qt.AlignLeft | Qt.AlignVCenter, str(self.rows[row_number]["class"]))
            if name == "f1":  # the F1 value after the bars
                value = QRectF(rect.right() + 3, rect.bottom() - row_height, VALUE_WIDTH, row_height)
                painter.drawText(value, Qt.AlignLeft | Qt.AlignBottom, f"{self.rows[row_number]['f1']:.2f}")

    def _draw_legend(self, painter: QPainter) -> None:
        metrics = QFontMetrics(self.font())
        x = MARGIN
        for _, key, colour in METRICS:
            painter.fillRect(QRectF(x, MARGIN + 3, 10, 10), colour)
            label = self.text(key)
            painter.drawText(int(x + 14), MARGIN + metrics.ascent(), label)
            x += 14 + metrics.horizontalAdvance(label) + 12
