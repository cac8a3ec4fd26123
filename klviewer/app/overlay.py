"""The KL overlay drawn over the base image: inferno heat map, colour bar, flagged-patch outlines.

It renders an `OverlayFrame` (klviewer.app.display); all numbers come from there.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QPainterPath, QPen
from PySide6.QtWidgets import QGraphicsPathItem

from klviewer.app.display import OverlayFrame, colorbar_ticks
from klviewer.overlay_rules import COLORMAP, OUTLINE_RGB

OUTLINE_COLOR = QColor.fromRgbF(*OUTLINE_RGB)
COLORBAR_WIDTH = 150
BAR_STEPS = 256
"""The colour bar's own coordinates run over its 256 colours."""


class OverlayLayer:
    """Items that live in the viewer's ViewBox, plus the colour bar beside it."""

    def __init__(self, view: pg.ViewBox, layout: pg.GraphicsLayout, col: int) -> None:
        self.image = pg.ImageItem(axisOrder="row-major")
        self.image.setZValue(10)
        self.image.setColorMap(pg.colormap.get(COLORMAP))
        view.addItem(self.image)

        self.outlines = QGraphicsPathItem()
        pen = QPen(OUTLINE_COLOR)
        pen.setWidthF(1.6)
        pen.setCosmetic(True)  # the same thickness at every zoom
        self.outlines.setPen(pen)
        self.outlines.setZValue(20)
        view.addItem(self.outlines)

        self.colorbar = pg.ColorBarItem(values=(0.0, 1.0), colorMap=pg.colormap.get(COLORMAP), interactive=False,
                                        width=14, colorMapMenu=False)
        self.colorbar.axis.setLabel("KL per patch (nats)")  # beside the ticks; the default place overlaps the bar
        self.colorbar.axis.setWidth(82)  # room for "max 6076" beside the bar, the title beyond it
        self.colorbar.setImageItem(self.image)
        self.colorbar.setFixedWidth(COLORBAR_WIDTH)  # else the layout squeezes its tick labels off screen
        layout.addItem(self.colorbar, row=0, col=col)
        # The flag rule's threshold (cyan, as the outlines) and the slice's maximum (white, dashed) on the bar.
        self.threshold_line = pg.InfiniteLine(angle=0, movable=False, pen=pg.mkPen(OUTLINE_COLOR, width=2))
        self.max_line = pg.InfiniteLine(angle=0, movable=False,
                                        pen=pg.mkPen("w", width=2, style=Qt.PenStyle.DashLine))
        for line in (self.threshold_line, self.max_line):
            line.setZValue(100)
            self.colorbar.addItem(line)

        self.frame: OverlayFrame | None = None
        self._visible = True
        self._opacity = 0.6
        self._extent = QRectF()
        self._apply_visibility()

    def set_frame(self, frame: OverlayFrame | None, extent: QRectF) -> None:
        """Show `frame` stretched over `extent` (the base image's rectangle in view coordinates)."""
        self.frame = frame
        self._extent = extent
        if frame is not None:
            self.colorbar.axis.setLabel(frame.scale_label())
            self.colorbar.setToolTip(frame.scale_tooltip())
            self.colorbar.setLevels(frame.levels)
            self._mark(frame)
            self.image.setImage(frame.pixels, autoLevels=False, levels=frame.levels)
            self.image.setRect(extent)
            self._draw_outlines(frame)
        self._apply_visibility()

    def _mark(self, frame: OverlayFrame) -> None:
        lo, hi = frame.levels

        def bar_y(value: float) -> float:
            return BAR_STEPS * (min(max(value, lo), hi) - lo) / (hi - lo)

        self.max_line.setPos(bar_y(frame.peak))
        self.threshold_line.setVisible(frame.threshold_mark is not None)
        if frame.threshold_mark is not None:
            self.threshold_line.setPos(bar_y(frame.threshold_mark))
        self.colorbar.axis.setTicks([colorbar_ticks(frame)])

    def _draw_outlines(self, frame: OverlayFrame) -> None:
        h, w = frame.pixels.shape
        sx, sy = self._extent.width() / w, self._extent.height() / h
        path = QPainterPath()
        for r0, r1, c0, c1 in frame.boxes:
            path.addRect(QRectF(self._extent.x() + c0 * sx, self._extent.y() + r0 * sy, (c1 - c0) * sx, (r1 - r0) * sy))
        self.outlines.setPath(path)

    def set_visible(self, visible: bool) -> None:
        self._visible = visible
        self._apply_visibility()

    @property
    def visible(self) -> bool:
        return self._visible

    def set_opacity(self, opacity: float) -> None:
        self._opacity = float(np.clip(opacity, 0.0, 1.0))
        self.image.setOpacity(self._opacity)

    def _apply_visibility(self) -> None:
        shown = self._visible and self.frame is not None
        self.image.setVisible(shown)
        self.image.setOpacity(self._opacity)
        self.outlines.setVisible(shown)
        self.colorbar.setVisible(shown)

    def value_at(self, row: int, col: int) -> float | None:
        """KL (nats, or z-score when the frame shows z) of the patch covering data pixel (row, col),
        whatever the display threshold; NaN off the body for z-scores."""
        if self.frame is None:
            return None
        h, w = self.frame.raw_pixels.shape
        if 0 <= row < h and 0 <= col < w:
            return float(self.frame.raw_pixels[row, col])
        return None

    def has_data(self) -> bool:
        return self.frame is not None and bool(np.isfinite(self.frame.pixels).any())
