"""Measurement shapes on the slice viewer: a distance line, ellipse and rectangle ROIs, each with its readout.

A shape is placed in the middle of the view and then moved or resized with its handles; its
readout (length, or HU mean ± SD, area, KL and KL z-score inside) follows. Shapes belong to one
slice of one series and show only there. What they measure is computed in
`klviewer.app.measurements`; the records live in the session model, so the session file and the
PDF report have them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import pyqtgraph as pg

from klviewer.app.display import source_shape
from klviewer.app.measurements import Measurement, distance_text, inside_roi, roi_mask, roi_stats

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
        """Compute `m.text` from the slice as shown: the base image (on the source grid), and the KL energy and
        z-scores (on the prior's grid) at the sliders' settings."""
        ctx = self.viewer.context
        image = self.viewer.base.image
        if ctx is None or image is None or (ctx.series.uid, ctx.index) != (m.series_uid, m.slice_index):
            return
        spacing = ctx.series.pixel_spacing_mm
        mm_per_px = spacing[1] if spacing else None
        if m.kind == "distance":
            m.text = distance_text(m.geometry, mm_per_px)
            return
        mask = roi_mask(m.kind, m.geometry, image.shape, image.shape)
        pixel_kl = z = on_prior = None
        frame = self.viewer.overlay.frame
        if ctx.result is not None and frame is not None:
            pixel_kl = ctx.result.energy.kl_map(1, frame.kl_map.sigma_window).values
            on_prior = self._prior_grid_mask(m, ctx, pixel_kl.shape)
            if frame.z_map is not None:
                z = frame.z_map.to_pixels().astype(np.float64)
        stats = roi_stats(mask, image, mm_per_px)
        if stats is None:
            m.text = f"{m.kind}: empty"
            return
        inside = roi_stats(on_prior, np.zeros(on_prior.shape), None, pixel_kl, z) if on_prior is not None else None
        if inside is not None:
            stats = replace(stats, kl_nats=inside.kl_nats, z_max=inside.z_max)
        m.text = stats.text(m.kind)

    @staticmethod
    def _prior_grid_mask(m: Measurement, ctx, shape: tuple[int, int]) -> np.ndarray:
        """The prior-grid pixels whose centres fall inside the shape: the KL energy inside is summed there,
        where each pixel holds its own energy once."""
        grid = ctx.result.grid_for(source_shape(ctx.series, ctx.index))
        rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        src_r, src_c = grid.to_source(rows, cols)
        return inside_roi(m.kind, m.geometry, src_c + 0.5, src_r + 0.5)  # pixel centres sit at +0.5 in the view

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
