"""The picture in the viewer: a QGraphicsView that zooms (wheel, around the cursor; +/-), pans
(drag) and fits the window (the default, and on F or 0).

A picture is two items: the caption bar (ui_classification.annotate) above the image. Blown up,
the image is drawn nearest-neighbour, so a small image shows its real pixels instead of a blur,
and once a source pixel covers GRID_MIN_PIXELS screen pixels a grid marks the pixel borders.
The window binds the keys (window-wide shortcuts); this widget handles the mouse.
"""

from __future__ import annotations

from typing import Optional

from PyQt5.QtCore import QLineF, QPoint, QRectF, QSize, Qt
from PyQt5.QtGui import QColor, QImage, QPainter, QPen, QPixmap, QResizeEvent, QTransform, QWheelEvent
from PyQt5.QtWidgets import QFrame, QGraphicsPixmapItem, QGraphicsScene, QGraphicsView, QLabel, QSizePolicy

ZOOM_STEP = 1.25  # one wheel notch or one +/- press
NEAREST_FROM = 2.0  # screen pixels per source pixel from which the image is drawn nearest-neighbour
GRID_MIN_PIXELS = 8  # screen pixels per source pixel from which the pixel grid is drawn
MAX_PIXEL_ZOOM = 256.0  # the closest zoom: one source pixel covers this many screen pixels
MIN_FIT_SHARE = 0.5  # the farthest zoom: half the fitted size, or half the source's real size if smaller
GRID_COLOUR = QColor(128, 128, 128, 170)
BACKGROUND = "#202124"


