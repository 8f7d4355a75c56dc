"""Draw a prediction on an image with QPainter on a QImage.

QImage (unlike QPixmap) may be painted in any thread, so the worker uses the same function to
write the annotated copies that the window shows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PyQt5.QtCore import QRect, Qt
from PyQt5.QtGui import QColor, QFont, QFontMetrics, QImage, QPainter

from ui_classification.results import ImagePrediction
from ui_classification.strings import Text
from utils.files import unique_path

MIN_SIDE = 320  # smaller images are enlarged first, so the caption stays legible (digits are 32 px)
SAVE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")  # kept on save; other formats are saved as PNG
PREDICTION_COLOUR = QColor(255, 230, 80)
CORRECT_COLOUR = QColor(90, 230, 90)
INCORRECT_COLOUR = QColor(255, 90, 90)


def to_qimage(array: np.ndarray) -> QImage:
    """RGB uint8 HWC array (what utils.data.read_rgb returns) -> a QImage that owns its pixels."""
    array = np.ascontiguousarray(array)
    height, width = array.shape[:2]
    return QImage(array.data, width, height, 3 * width, QImage.Format_RGB888).copy()


def caption_lines(item: ImagePrediction, class_names: Sequence[str], text: Text) -> list[tuple[str, QColor]]:
    """The text drawn on the image: prediction and probability, then the true class when known."""
    lines = [(text("overlay_prediction", name=class_names[item.predicted_index],
                   probability=f"{item.probability:.1%}"), PREDICTION_COLOUR)]
    if item.true_index is not None:
        mark, colour = ("✓", CORRECT_COLOUR) if item.correct else ("✗", INCORRECT_COLOUR)
        lines.append((text("overlay_truth", name=class_names[item.true_index], mark=mark), colour))
    return lines


def draw_caption(image: QImage, lines: Sequence[tuple[str, QColor]]) -> QImage:
    """A copy of `image` with `lines` on a translucent band at the top left."""
    if max(image.width(), image.height()) < MIN_SIDE:
        image = image.scaled(MIN_SIDE, MIN_SIDE, Qt.KeepAspectRatio, Qt.SmoothTransformation)
    canvas = image.convertToFormat(QImage.Format_RGB32)
    font = QFont()
    font.setPixelSize(max(12, round(min(canvas.width(), canvas.height()) * 0.07)))
    font.setBold(True)
    metrics = QFontMetrics(font)
    margin = max(2, font.pixelSize() // 4)
    width = max(metrics.horizontalAdvance(line) for line, _ in lines) + 2 * margin
    height = metrics.height() * len(lines) + 2 * margin
    painter = QPainter(canvas)
    painter.fillRect(QRect(0, 0, width, height), QColor(0, 0, 0, 160))
    painter.setFont(font)
    for row, (line, colour) in enumerate(lines):
        painter.setPen(colour)
        painter.drawText(margin, margin + row * metrics.height() + metrics.ascent(), line)
    painter.end()
    return canvas


def annotate(array: np.ndarray, item: ImagePrediction, class_names: Sequence[str], text: Text) -> QImage:
    return draw_caption(to_qimage(array), caption_lines(item, class_names, text))


def save_annotated(image: QImage, folder: str | os.PathLike, source_path: str) -> str:
    """Save under the source's file name, made unique in `folder`; returns the path, or "" on failure."""
    stem, suffix = os.path.splitext(os.path.basename(source_path))
    if suffix.lower() not in SAVE_SUFFIXES:
        suffix = ".png"
    path = unique_path(folder, stem + suffix)
    return path if image.save(path) else ""
