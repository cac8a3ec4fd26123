"""The slice viewer: HU base image with window/level, the KL overlay, probe and corner annotations.

Mouse and keys follow clinical viewers (OHIF, Slicer): left-drag window/level, wheel and
Up/Down/PgUp/PgDn change slice, right-drag zoom, middle-drag pan, 1-5 presets, r reset,
i invert, o overlay. Ctrl+wheel zooms, as in Slicer. A second pane shows another layer of
the same slice side by side (e.g. original | posterior mean), with zoom, pan, slice and
window/level linked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import QCheckBox, QComboBox, QLabel, QToolBar, QVBoxLayout, QWidget

from klviewer.app.display import (
    BASE_IMAGES,
    PRESETS,
    OverlayFrame,
    WindowLevel,
    available_bases,
    base_image,
    matching_preset,
    unavailable_reason,
    initial_window,
)
from klviewer.inference.verdict_text import format_nats, slice_label
from klviewer.app.overlay import OverlayLayer
from klviewer.inference.result import SliceResult
from klviewer.io.study import Series

ANNOTATION_STYLE = "color: #e8e8e8; background: transparent; font-size: 12px;"
GREY_LUT = np.linspace(0, 255, 256).astype(np.uint8)
EMPTY_TEXT = "No study open\n\nFile → Open folder…, drop files here, or File → Open demo study"
NOT_RECONSTRUCTED_TEXT = "Sinogram input: nothing to show until it is reconstructed.\n\nRun the analysis (Ctrl+R)."
SLICE_KEYS = {Qt.Key.Key_Up: -1, Qt.Key.Key_PageUp: -1, Qt.Key.Key_Down: 1, Qt.Key.Key_PageDown: 1}
PRESET_KEYS = {Qt.Key.Key_1: 0, Qt.Key.Key_2: 1, Qt.Key.Key_3: 2, Qt.Key.Key_4: 3, Qt.Key.Key_5: 4}
COMPARE_COL, COLORBAR_COL = 1, 2


@dataclass
class SliceContext:
    """What the viewer needs to draw one slice and its annotations."""

    series: Series
    index: int
    patient: str
    study: str
    result: SliceResult | None = None
    prior_name: str = ""


class _SliceViewBox(pg.ViewBox):
    """A ViewBox whose left drag sets window/level and whose wheel changes slice."""

    def __init__(self, viewer: SliceViewer) -> None:
        super().__init__(lockAspect=True, invertY=True, enableMenu=False)
        self._viewer = viewer

    def mouseDragEvent(self, ev, axis=None) -> None:  # noqa: N802 (pyqtgraph API)
        if ev.button() == Qt.MouseButton.LeftButton:
            ev.accept()
            delta = ev.screenPos() - ev.lastScreenPos()
            self._viewer.drag_window(delta.x(), delta.y())
            return
        super().mouseDragEvent(ev, axis)  # middle = pan, right = zoom

    def wheelEvent(self, ev, axis=None) -> None:  # noqa: N802
        if ev.modifiers() & Qt.KeyboardModifier.ControlModifier:
            super().wheelEvent(ev, axis)
            return
        ev.accept()
        if ev.delta() != 0:
            self._viewer.slice_step.emit(-1 if ev.delta() > 0 else 1)


class SliceViewer(QWidget):
    slice_step = Signal(int)
    """The user asked for the previous (-1) or next (+1) slice."""
    overlay_toggled = Signal(bool)
    overlay_set = Signal()
    """A slice and its overlay (or none) were drawn: tools that read them may update."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.context: SliceContext | None = None
        self.window = initial_window(None)
        self._std_window: WindowLevel | None = None
        self.inverted = False
        self.base_kind = "original"
        self._extent = QRectF()

        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground("k")
        self.graphics.setFocusPolicy(Qt.FocusPolicy.NoFocus)  # clicks give focus to this widget, which owns the keys
        self.view = _SliceViewBox(self)
        self.graphics.ci.addItem(self.view, row=0, col=0)
        self.graphics.ci.setContentsMargins(0, 0, 4, 0)
        self.base = pg.ImageItem(axisOrder="row-major")
        self.view.addItem(self.base)
        self.overlay = OverlayLayer(self.view, self.graphics.ci, col=COLORBAR_COL)
        self.compare_view = _SliceViewBox(self)
        self.compare_view.setXLink(self.view)
        self.compare_view.setYLink(self.view)
        self.compare_image = pg.ImageItem(axisOrder="row-major")
        self.compare_view.addItem(self.compare_image)
        self.compare_kind = "mean"
        self.comparing = False
        self.graphics.scene().sigMouseMoved.connect(self._probe)

        self._build_toolbar()
        self._build_annotations()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.toolbar)
        layout.addWidget(self.graphics, 1)
        self._show_empty()

    # ----- construction -------------------------------------------------------------------

    def _build_toolbar(self) -> None:
        # A QToolBar: on a narrow screen what does not fit goes behind its » button instead of
        # widening the window past the screen.
        self.toolbar = QToolBar()
        self.toolbar.setObjectName("viewerToolbar")
        self.toolbar.setMovable(False)
        self.base_combo = QComboBox()
        for key, label in BASE_IMAGES.items():
            self.base_combo.addItem(label, key)
        self.base_combo.setToolTip("The image shown under the overlay")
        self.base_combo.currentIndexChanged.connect(self._base_picked)
        self.preset_combo = preset_combo(self._preset_picked)
        self.overlay_check = QCheckBox("KL overlay (o)")
        self.overlay_check.setChecked(True)
        self.overlay_check.toggled.connect(self.set_overlay_visible)
        self.compare_check = QCheckBox("Side by side:")
        self.compare_check.setToolTip("Show a second layer of the same slice beside this one, linked")
        self.compare_check.toggled.connect(self.set_comparing)
        self.compare_combo = QComboBox()
        for key, label in BASE_IMAGES.items():
            self.compare_combo.addItem(label, key)
        self.compare_combo.setCurrentIndex(self.compare_combo.findData(self.compare_kind))
        self.compare_combo.currentIndexChanged.connect(
            lambda row: self.set_compare_kind(self.compare_combo.itemData(row)))
        for widget in (self.base_combo, self.preset_combo, self.overlay_check, self.compare_check, self.compare_combo):
            self.toolbar.addWidget(widget)
        self.toolbar.addSeparator()
        self.toolbar.addAction("Invert (i)", self.toggle_invert)
        self.toolbar.addAction("Reset view (r)", self.reset_view)

    def _build_annotations(self) -> None:
        self.corners: dict[str, QLabel] = {}
        for name, align in (("tl", Qt.AlignmentFlag.AlignLeft), ("tr", Qt.AlignmentFlag.AlignRight),
                            ("bl", Qt.AlignmentFlag.AlignLeft), ("br", Qt.AlignmentFlag.AlignRight)):
            label = QLabel(self.graphics)
            label.setStyleSheet(ANNOTATION_STYLE)
            label.setAlignment(align | (Qt.AlignmentFlag.AlignTop if name[0] == "t" else Qt.AlignmentFlag.AlignBottom))
            label.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)
            label.setTextFormat(Qt.TextFormat.RichText)
            self.corners[name] = label
        self.compare_label = QLabel(self.graphics)
        self.compare_label.setStyleSheet(ANNOTATION_STYLE)
        self.compare_label.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)
        self.compare_label.hide()
        self.empty_label = QLabel(EMPTY_TEXT, self.graphics)
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_label.setStyleSheet("color: #9a9a9a; font-size: 14px; background: transparent;")
        self.empty_label.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)
        self.view.sigResized.connect(self._place_annotations)  # after layout, so the view's rect is current
        self.probe_text = ""

    def _place_annotations(self) -> None:
        w, h = self.graphics.width(), self.graphics.height()
        main = self.view.sceneBoundingRect()
        right = int(main.right()) if (self.comparing or self.overlay.colorbar.isVisible()) else w
        margin = 8
        for label in self.corners.values():
            label.adjustSize()
        c = self.corners
        for top in (True, False):
            left, other = (c["tl"], c["tr"]) if top else (c["bl"], c["br"])
            # In a narrow pane the right-hand block goes under (or above) the left-hand one.
            stacked = left.width() + other.width() + 3 * margin > right
            ly = margin if top else h - margin - left.height()
            shift = left.height() + 2 if stacked else 0
            oy = (ly + shift) if top else (h - margin - other.height() - shift)
            left.move(margin, max(0, ly))
            other.move(max(0, right - margin - other.width()), max(0, oy))
            left.raise_()
            other.raise_()
        self.empty_label.setGeometry(0, 0, right, h)
        if self.comparing:
            self.compare_label.adjustSize()
            self.compare_label.move(int(self.compare_view.sceneBoundingRect().left()) + margin, margin)
            self.compare_label.raise_()

    # ----- what is shown ------------------------------------------------------------------

    def _show_empty(self) -> None:
        self.context = None
        self.base.clear()
        self.overlay.set_frame(None, QRectF())
        self.empty_label.setText(EMPTY_TEXT)
        self.empty_label.show()
        self.compare_image.clear()
        for label in self.corners.values():
            label.setText("")
        self.base_combo.setEnabled(False)

    def clear(self) -> None:
        self._show_empty()

    def show_slice(self, context: SliceContext, reset: bool = False) -> None:
        """Draw a slice. The zoom and pan stay unless `reset` (a new series) or the image frame changed."""
        previous = self.context
        self.context = context
        self.empty_label.hide()
        if previous is None or previous.index != context.index or previous.series is not context.series:
            self._std_window = None
        if previous is None or previous.series is not context.series:
            self.window = initial_window(context.series)
            self._show_preset()
            self.probe_text = ""  # the cursor readout was about the other series' pixels
        h, w = context.series.image_shape
        extent = QRectF(0, 0, w, h)
        changed = extent != self._extent
        self._extent = extent
        self._sync_base_combo()
        self._draw_base()
        self._draw_compare()
        if reset or changed:
            self.reset_view()
        self._annotate()

    def set_overlay(self, frame: OverlayFrame | None) -> None:
        self.overlay.set_frame(frame, self._extent)
        self._annotate()
        self._place_annotations()
        self.overlay_set.emit()

    def _sync_base_combo(self) -> None:
        ctx = self.context
        available = available_bases(ctx.series, ctx.index, ctx.result) if ctx else []
        if self.base_kind not in available and available:
            self.base_kind = available[0]
        model = self.base_combo.model()
        self.base_combo.blockSignals(True)
        for row in range(self.base_combo.count()):
            kind = self.base_combo.itemData(row)
            model.item(row).setEnabled(kind in available)
            model.item(row).setToolTip("" if kind in available or ctx is None else unavailable_reason(kind, ctx.result))
        self.base_combo.setCurrentIndex(self.base_combo.findData(self.base_kind))
        self.base_combo.blockSignals(False)
        self.base_combo.setEnabled(bool(available))

    def _draw_base(self) -> None:
        ctx = self.context
        if ctx is None:
            return
        image = base_image(self.base_kind, ctx.series, ctx.index, ctx.result)
        self.empty_label.setText(NOT_RECONSTRUCTED_TEXT)
        self.empty_label.setVisible(image is None)
        if image is None:
            self.base.clear()
            return
        if self.base_kind == "std" and self._std_window is None:
            self._std_window = spread_window(image)
        self.base.setImage(image, autoLevels=False, levels=self.active_window.levels)
        self.base.setRect(self._extent)
        self._apply_lut()

    def _draw_compare(self) -> None:
        ctx = self.context
        image = base_image(self.compare_kind, ctx.series, ctx.index, ctx.result) if ctx and self.comparing else None
        label = BASE_IMAGES[self.compare_kind]
        if image is None:
            self.compare_image.clear()
            self.compare_label.setText(f"{label}: {unavailable_reason(self.compare_kind, ctx.result)}" if ctx else "")
        else:
            window = spread_window(image) if self.compare_kind == "std" else self.window
            self.compare_image.setImage(image, autoLevels=False, levels=window.levels)
            self.compare_image.setRect(self._extent)
            self.compare_label.setText(f"<b>{label}</b>")
        self._apply_lut()
        self._place_annotations()

    def _apply_lut(self) -> None:
        lut = GREY_LUT[::-1] if self.inverted else GREY_LUT
        self.base.setLookupTable(lut)
        self.compare_image.setLookupTable(lut)

    def set_comparing(self, on: bool) -> None:
        """Show or hide the second pane; it follows the first in zoom, pan, slice and window/level."""
        if on == self.comparing:
            return
        self.comparing = on
        if on:
            ctx = self.context
            others = [k for k in available_bases(ctx.series, ctx.index, ctx.result) if k != self.base_kind] if ctx else []
            if self.compare_kind == self.base_kind or (others and self.compare_kind not in others):
                self.set_compare_kind(others[0] if others else "mean")  # never the same image twice
            self.graphics.ci.addItem(self.compare_view, row=0, col=COMPARE_COL)
            for col in (0, COMPARE_COL):  # two equal panes, not one pane and a sliver
                self.graphics.ci.layout.setColumnStretchFactor(col, 1)
        else:
            self.graphics.ci.removeItem(self.compare_view)
            self.graphics.ci.layout.setColumnStretchFactor(COMPARE_COL, 0)  # no empty half where the pane was
        self.compare_label.setVisible(on)
        self.compare_check.blockSignals(True)
        self.compare_check.setChecked(on)
        self.compare_check.blockSignals(False)
        self._draw_compare()
        self.reset_view()

    def set_compare_kind(self, kind: str) -> None:
        self.compare_kind = kind
        self.compare_combo.blockSignals(True)
        self.compare_combo.setCurrentIndex(self.compare_combo.findData(kind))
        self.compare_combo.blockSignals(False)
        self._draw_compare()

    @property
    def active_window(self) -> WindowLevel:
        """Posterior std (HU of spread, not of tissue) has its own window."""
        if self.base_kind == "std" and self._std_window is not None:
            return self._std_window
        return self.window

    def _annotate(self) -> None:
        ctx = self.context
        if ctx is None:
            return
        series = ctx.series
        result = ctx.result
        frame = self.overlay.frame
        tl = [f"<b>{_esc(ctx.patient)}</b>", _esc(ctx.study),
              _esc(f"{series.description or series.uid} · {series.modality}")]
        h, w = series.image_shape
        spacing = series.pixel_spacing_mm
        size = f"{w}×{h}" + (f" · {spacing[1]:.2f} mm" if spacing else "")
        shown = BASE_IMAGES.get(self.base_kind, self.base_kind)
        if result is not None:
            ah, aw = result.recon_hu.shape
            shown += f" · analysis grid {aw}×{ah}"
        tr = [f"<b>{slice_label(ctx.index, series.n_slices).capitalize()}</b>", size, _esc(shown)]
        br = [f"Prior: {_esc(ctx.prior_name or '—')}"]
        if result is None:
            br.append("not analysed" if series.analysis_refusal() is None else _esc(f"not analysable: {series.modality}"))
        elif frame is not None:
            br += verdict_lines(frame)
        for name, lines in (("tl", tl), ("tr", tr), ("br", br)):
            self.corners[name].setText("<br>".join(lines))
        self._annotate_window_and_probe()

    def _annotate_window_and_probe(self) -> None:
        """The bottom-left corner alone: it changes with every mouse move."""
        wl = self.active_window.label() + ("  (inverted)" if self.inverted else "")
        self.corners["bl"].setText(f"{wl}<br>{_esc(self.probe_text) or '&nbsp;'}")
        self._place_annotations()

    # ----- interaction --------------------------------------------------------------------

    def set_window(self, window: WindowLevel) -> None:
        if self.base_kind == "std" and self._std_window is not None:
            self._std_window = window
        else:
            self.window = window
        self.base.setLevels(window.levels)
        if self.comparing and self.compare_kind != "std" and self.compare_image.image is not None:
            self.compare_image.setLevels(self.window.levels)
        self._show_preset()
        self._annotate()

    def _show_preset(self) -> None:
        """The preset box names the window in use, also one chosen with keys 1-5 or the series' own."""
        preset = matching_preset(self.window)
        self.preset_combo.setCurrentIndex(0 if preset is None else preset + 1)

    def apply_preset(self, number: int) -> None:
        """Preset `number` (0-based) of PRESETS; shown on the tissue image even from the std view."""
        if self.base_kind == "std":
            self.set_base("original")
        self.set_window(PRESETS[number].window)

    def drag_window(self, dx: float, dy: float) -> None:
        if self.context is not None:
            self.set_window(self.active_window.dragged(dx, dy))

    def toggle_invert(self) -> None:
        self.inverted = not self.inverted
        self._apply_lut()
        self._annotate()

    def reset_view(self) -> None:
        if not self._extent.isEmpty():
            self.view.setRange(self._extent, padding=0.02)

    def set_overlay_visible(self, visible: bool) -> None:
        if visible == self.overlay.visible:
            return
        self.overlay.set_visible(visible)
        self.overlay_check.blockSignals(True)
        self.overlay_check.setChecked(visible)
        self.overlay_check.blockSignals(False)
        self.overlay_toggled.emit(visible)

    def set_base(self, kind: str) -> None:
        ctx = self.context
        if ctx is None or kind not in available_bases(ctx.series, ctx.index, ctx.result):
            return
        self.base_kind = kind
        self._sync_base_combo()
        self._draw_base()
        self._annotate()

    def _base_picked(self, row: int) -> None:
        self.set_base(self.base_combo.itemData(row))

    def _preset_picked(self, row: int) -> None:
        if row > 0:
            self.apply_preset(row - 1)

    def handle_key(self, event: QKeyEvent) -> bool:
        """Viewer keys, wherever focus is (unless the focused widget used the key itself)."""
        key = event.key()
        if event.modifiers() & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.AltModifier):
            return False
        if key in SLICE_KEYS:
            self.slice_step.emit(SLICE_KEYS[key])
        elif key in PRESET_KEYS:
            self.apply_preset(PRESET_KEYS[key])
        elif key == Qt.Key.Key_R:
            self.reset_view()
        elif key == Qt.Key.Key_I:
            self.toggle_invert()
        elif key == Qt.Key.Key_O:
            self.set_overlay_visible(not self.overlay.visible)
        else:
            return False
        return True

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802
        if not self.handle_key(event):
            super().keyPressEvent(event)

    def _probe(self, scene_pos: QPointF) -> None:
        self.probe_text = self.probe_at(scene_pos)
        if self.context is not None:
            self._annotate_window_and_probe()

    def probe_at(self, scene_pos: QPointF) -> str:
        """'(x, y)  HU …  KL …' for the pixel under a scene position, over either pane ('' elsewhere).

        Both panes show the same pixel grid once a slice is analysed, so one position reads both.
        """
        ctx = self.context
        image = self.base.image
        if ctx is None or image is None:
            return ""
        if self.view.sceneBoundingRect().contains(scene_pos):
            point = self.view.mapSceneToView(scene_pos)
        elif self.comparing and self.compare_view.sceneBoundingRect().contains(scene_pos):
            point = self.compare_view.mapSceneToView(scene_pos)
        else:
            return ""
        col, row = _pixel(self._extent, image.shape, point)
        if not (0 <= row < image.shape[0] and 0 <= col < image.shape[1]):
            return ""
        unit = "σ HU" if self.base_kind == "std" else "HU"
        text = f"({col}, {row})  {unit} {float(image[row, col]):.0f}"
        other = self.compare_image.image if self.comparing else None
        if other is not None and other.shape == image.shape:
            text += f"  {BASE_IMAGES[self.compare_kind].lower()} {float(other[row, col]):.0f}"
        if self.overlay.frame is not None:
            kl_col, kl_row = _pixel(self._extent, self.overlay.frame.raw_pixels.shape, point)
            kl = self.overlay.value_at(kl_row, kl_col)
            if kl is not None and self.overlay.frame.shows_z:
                text += f"  KL z {kl:.3g}" if np.isfinite(kl) else "  KL z —"
            elif kl is not None:
                text += f"  KL {format_nats(kl)} nats"
        return text


