"""The KL map sliders: noise-level (sigma) window, patch size, display threshold, opacity, and
whether to colour KL or its z-score against the prior's healthy reference.

None of them starts a sampling run: the map is re-cut from the cached EnergyField.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QCheckBox, QFormLayout, QHBoxLayout, QLabel, QPushButton, QSlider, QVBoxLayout, QWidget

from klviewer.app.display import LogScale, MapSettings, round_sig

DEFAULT_SIGMA_RANGE = (0.002, 10.0)
"""The sampler's default noise-level range, used until a result says otherwise."""
MAX_PATCH = 64
SNAP = 0.06
"""A dragged sigma within 6 % of a calibrated window end takes that end exactly (about 7 slider steps)."""
UNCALIBRATED_STYLE = "color: #e0b050;"


class LogSlider(QSlider):
    """A horizontal slider over a log-scaled value.

    A value set in code is kept exactly until the user moves the slider; a moved slider
    snaps to an anchor (a calibrated window end) within SNAP of it, so a drag that lands on
    0.491 gives the calibrated 0.5 and its thresholds.
    """

    def __init__(self, scale: LogScale) -> None:
        super().__init__(Qt.Orientation.Horizontal)
        self.scale = scale
        self.anchors: list[float] = []
        self._exact: float | None = None
        self.setRange(0, scale.steps)
        self.valueChanged.connect(self._moved)

    def _moved(self, _position: int) -> None:
        self._exact = None  # set_value blocks signals, so only a user move (or a push) gets here

    def set_scale(self, scale: LogScale) -> None:
        value = self.value_()
        self.scale = scale
        self.set_value(value)

    def value_(self) -> float:
        if self._exact is not None:
            return self._exact
        value = self.scale.value(self.value())
        for anchor in self.anchors:
            if anchor / (1 + SNAP) <= value <= anchor * (1 + SNAP):
                return anchor
        return round_sig(value)

    def set_value(self, value: float) -> None:
        self.blockSignals(True)
        self.setValue(self.scale.position(value))
        self.blockSignals(False)
        self._exact = min(max(value, self.scale.low), self.scale.high)