class ImageView(QGraphicsView):
    """Shows a captioned picture, or a placeholder text when there is none."""

    def __init__(self, placeholder: str):
        super().__init__()
        self.setScene(QGraphicsScene(self))
        self.bar_item = QGraphicsPixmapItem()  # the caption, always smooth (text)
        self.bar_item.setTransformationMode(Qt.SmoothTransformation)
        self.image_item = QGraphicsPixmapItem()
        self.source = QPixmap()  # the image at full size; image_item may hold a shrunk copy (_update_rendering)
        for item in (self.bar_item, self.image_item):
            self.scene().addItem(item)
        self.pixel = 1.0  # scene units per source pixel (annotate enlarges small images by a whole factor)
        self.fitted = True  # follow the window's size until the user zooms or pans
        self.placeholder = QLabel(placeholder, self.viewport())
        self.placeholder.setAlignment(Qt.AlignCenter)
        self.placeholder.setWordWrap(True)
        self.placeholder.setStyleSheet(f"color: #e8eaed; background-color: {BACKGROUND};")
        self.setMinimumSize(240, 180)
        self.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Ignored)  # the picture must not grow the window
        self.setFrameShape(QFrame.NoFrame)
        self.setStyleSheet(f"background-color: {BACKGROUND};")
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)  # scroll bars would change the size fitted to
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setDragMode(QGraphicsView.ScrollHandDrag)
        self.setTransformationAnchor(QGraphicsView.NoAnchor)  # zoom_by keeps its own anchor
        self.setResizeAnchor(QGraphicsView.AnchorViewCenter)
        self.setViewportUpdateMode(QGraphicsView.FullViewportUpdate)  # the grid spans the whole view

    # ---- content
    def set_picture(self, bar: QImage, image: QImage, pixel: float = 1.0) -> None:
        """The caption bar over the image; `pixel`: how many of the image's pixels make one source pixel.
        A picture of the same size keeps the zoom and position, so stepping through a folder (or
        toggling the heat map of an image at the model's size) compares like with like."""
        same_size = not self.fitted and self.source.size() == image.size() and \
            self.bar_item.pixmap().height() == bar.height()
        self.bar_item.setPixmap(QPixmap.fromImage(bar))
        self.source = QPixmap.fromImage(image)
        self.image_item.setPixmap(self.source)
        self.image_item.setTransform(QTransform())
        self.image_item.setPos(0, bar.height())
        self.pixel = pixel
        self.scene().setSceneRect(self._content_rect())
        self.placeholder.hide()
        if not same_size:
            self.fit()
        self._update_rendering()

    def set_placeholder(self, text: str) -> None:
        self.bar_item.setPixmap(QPixmap())
        self.source = QPixmap()
        self.image_item.setPixmap(self.source)
        self.scene().setSceneRect(QRectF())
        self.placeholder.setText(text)
        self.placeholder.show()
        self.fitted = True

    def text(self) -> str:
        """The placeholder shown, "" while a picture is shown."""
        return "" if self.has_picture() else self.placeholder.text()

    def has_picture(self) -> bool:
        return not self.source.isNull()

    def pixmap(self) -> QPixmap:
        return self.source

    def _content_rect(self) -> QRectF:
        return self.bar_item.sceneBoundingRect().united(self.image_item.sceneBoundingRect())

    # ---- zoom
    @property
    def zoom(self) -> float:
        """Screen pixels per scene unit (the view's scale)."""
        return self.transform().m11()

    @property
    def screen_pixels_per_source_pixel(self) -> float:
        return self.zoom * self.pixel

    def fit(self) -> None:
        """The whole picture in the window, aspect ratio kept; it follows the window's size."""
        self.fitted = True
        if self.has_picture():
            self.fitInView(self._content_rect(), Qt.KeepAspectRatio)
        self._update_rendering()

    def zoom_in(self) -> None:
        self.zoom_by(ZOOM_STEP)

    def zoom_out(self) -> None:
        self.zoom_by(1 / ZOOM_STEP)

    def zoom_by(self, factor: float, anchor: Optional[QPoint] = None) -> None:
        """Zoom keeping the picture's point under `anchor` (a viewport position: the mouse for the
        wheel) where it is; without one, around the view's centre (keys)."""
        if not self.has_picture():
            return
        target = min(max(self.zoom * factor, self._min_zoom()), MAX_PIXEL_ZOOM / self.pixel)
        if target == self.zoom:
            return
        anchor = anchor if anchor is not None else self.viewport().rect().center()
        held = self.mapToScene(anchor)
        centre = self.mapToScene(self.viewport().rect().center())
        before = self.zoom
        self.scale(target / before, target / before)
        # the scene point under the anchor stays there: the centre moves toward it by the zoom's ratio
        self.centerOn(held + (centre - held) * (before / target))
        self.fitted = False
        self._update_rendering()

    def _min_zoom(self) -> float:
        rect = self._content_rect()
        viewport = self.viewport().size()
        fit = min(viewport.width() / max(rect.width(), 1.0), viewport.height() / max(rect.height(), 1.0))
        return MIN_FIT_SHARE * min(fit, 1.0 / self.pixel)  # down to half the source's real size

    def _update_rendering(self) -> None:
        """Nearest-neighbour when blown up (real pixels); when a source pixel is smaller than a screen
        pixel, an area-averaged copy at the screen size (Qt's smooth transform samples bilinearly,
        and thin lines would break up)."""
        if self.source.isNull():
            return
        nearest = self.screen_pixels_per_source_pixel >= NEAREST_FROM
        self.image_item.setTransformationMode(Qt.FastTransformation if nearest else Qt.SmoothTransformation)
        width, height = self.source.width(), self.source.height()
        if self.screen_pixels_per_source_pixel >= 1:
            if self.image_item.pixmap().cacheKey() != self.source.cacheKey():
                self.image_item.setPixmap(self.source)
                self.image_item.setTransform(QTransform())
            return
        size = QSize(max(1, round(width * self.zoom)), max(1, round(height * self.zoom)))
        if self.image_item.pixmap().size() != size:
            self.image_item.setPixmap(self.source.scaled(size, Qt.IgnoreAspectRatio, Qt.SmoothTransformation))
            self.image_item.setTransform(QTransform.fromScale(width / size.width(), height / size.height()))

    # ---- Qt events
    def wheelEvent(self, event: QWheelEvent) -> None:
        notches = event.angleDelta().y() / 120
        if notches:
            self.zoom_by(ZOOM_STEP ** notches, event.pos())
        event.accept()

    def mouseMoveEvent(self, event) -> None:
        if event.buttons() & Qt.LeftButton:
            self.fitted = False  # a drag pans: the window's size no longer decides the view
        super().mouseMoveEvent(event)

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self.placeholder.resize(self.viewport().size())
        if self.fitted:
            self.fit()

    def drawForeground(self, painter: QPainter, rect: QRectF) -> None:
        """The pixel grid over the image, once a source pixel is big enough on screen to be told apart;
        only the lines in the exposed rectangle, so their number stays bounded by the view's size."""
        if not self.has_picture() or self.screen_pixels_per_source_pixel < GRID_MIN_PIXELS:
            return
        image = self.image_item.sceneBoundingRect()
        area = image.intersected(rect)
        if area.isEmpty():
            return
        painter.save()
        painter.setRenderHint(QPainter.Antialiasing, False)
        painter.setPen(QPen(GRID_COLOUR, 0))  # cosmetic: one screen pixel wide at any zoom
        for column in _borders(area.left() - image.left(), area.right() - image.left(), image.width(), self.pixel):
            x = image.left() + column
            painter.drawLine(QLineF(x, area.top(), x, area.bottom()))
        for row in _borders(area.top() - image.top(), area.bottom() - image.top(), image.height(), self.pixel):
            y = image.top() + row
            painter.drawLine(QLineF(area.left(), y, area.right(), y))
        painter.restore()


def _borders(start: float, end: float, size: float, pixel: float) -> list[float]:
    """Offsets of the pixel borders between `start` and `end` (within 0..size), `pixel` apart."""
    first = max(0, int(start // pixel))
    last = min(round(size / pixel), int(end // pixel) + 1)
    return [index * pixel for index in range(first, last + 1)]