STATUS_COLORS = {"flagged": "#ff6a4d", "prior mismatch": "#ff6a4d", "cannot flag": "#e0b050"}


def verdict_lines(frame: OverlayFrame) -> list[str]:
    """The caption's verdict: status and number, the rule that decided, and the map settings."""
    verdict = frame.verdict_text
    color = STATUS_COLORS.get(verdict.status)
    status = f"<span style='color:{color}'><b>{verdict.status.upper()}</b></span>" if color else verdict.status
    lo, hi = frame.kl_map.sigma_window
    return [f"{_esc(verdict.value)} · {status}", _esc(verdict.rule_text),
            f"score {format_nats(frame.score)} nats · patch {frame.kl_map.patch} px · σ {lo:.3g}–{hi:.3g}"]


def preset_combo(picked: Callable[[int], None]) -> QComboBox:
    """The W/L preset picker: a title row, then the presets numbered as their keys 1-5."""
    combo = QComboBox()
    combo.addItem("Custom W/L")
    for n, preset in enumerate(PRESETS, start=1):
        combo.addItem(f"{n}  {preset.name} ({preset.window.width:.0f}/{preset.window.level:.0f})")
    combo.activated.connect(picked)
    return combo


def spread_window(image: np.ndarray) -> WindowLevel:
    """A window for posterior std (a spread in HU, not tissue): 0 to its 99.5th percentile."""
    top = float(np.percentile(image, 99.5)) or 1.0
    return WindowLevel(top, top / 2)


def _pixel(extent: QRectF, shape: tuple[int, ...], point: QPointF) -> tuple[int, int]:
    """(col, row) of an image of `shape` stretched over `extent`, at view coordinates `point`."""
    col = int(np.floor((point.x() - extent.x()) * shape[1] / extent.width()))
    row = int(np.floor((point.y() - extent.y()) * shape[0] / extent.height()))
    return col, row


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
