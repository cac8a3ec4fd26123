"""The comparison window: before | after | after − before, linked, with both KL overlays and the numbers.

The three panes share zoom and pan (linked ViewBoxes), the case on show ("slice": wheel,
Up/Down, or a row of the numbers table) and window/level (left-drag on either
reconstruction; on the difference pane it widens or narrows the symmetric difference
window). Each reconstruction carries its own KL overlay, both on one colour scale.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QBrush, QCloseEvent, QColor, QKeyEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSlider,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from klviewer.app.comparison import (
    COMPARED_IMAGES,
    METRICS,
    SIDES,
    ComparisonModel,
    difference_window,
    format_pair,
    format_value,
    improved,
    metric_value,
    summary_text,
)
from klviewer.app.display import PRESETS, MapSettings, WindowLevel
from klviewer.inference.verdict_text import format_nats
from klviewer.app.messages import Notifier
from klviewer.app.overlay import COLORBAR_WIDTH, OverlayLayer
from klviewer.app.viewer import GREY_LUT, PRESET_KEYS, SLICE_KEYS, preset_combo, spread_window
from klviewer.errors import KlviewerError

PANES = ("before", "after", "difference")
KL_BAR_COL, DIFF_COL, DIFF_BAR_COL = 2, 3, 4
DIFF_COLORMAP = "CET-D1"
"""Blue (after darker) through white (no change) to red (after brighter)."""
BETTER, WORSE = QColor("#7ddc7d"), QColor("#ff8a70")
TABLE_FIXED_COLUMNS = ("Case", "Slice")
TITLE_HEIGHT = 26
CURVE_PENS = {"before": pg.mkPen("#6aa8ff", width=2), "after": pg.mkPen("#ffb347", width=2)}


class _Title(pg.LabelItem):
    """A pane title that never widens its column, so the three panes stay the same size."""

    def updateMin(self) -> None:  # noqa: N802 (pyqtgraph API)
        super().updateMin()
        height = min(self.itemRect().height(), TITLE_HEIGHT)
        self.setMinimumWidth(0)
        self.setMaximumHeight(TITLE_HEIGHT)
        for hint in (Qt.SizeHint.MinimumSize, Qt.SizeHint.PreferredSize):
            self._sizeHint[hint] = (0, height)
        self.updateGeometry()


class _PaneViewBox(pg.ViewBox):
    """Left-drag = window/level of this pane, wheel = next/previous case, as in the main viewer."""

    def __init__(self, view: ComparisonView, pane: str) -> None:
        super().__init__(lockAspect=True, invertY=True, enableMenu=False)
        self._view = view
        self.pane = pane

    def mouseDragEvent(self, ev, axis=None) -> None:  # noqa: N802 (pyqtgraph API)
        if ev.button() == Qt.MouseButton.LeftButton:
            ev.accept()
            delta = ev.screenPos() - ev.lastScreenPos()
            self._view.drag_window(self.pane, delta.x(), delta.y())
            return
        super().mouseDragEvent(ev, axis)

    def wheelEvent(self, ev, axis=None) -> None:  # noqa: N802
        if ev.modifiers() & Qt.KeyboardModifier.ControlModifier:
            super().wheelEvent(ev, axis)
            return
        ev.accept()
        if ev.delta() != 0:
            self._view.step_case(-1 if ev.delta() > 0 else 1)


class ComparisonView(QWidget):
    """A top-level window over one `Comparison`."""

    closed = Signal()

    def __init__(self, comparison: Any, notifier: Notifier, map_settings: Callable[[], MapSettings],
                 parent: QWidget | None = None) -> None:
        super().__init__(parent, Qt.WindowType.Window)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.model = ComparisonModel(comparison)
        self.notifier = notifier
        self._map_settings = map_settings
        self.base_window = PRESETS[0].window
        self.diff_window = WindowLevel(2 * 100.0, 0.0)
        self.inverted = False
        self._extent = QRectF()
        self.setWindowTitle(f"Compare priors — {comparison.before_prior} vs {comparison.after_prior}")

        self._build_graphics()
        self._build_toolbar()
        self._build_table()
        self._build_curves()
        self.summary = QLabel(summary_text(comparison))
        self.summary.setWordWrap(True)
        self.probe = QLabel(" ")
        self.probe.setStyleSheet("color: #c8c8c8;")

        lower = QSplitter(Qt.Orientation.Horizontal)
        lower.addWidget(self.table)
        if self.curves is not None:
            lower.addWidget(self.curves)
            lower.setSizes([700, 400])
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.graphics)
        splitter.addWidget(lower)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([620, 220])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(self.toolbar)
        layout.addWidget(self.summary)
        layout.addWidget(splitter, 1)
        layout.addWidget(self.probe)
        self.resize(1500, 900)
        self.show_case(0, reset=True)

    # ----- construction -------------------------------------------------------------------

    def _build_graphics(self) -> None:
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground("k")
        self.graphics.setFocusPolicy(Qt.FocusPolicy.NoFocus)  # keys go to this window
        layout = self.graphics.ci
        self.views: dict[str, _PaneViewBox] = {}
        self.images: dict[str, pg.ImageItem] = {}
        self.titles: dict[str, pg.LabelItem] = {}
        for col, pane in zip((0, 1, DIFF_COL), PANES):
            self.titles[pane] = _Title(justify="left", color="#e8e8e8")
            layout.addItem(self.titles[pane], row=0, col=col)
            view = _PaneViewBox(self, pane)
            layout.addItem(view, row=1, col=col)
            image = pg.ImageItem(axisOrder="row-major")
            view.addItem(image)
            self.views[pane], self.images[pane] = view, image
        for pane in ("after", "difference"):
            self.views[pane].setXLink(self.views["before"])
            self.views[pane].setYLink(self.views["before"])
        # Both overlays share one colour scale, so the after side's colour bar serves both; the
        # before side's goes into a layout that is never shown.
        bar_cell = layout.addLayout(row=0, col=KL_BAR_COL, rowspan=2)
        bar_cell.setFixedWidth(COLORBAR_WIDTH)
        self._unshown = pg.GraphicsLayout()
        self.overlays = {"before": OverlayLayer(self.views["before"], self._unshown, col=0),
                         "after": OverlayLayer(self.views["after"], bar_cell, col=0)}
        self.images["difference"].setColorMap(pg.colormap.get(DIFF_COLORMAP))
        self.diff_bar = pg.ColorBarItem(values=self.diff_window.levels, colorMap=pg.colormap.get(DIFF_COLORMAP),
                                        interactive=False, width=14, colorMapMenu=False)
        self.diff_bar.axis.setLabel("after − before (HU)")
        self.diff_bar.setImageItem(self.images["difference"])
        self.diff_bar.setFixedWidth(COLORBAR_WIDTH)
        layout.addItem(self.diff_bar, row=0, col=DIFF_BAR_COL, rowspan=2)
        layout.layout.setRowStretchFactor(1, 1)
        for col in (0, 1, DIFF_COL):  # equal panes, so linked views show the same region at the same scale
            layout.layout.setColumnStretchFactor(col, 1)
        self.graphics.scene().sigMouseMoved.connect(self._probe)

    def _build_toolbar(self) -> None:
        self.toolbar = QWidget()
        row = QHBoxLayout(self.toolbar)
        row.setContentsMargins(0, 0, 0, 0)
        self.prev_button = QToolButton(text="◀")
        self.prev_button.setToolTip("Previous case (Up / PgUp / wheel)")
        self.prev_button.clicked.connect(lambda: self.step_case(-1))
        self.next_button = QToolButton(text="▶")
        self.next_button.setToolTip("Next case (Down / PgDn / wheel)")
        self.next_button.clicked.connect(lambda: self.step_case(1))
        self.case_label = QLabel()
        self.kind_combo = QComboBox()
        for key, label in COMPARED_IMAGES.items():
            self.kind_combo.addItem(label, key)
        self.kind_combo.currentIndexChanged.connect(lambda row: self.set_kind(self.kind_combo.itemData(row)))
        self.preset_combo = preset_combo(self._preset_picked)
        self.overlay_check = QCheckBox("KL overlays (o)")
        self.overlay_check.setChecked(True)
        self.overlay_check.toggled.connect(self.set_overlays_visible)
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(int(round(self._map_settings().opacity * 100)))
        self.opacity.setFixedWidth(120)
        self.opacity.setToolTip("Overlay opacity")
        self.opacity.valueChanged.connect(self._opacity_changed)
        reset = QToolButton(text="Reset view (r)")
        reset.clicked.connect(self.reset_view)
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Write comparison.json / .csv and both sides' results to a folder")
        self.save_button.clicked.connect(self._save_dialog)
        for widget in (self.prev_button, self.next_button, self.case_label, QLabel("  Image:"), self.kind_combo,
                       self.preset_combo, self.overlay_check, QLabel("Opacity"), self.opacity):
            row.addWidget(widget)
        row.addStretch(1)
        row.addWidget(reset)
        row.addWidget(self.save_button)
        self._opacity_changed(self.opacity.value())

    def _build_table(self) -> None:
        headers = list(TABLE_FIXED_COLUMNS) + [f"{m.label}{f' ({m.unit})' if m.unit else ''}" for m in METRICS]
        self.table = QTableWidget(len(self.model), len(headers))
        self.table.setHorizontalHeaderLabels(headers)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        for row, case in enumerate(self.model.comparison.cases):
            self.table.setItem(row, 0, QTableWidgetItem(str(case.case)))
            self.table.setItem(row, 1, QTableWidgetItem(str(case.index)))
            for col, metric in enumerate(METRICS, start=len(TABLE_FIXED_COLUMNS)):
                before, after = (metric_value(case, side, metric.key) for side in SIDES)
                item = QTableWidgetItem(format_pair(metric, before, after))
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                better = improved(metric, before, after)
                if better is not None:
                    item.setForeground(QBrush(BETTER if better else WORSE))
                    change = "better" if better else "worse"
                    item.setToolTip(f"before {format_value(metric, before)}, after {format_value(metric, after)}: "
                                    f"{change} ({'higher' if metric.higher_is_better else 'lower'} is better)")
                self.table.setItem(row, col, item)
        self.table.itemSelectionChanged.connect(self._row_picked)

    def _build_curves(self) -> None:
        comparison = self.model.comparison
        curves = {side: getattr(comparison, f"shift_{side}") for side in SIDES}
        if all(curve is None for curve in curves.values()):
            self.curves = None
            return
        self.curves = pg.PlotWidget()
        self.curves.setLogMode(x=True, y=False)
        self.curves.setLabel("bottom", "σ (prior units)")
        self.curves.setLabel("left", "cumulative KL (nats)")
        self.curves.setTitle("Measurement-domain KL to the reference prior")
        self.curves.addLegend(offset=(10, 10))
        for side, curve in curves.items():
            if curve is not None:
                self.curves.plot(np.asarray(curve.sigmas), np.asarray(curve.cumulative), pen=CURVE_PENS[side],
                                 name=f"{side}: {format_nats(curve.total)} nats")

    # ----- what is shown ------------------------------------------------------------------

    def show_case(self, index: int, reset: bool = False) -> None:
        changed = self.model.set_index(index)
        if changed or reset or self.images["before"].image is None:
            self._draw(reset)
        self.table.blockSignals(True)
        self.table.selectRow(self.model.index)
        self.table.blockSignals(False)

    def step_case(self, step: int) -> None:
        self.show_case(self.model.index + step)

    def set_kind(self, kind: str) -> None:
        self.model.kind = kind
        self.kind_combo.blockSignals(True)
        self.kind_combo.setCurrentIndex(self.kind_combo.findData(kind))
        self.kind_combo.blockSignals(False)
        self._draw(reset=False)

    def _draw(self, reset: bool) -> None:
        model = self.model
        h, w = model.image("before").shape
        extent = QRectF(0, 0, w, h)
        reset = reset or extent != self._extent
        self._extent = extent
        base_window = self.active_window
        for side in SIDES:
            self.images[side].setImage(model.image(side), autoLevels=False, levels=base_window.levels)
            self.images[side].setRect(extent)
        diff = model.difference()
        self.diff_window = difference_window(diff)
        self.images["difference"].setImage(diff, autoLevels=False, levels=self.diff_window.levels)
        self.images["difference"].setRect(extent)
        self.diff_bar.setLevels(self.diff_window.levels)
        self._apply_lut()
        self.refresh_overlays()
        self.case_label.setText(f"<b>{model.title()}</b>")
        self.prev_button.setEnabled(model.index > 0)
        self.next_button.setEnabled(model.index < len(model) - 1)
        if reset:
            self.reset_view()

    @property
    def active_window(self) -> WindowLevel:
        """Posterior std (a spread in HU) gets a window of its own, from both sides at once."""
        if self.model.kind == "std":
            return spread_window(np.concatenate([self.model.image(s).ravel() for s in SIDES]))
        return self.base_window

    def refresh_overlays(self) -> None:
        """Re-cut both KL maps with the main window's map settings (no sampling)."""
        settings = self._map_settings()
        frames = self.model.overlays(settings)
        for side, frame in zip(SIDES, frames):
            self.overlays[side].set_frame(frame, self._extent)
        self._annotate(frames)

    def _annotate(self, frames) -> None:
        comparison = self.model.comparison
        names = {"before": comparison.before_prior, "after": comparison.after_prior}
        for side, frame in zip(SIDES, frames):
            verdict = frame.verdict_text
            status = "<span style='color:#ff6a4d'>FLAGGED</span>" if verdict.flagged else verdict.status
            self.titles[side].setText(
                f"<b>{side.capitalize()}</b>: {_esc(names[side])} · score {format_nats(frame.score)} nats · {status}")
            self.titles[side].setToolTip(f"{verdict.value} · {verdict.rule_text}")
        self._title_difference()

    def _title_difference(self) -> None:
        diff = self.images["difference"].image
        rms = float(np.sqrt(np.mean(diff ** 2))) if diff is not None else 0.0
        self.titles["difference"].setText(f"<b>After − before</b> · RMS {rms:.1f} HU · "
                                          f"window ±{self.diff_window.width / 2:.0f} HU")

    def _apply_lut(self) -> None:
        lut = GREY_LUT[::-1] if self.inverted else GREY_LUT
        for side in SIDES:
            self.images[side].setLookupTable(lut)

    # ----- interaction --------------------------------------------------------------------

    def set_window(self, window: WindowLevel) -> None:
        """One window/level for both reconstructions."""
        self.base_window = window
        for side in SIDES:
            self.images[side].setLevels(window.levels)

    def set_diff_window(self, window: WindowLevel) -> None:
        half = max(window.width / 2, 1e-3)
        self.diff_window = WindowLevel(2 * half, 0.0)  # the difference window stays centred on 0 HU
        self.images["difference"].setLevels(self.diff_window.levels)
        self.diff_bar.setLevels(self.diff_window.levels)
        self._title_difference()

    def drag_window(self, pane: str, dx: float, dy: float) -> None:
        if pane == "difference":
            self.set_diff_window(self.diff_window.dragged(dx, 0.0))
        elif self.model.kind == "mean":
            self.set_window(self.base_window.dragged(dx, dy))

    def apply_preset(self, number: int) -> None:
        if self.model.kind != "mean":
            self.set_kind("mean")
        self.set_window(PRESETS[number].window)

    def _preset_picked(self, row: int) -> None:
        if row > 0:
            self.apply_preset(row - 1)
        self.preset_combo.setCurrentIndex(0)

    def toggle_invert(self) -> None:
        self.inverted = not self.inverted
        self._apply_lut()

    def set_overlays_visible(self, visible: bool) -> None:
        for overlay in self.overlays.values():
            overlay.set_visible(visible)
        self.overlay_check.blockSignals(True)
        self.overlay_check.setChecked(visible)
        self.overlay_check.blockSignals(False)

    def _opacity_changed(self, value: int) -> None:
        for overlay in self.overlays.values():
            overlay.set_opacity(value / 100)

    def reset_view(self) -> None:
        if not self._extent.isEmpty():
            self.views["before"].setRange(self._extent, padding=0.02)

    def _row_picked(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self.show_case(rows[0].row())

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802
        key = event.key()
        if event.modifiers() & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.AltModifier):
            super().keyPressEvent(event)
        elif key in SLICE_KEYS:
            self.step_case(SLICE_KEYS[key])
        elif key in PRESET_KEYS:
            self.apply_preset(PRESET_KEYS[key])
        elif key == Qt.Key.Key_R:
            self.reset_view()
        elif key == Qt.Key.Key_I:
            self.toggle_invert()
        elif key == Qt.Key.Key_O:
            self.set_overlays_visible(not self.overlays["after"].visible)
        else:
            super().keyPressEvent(event)

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        self.closed.emit()
        super().closeEvent(event)

    def _probe(self, scene_pos: QPointF) -> None:
        self.probe.setText(self.probe_at(scene_pos) or " ")

    def probe_at(self, scene_pos: QPointF) -> str:
        """Both reconstructions, their difference and both KL values at the pixel under the cursor."""
        for view in self.views.values():
            if view.sceneBoundingRect().contains(scene_pos):
                point = view.mapSceneToView(scene_pos)
                break
        else:
            return ""
        image = self.images["before"].image
        if image is None or self._extent.isEmpty():
            return ""
        h, w = image.shape
        col = int(np.floor((point.x() - self._extent.x()) * w / self._extent.width()))
        row = int(np.floor((point.y() - self._extent.y()) * h / self._extent.height()))
        if not (0 <= row < h and 0 <= col < w):
            return ""
        values = {pane: float(self.images[pane].image[row, col]) for pane in PANES}
        text = (f"({col}, {row})  before {values['before']:.0f} HU · after {values['after']:.0f} HU · "
                f"Δ {values['difference']:+.1f} HU")
        kl = [self.overlays[side].value_at(row, col) for side in SIDES]
        if all(v is not None for v in kl):
            text += f" · KL {format_nats(kl[0])} → {format_nats(kl[1])} nats"
        return text

    def _save_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the comparison into a new folder")
        if folder:
            self.save(Path(folder) / "comparison")

    def save(self, out: Path, overwrite: bool = False) -> Path | None:
        """Write the comparison with the core writer; problems become messages."""
        from klviewer.evaluation.compare import write_comparison

        try:
            written = write_comparison(self.model.comparison, out, overwrite=overwrite)
        except (KlviewerError, OSError) as exc:
            self.notifier.error("Cannot save the comparison", str(exc))
            return None
        self.notifier.status("Comparison saved", str(written))
        return written


def _esc(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
