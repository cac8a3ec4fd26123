"""Measurement shapes on the slice viewer: a distance line, ellipse and rectangle ROIs, each with its readout.

A shape is placed in the middle of the view and then moved or resized with its handles; its
readout (length, or HU mean ± SD, area, KL and KL z-score inside) follows. Shapes belong to one
slice of one series and show only there. What they measure is computed in
`klviewer.app.measurements`; the records live in the session model, so the session file and the
PDF report have them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyqtgraph as pg

from klviewer.app.measurements import Measurement, distance_text, roi_mask, roi_stats

if TYPE_CHECKING:
    from klviewer.app.main_window import MainWindow

PEN = pg.mkPen("#ffd84d", width=2)
LABEL_COLOR = "#ffd84d"


class MeasureTools:
    def __init__(self, window: MainWindow) -> None:
        self.w = window
        self.drawn: list[tuple[Measurement, pg.ROI, pg.TextItem]] = []

    @property
    def viewer(self):
        return self.w.viewer

    def add(self, kind: str) -> Measurement | None:
        """Place a new `kind` shape in the middle of the view; None when no slice is shown."""
        ctx = self.viewer.context
        if ctx is None:
            return None
        rect = self.viewer.view.viewRect()
        cx, cy, w, h = rect.center().x(), rect.center().y(), rect.width() / 4, rect.height() / 4
        geometry = (cx - w / 2, cy, cx + w / 2, cy) if kind == "distance" else (cx - w / 2, cy - h / 2, w, h)
        measurement = Measurement(kind, ctx.series.uid, ctx.index, geometry)
        self.w.model.measurements.append(measurement)
        self.draw(measurement)
        return measurement

    def draw(self, m: Measurement) -> None:
        x0, y0, a, b = m.geometry
        if m.kind == "distance":
            roi = pg.LineSegmentROI([[x0, y0], [a, b]], pen=PEN)
        elif m.kind == "ellipse":
            roi = pg.EllipseROI((x0, y0), (a, b), pen=PEN)
            for handle in list(roi.getHandles()):
                if handle.typ == "r":  # statistics assume an unrotated shape
                    roi.removeHandle(handle)
        else:
            roi = pg.RectROI((x0, y0), (a, b), pen=PEN)
        roi.setZValue(30)
        label = pg.TextItem(color=LABEL_COLOR, anchor=(0, 1), fill=pg.mkBrush(0, 0, 0, 160))
        label.setZValue(31)
        self.viewer.view.addItem(roi)
        self.viewer.view.addItem(label)
        self.drawn.append((m, roi, label))
        roi.sigRegionChanged.connect(lambda _roi, m=m, roi=roi, label=label: self._moved(m, roi, label))
        self._moved(m, roi, label)

    def _moved(self, m: Measurement, roi: pg.ROI, label: pg.TextItem) -> None:
        pos = roi.pos()
        if m.kind == "distance":
            (p0, p1) = [roi.mapToParent(h["item"].pos()) for h in roi.handles]
            m.geometry = (p0.x(), p0.y(), p1.x(), p1.y())
        else:
            size = roi.size()
            m.geometry = (pos.x(), pos.y(), size.x(), size.y())
        self.measure(m)
        label.setText(m.text)
        label.setPos(m.geometry[0], m.geometry[1])

    def measure(self, m: Measurement) -> None:
        """Compute `m.text` from the slice as shown: the base image, and the KL map at the sliders' settings."""
        ctx = self.viewer.context
        image = self.viewer.base.image
        if ctx is None or image is None or (ctx.series.uid, ctx.index) != (m.series_uid, m.slice_index):
            return
        native = ctx.series.image_shape
        spacing = ctx.series.pixel_spacing_mm
        mm_per_unit = spacing[1] if spacing else None
        if mm_per_unit is None and ctx.result is not None:
            mm_per_unit = ctx.result.pixel_spacing_mm * image.shape[1] / native[1]
        if m.kind == "distance":
            m.text = distance_text(m.geometry, mm_per_unit)
            return
        mask = roi_mask(m.kind, m.geometry, native, image.shape)
        pixel_kl = z = None
        frame = self.viewer.overlay.frame
        if ctx.result is not None and frame is not None:
            pixel_kl = ctx.result.energy.kl_map(1, frame.kl_map.sigma_window).values
            if frame.z_map is not None:
                z = frame.z_map.to_pixels().astype(np.float64)
        stats = roi_stats(mask, image, None if mm_per_unit is None else mm_per_unit * native[1] / image.shape[1],
                          pixel_kl, z)
        m.text = f"{m.kind}: empty" if stats is None else stats.text(m.kind)

    def refresh(self) -> None:
        """Show the shapes of the shown slice only, measured again (the overlay or the base image changed)."""
        ctx = self.viewer.context
        here = (ctx.series.uid, ctx.index) if ctx else None
        for m, roi, label in self.drawn:
            visible = (m.series_uid, m.slice_index) == here
            roi.setVisible(visible)
            label.setVisible(visible)
            if visible:
                self.measure(m)
                label.setText(m.text)

    def clear_slice(self) -> None:
        """Remove the shown slice's shapes."""
        ctx = self.viewer.context
        if ctx is None:
            return
        keep = []
        for m, roi, label in self.drawn:
            if (m.series_uid, m.slice_index) == (ctx.series.uid, ctx.index):
                self.viewer.view.removeItem(roi)
                self.viewer.view.removeItem(label)
                self.w.model.measurements.remove(m)
            else:
                keep.append((m, roi, label))
        self.drawn = keep