class MapControls(QWidget):
    changed = Signal()
    """Patch, sigma window or threshold moved: the overlay must be re-cut."""
    opacity_changed = Signal(float)
    reset_requested = Signal()
    """The user asked for the calibrated patch and sigma window back."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        scale = LogScale(*DEFAULT_SIGMA_RANGE)
        self.sigma_low = LogSlider(scale)
        self.sigma_high = LogSlider(scale)
        self.patch = QSlider(Qt.Orientation.Horizontal)
        self.patch.setRange(1, MAX_PATCH)
        self.threshold = QSlider(Qt.Orientation.Horizontal)
        self.threshold.setRange(0, 100)
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.sigma_low_label, self.sigma_high_label = QLabel(), QLabel()
        self.patch_label, self.threshold_label, self.opacity_label = QLabel(), QLabel(), QLabel()
        for label in (self.sigma_low_label, self.sigma_high_label, self.patch_label, self.threshold_label,
                      self.opacity_label):
            label.setMinimumWidth(104)
            label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        self.show_z = QCheckBox("KL z-score vs healthy")
        self.show_z.setToolTip("Colour the KL z-score against healthy patches with the same edge content "
                               "(the prior's healthy reference) instead of the KL; small patches are pooled over "
                               "windows of about a lesion's size. Only for the patch size and noise levels the "
                               "prior was calibrated with")
        self.show_z.setEnabled(False)
        self._mm_per_px: float | None = None
        self._display_threshold: tuple[float, str] | None = None
        self.calibration_label = QLabel()
        self.calibration_label.setWordWrap(True)
        # Room for three lines always, so the dock keeps its height whatever the label says.
        self.calibration_label.setMinimumHeight(3 * self.calibration_label.fontMetrics().lineSpacing() + 4)
        self.calibration_label.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.reset_button = QPushButton("Reset to calibrated")
        self.reset_button.setToolTip("Patch size and noise levels of the prior's calibration, where thresholds "
                                     "and the healthy reference hold")
        self.reset_button.clicked.connect(self.reset_requested)
        self.reset_button.setEnabled(False)

        outer = QVBoxLayout(self)
        outer.setContentsMargins(6, 6, 6, 6)
        form = QFormLayout()
        outer.addLayout(form)
        outer.addStretch(1)
        form.addRow("Noise level from", _row(self.sigma_low, self.sigma_low_label))
        form.addRow("Noise level to", _row(self.sigma_high, self.sigma_high_label))
        form.addRow("Patch size", _row(self.patch, self.patch_label))
        form.addRow("Hide below", _row(self.threshold, self.threshold_label))
        form.addRow("Opacity", _row(self.opacity, self.opacity_label))
        form.addRow("Show", self.show_z)
        form.addRow(self.calibration_label)
        form.addRow(self.reset_button)
        self.sigma_low.setToolTip("Lowest noise level σ (prior units) whose KL energy enters the map")
        self.sigma_high.setToolTip("Highest noise level σ (prior units) whose KL energy enters the map")
        self.patch.setToolTip("Patch size in pixels of the analysis grid; a patch's KL is the sum over its pixels")
        self.threshold.setToolTip("Patches below this share of the slice's largest patch KL are transparent")

        self.sigma_low.valueChanged.connect(self._sigma_low_moved)
        self.sigma_high.valueChanged.connect(self._sigma_high_moved)
        self.patch.valueChanged.connect(self._emit_changed)
        self.threshold.valueChanged.connect(self._emit_changed)
        self.opacity.valueChanged.connect(self._opacity_moved)
        self.show_z.toggled.connect(self._emit_changed)
        self.set_settings(MapSettings())

    def settings(self) -> MapSettings:
        return MapSettings(patch=self.patch.value(), sigma_window=(self.sigma_low.value_(), self.sigma_high.value_()),
                           threshold_fraction=self.threshold.value() / 100.0, opacity=self.opacity.value() / 100.0,
                           show_z=self.show_z.isChecked())

    def set_settings(self, settings: MapSettings) -> None:
        for widget in (self.patch, self.threshold, self.opacity, self.show_z):
            widget.blockSignals(True)
        self.sigma_low.set_value(settings.sigma_window[0])
        self.sigma_high.set_value(settings.sigma_window[1])
        self.patch.setValue(settings.patch)
        self.threshold.setValue(round(settings.threshold_fraction * 100))
        self.opacity.setValue(round(settings.opacity * 100))
        self.show_z.setChecked(settings.show_z)
        for widget in (self.patch, self.threshold, self.opacity, self.show_z):
            widget.blockSignals(False)
        self._relabel()

    def set_sigma_range(self, low: float, high: float, anchors: list[float]) -> None:
        """Span the sliders over a result's sigma range, keeping their values where possible."""
        scale = LogScale(low, high)
        for slider in (self.sigma_low, self.sigma_high):
            slider.anchors = sorted(anchors)
            if slider.scale != scale:
                slider.set_scale(scale)
        self._relabel()

    def set_pixel_spacing(self, mm_per_px: float | None) -> None:
        self._mm_per_px = mm_per_px
        self._relabel()

    def set_display_threshold(self, value: float | None, unit: str = "nats") -> None:
        """What "hide below" amounts to for the shown slice, in the shown quantity's unit."""
        self._display_threshold = None if value is None else (value, unit)
        self._relabel()

    def show_calibration(self, calibrated: bool | None, calibrated_maps: list[tuple[int, tuple[float, float]]]) -> None:
        """Say whether the shown slice's map settings are calibrated (None: nothing analysed is shown);
        off them nothing can be flagged, and the reset button offers the calibrated settings back."""
        self.reset_button.setEnabled(bool(calibrated_maps) and calibrated is False)
        if calibrated is None:
            self.calibration_label.clear()
        elif calibrated:
            self.calibration_label.setStyleSheet("")
            self.calibration_label.setText("Calibrated settings: flags and z-scores hold.")
        else:
            known = "; ".join(f"patch {patch} px, σ {lo:g}–{hi:g}" for patch, (lo, hi) in calibrated_maps[:2])
            self.calibration_label.setStyleSheet(UNCALIBRATED_STYLE)
            self.calibration_label.setText(
                f"Uncalibrated here: nothing can be flagged. Calibrated: {known}." if known else
                "Uncalibrated: the prior has no calibration for this run's sampler settings; nothing can be flagged.")

    def set_z_available(self, available: bool) -> None:
        """Whether the shown slice has KL z-scores at these map settings; the choice is kept either way."""
        self.show_z.setEnabled(available)

    def _sigma_low_moved(self, position: int) -> None:
        if position > self.sigma_high.value():
            self.sigma_high.setValue(position)  # keep low <= high by pushing the other end
        self._emit_changed()

    def _sigma_high_moved(self, position: int) -> None:
        if position < self.sigma_low.value():
            self.sigma_low.setValue(position)
        self._emit_changed()

    def _opacity_moved(self, _position: int) -> None:
        self._relabel()
        self.opacity_changed.emit(self.opacity.value() / 100.0)

    def _emit_changed(self) -> None:
        self._relabel()
        self.changed.emit()

    def _relabel(self) -> None:
        s = self.settings()
        self.sigma_low_label.setText(f"σ = {s.sigma_window[0]:.3g}")
        self.sigma_high_label.setText(f"σ = {s.sigma_window[1]:.3g}")
        mm = f" · {s.patch * self._mm_per_px:.1f} mm" if self._mm_per_px else ""
        self.patch_label.setText(f"{s.patch} px{mm}")
        cut = ""
        if self._display_threshold is not None:
            value, unit = self._display_threshold
            cut = f" · {value:.3g} nats" if unit == "nats" else f" · z {value:.3g}"
        self.threshold_label.setText(f"{self.threshold.value()} % of max{cut}")
        self.opacity_label.setText(f"{self.opacity.value()} %")


def _row(slider: QSlider, label: QLabel) -> QWidget:
    box = QWidget()
    layout = QHBoxLayout(box)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(slider, 1)
    layout.addWidget(label)
    return box
