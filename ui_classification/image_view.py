"""The picture in the viewer: a QGraphicsView that zooms (wheel, around the cursor; +/-), pans
(drag) and fits the window (the default, and on F or 0).

A picture is two items: the caption bar (ui_classification.annotate) above the image. Blown up,
the image is drawn nearest-neighbour, so a small image shows its real pixels instead of a blur,
and once a source pixel covers GRID_MIN_PIXELS screen pixels a grid marks the pixel borders.
The window binds the keys (window-wide shortcuts); this widget handles the mouse.

A large photo may come decoded smaller (`shrink` times: the window asks read_rgb for the size that
`decode_size` names, which is what the screen shows of it). The scene keeps the full image's
coordinates, so nothing moves when, zoomed in past the reduced pixels, the view asks for the full
decode (`full_image_wanted`) and `set_full_image` puts it in place.
"""

from __future__ import annotations

import math
from typing import Optional

from PyQt5.QtCore import QLineF, QPoint, QRectF, QSize, QSizeF, Qt, pyqtSignal
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

    full_image_wanted = pyqtSignal()  # the image was decoded smaller, and is now shown larger than that

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
        self.shrink = 1  # the image was decoded this many times smaller: each of its pixels covers shrink scene units
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
    def set_picture(self, bar: QImage, image: QImage, pixel: float = 1.0, shrink: int = 1) -> None:
        """The caption bar over the image; `pixel`: how many of the image's pixels make one source pixel;
        `shrink`: the image was decoded that many times smaller (bar and image are drawn that much larger).
        A picture of the same size keeps the zoom and the image's position, so stepping through a
        folder (or toggling the heat map of an image at the model's size) compares like with like."""
        keep_view = not self.fitted and self.has_picture() and \
            self._image_size() == QSizeF(image.width() * shrink, image.height() * shrink)
        old_top, old_centre = self.image_item.pos().y(), self.mapToScene(self.viewport().rect().center())
        self.shrink = shrink
        self.bar_item.setPixmap(QPixmap.fromImage(bar))
        self.bar_item.setTransform(QTransform.fromScale(shrink, shrink))
        self.source = QPixmap.fromImage(image)
        self.image_item.setPixmap(self.source)
        self.image_item.setTransform(QTransform.fromScale(shrink, shrink))
        self.image_item.setPos(0, bar.height() * shrink)
        self.pixel = pixel
        self.scene().setSceneRect(self._content_rect())
        self.placeholder.hide()
        if not keep_view:
            self.fit()
        elif self.image_item.pos().y() != old_top:  # a caption of another height: the image stays put
            self.centerOn(old_centre.x(), old_centre.y() + self.image_item.pos().y() - old_top)
        self._update_rendering()

    def set_full_image(self, image: QImage) -> bool:
        """Put the full decode of the image shown reduced in its place: same scene, zoom and position.
        False (nothing changed) when it is not that image's size, as after the file changed on disk."""
        if self.shrink == 1 or QSizeF(image.width(), image.height()) != self._image_size():
            return False
        self.shrink = 1
        self.source = QPixmap.fromImage(image)
        self.image_item.setPixmap(self.source)
        self.image_item.setTransform(QTransform())
        self._update_rendering()
        return True

    def decode_size(self, height: int, width: int) -> tuple[int, int]:
        """[H, W] in device pixels: how large an image of `height` x `width` pixels is about to be
        shown, so it may be decoded that small. Fitted to the view, or at the current zoom for an
        image of the size shown now (set_picture keeps that zoom)."""
        if not self.fitted and self.has_picture() and self._image_size() == QSizeF(width, height):
            scale = self.zoom
        else:  # fitInView leaves a margin and the caption takes some height: the fitted zoom is below this
            viewport = self.viewport().size()
            scale = min(viewport.width() / width, viewport.height() / height)
        scale *= self.devicePixelRatioF()
        return math.ceil(height * scale), math.ceil(width * scale)

    def set_placeholder(self, text: str) -> None:
        self.bar_item.setPixmap(QPixmap())
        self.source = QPixmap()
        self.shrink = 1
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

    def needs_full_image(self) -> bool:
        """A reduced decode shown larger than its pixels (zoomed in, or the window made larger)."""
        return self.shrink > 1 and self.zoom * self.shrink * self.devicePixelRatioF() > 1.001

    def _image_size(self) -> QSizeF:
        """The image's size in scene units: its size before a reduced decode."""
        return QSizeF(self.source.width() * self.shrink, self.source.height() * self.shrink)

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
        and thin lines would break up). A reduced decode shown larger than its pixels asks for the full one."""
        if self.source.isNull():
            return
        scale = self.zoom * self.shrink  # screen pixels per pixel of `source`
        if self.needs_full_image():
            self.full_image_wanted.emit()  # the window answers with set_full_image (queued)
        nearest = scale * self.pixel >= NEAREST_FROM
        self.image_item.setTransformationMode(Qt.FastTransformation if nearest else Qt.SmoothTransformation)
        width, height = self.source.width(), self.source.height()
        if scale * self.pixel >= 1:
            if self.image_item.pixmap().cacheKey() != self.source.cacheKey():
                self.image_item.setPixmap(self.source)
                self.image_item.setTransform(QTransform.fromScale(self.shrink, self.shrink))
            return
        size = QSize(max(1, round(width * scale)), max(1, round(height * scale)))
        if self.image_item.pixmap().size() != size:
            self.image_item.setPixmap(self.source.scaled(size, Qt.IgnoreAspectRatio, Qt.SmoothTransformation))
            self.image_item.setTransform(QTransform.fromScale(width * self.shrink / size.width(),
                                                              height * self.shrink / size.height()))

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
