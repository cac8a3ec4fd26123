"""Series thumbnails for the study browser: the middle slice, windowed, shrunk to an icon."""

from __future__ import annotations

import numpy as np
from PySide6.QtGui import QIcon, QImage, QPixmap

from klviewer.app.display import initial_window
from klviewer.io.study import Series

THUMBNAIL_PX = 40


def thumbnail_pixels(series: Series, size: int = THUMBNAIL_PX) -> np.ndarray | None:
    """(size, size) uint8 grey of the series' middle slice in its own window (soft tissue without one),
    letterboxed to a square; None for a series without images (a sinogram before reconstruction)."""
    if not series.slices:
        return None
    hu = series.slices[len(series.slices) // 2].hu
    if hu is None or hu.ndim != 2 or hu.size == 0:
        return None
    low, high = initial_window(series).levels
    grey = np.clip((hu.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    h, w = grey.shape
    step = max(h, w) / size
    rows = np.minimum((np.arange(int(round(h / step))) * step).astype(int), h - 1)
    cols = np.minimum((np.arange(int(round(w / step))) * step).astype(int), w - 1)
    small = grey[np.ix_(rows, cols)]
    out = np.zeros((size, size), np.uint8)
    top, left = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    out[top:top + small.shape[0], left:left + small.shape[1]] = np.round(small * 255).astype(np.uint8)
    return out


def thumbnail_icon(series: Series) -> QIcon | None:
    pixels = thumbnail_pixels(series)
    if pixels is None:
        return None
    image = QImage(pixels.data, pixels.shape[1], pixels.shape[0], pixels.strides[0], QImage.Format.Format_Grayscale8)
    return QIcon(QPixmap.fromImage(image.copy()))  # the copy owns its pixels once `pixels` is gone
