"""The analysis panel: prior, device, acquisition and sampler settings, Run / Cancel and progress."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from klviewer.app.display import MapSettings
from klviewer.app.messages import Notifier
from klviewer.app.settings import Preferences
from klviewer.errors import KlviewerError
from klviewer.inference.escalation import Escalation
from klviewer.inference.precision import precision_for_device
from klviewer.inference.settings import DEFAULT_PROFILE, EXTRA_SAMPLING_KEYS, MAX_SAMPLES, PROFILES, AnalysisSettings
from klviewer.priors.checkpoint import DEFAULT_PRIOR, list_priors, load_prior, priors_dir, read_prior_config

NOISE_MODES = {"none": "Noise-free", "dose": "Poisson: photons per ray (I0)", "gaussian": "Gaussian: σ of line integrals"}
NOISE_DEFAULTS = {"none": 0.0, "dose": 1e5, "gaussian": 0.01}
PROFILE_LABELS = {
    "standard": ("Standard", "1 posterior sample of 100 steps; KL over 8 px patches, noise levels 0.01-0.5"),
    "fast": ("Fast (bfloat16)", "The standard settings with the denoiser in bfloat16: about 1.25x faster on a CPU "
                                "with AVX-512 BF16, the same detection on the phantom benchmark; on a device without "
                                "bfloat16 in hardware they are the standard settings"),
    "screening": ("Screening (2 samples)", "2 independent posterior samples of 89 steps, down to noise level 0.01, "
                                           "with the denoiser in bfloat16 (float32 on a device without bfloat16 in "
                                           "hardware), data-consistency guidance above noise level 1; KL z-scores "
                                           "over 4 px patches, noise levels 0.01-0.05. With Escalate to 4: two "
                                           "stages, as calibrated for the shipped prior"),
    "detection": ("Detection (slow)", "4 independent posterior samples of 100 steps; KL z-scores over 4 px patches"),
}
CUSTOM = "custom"
GUIDANCE_LABELS = {
    "pigdm": ("PiGDM", "Likelihood through the denoiser's Jacobian: KL energy stays on structure (default)"),
    "dc": ("Data consistency", "Isotropic data-consistency step, no backpropagation: fastest on a CPU, streaky KL maps"),
    "dps": ("DPS", "Diffusion posterior sampling: a fixed-size gradient step through the denoiser"),
    "tmpd": ("TMPD (experimental)", "Tweedie covariance by conjugate gradients: KL exact on Gaussian priors, but "
                                    "on a network prior its solve can fail on many steps (the run's notes say how "
                                    "many); about 3x slower than PiGDM on a CPU; weaker detection on phantoms"),
}


class AnalysisPanel(QWidget):
    run_slice = Signal()
    run_series = Signal()
    cancel = Signal()
    prior_changed = Signal()
    profile_picked = Signal(object)
    """The AnalysisSettings of a profile the user picked: the map should show its patch and noise levels."""

    def __init__(self, prefs: Preferences, notifier: Notifier, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._prefs = prefs
        self._notifier = notifier
        self._started = 0.0
        self._noise_values = dict(NOISE_DEFAULTS)

        self.prior_combo = QComboBox()
        self.prior_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.prior_combo.setMinimumContentsLength(14)
        self.prior_combo.currentIndexChanged.connect(self._prior_picked)
        add = QToolButton(text="Add…")
        add.setToolTip("Add a prior folder (config.json + model.safetensors)")
        add.clicked.connect(self._browse_prior)
        self.prior_info = QLabel()
        self.prior_info.setWordWrap(True)
        self.prior_info.setStyleSheet("color: #a0a0a0;")
        self.device_combo = QComboBox()
        cuda = torch.cuda.is_available()
        self.device_combo.addItem(f"Auto ({'CUDA' if cuda else 'CPU'})", "auto")
        self.device_combo.addItem("CPU", "cpu")
        self.device_combo.addItem("CUDA" if cuda else "CUDA (not available)", "cuda")
        self.device_combo.model().item(2).setEnabled(cuda)

        self.views = _spin(1, 1440, 24, "Projection angles simulated from an image input")
        self.noise_mode = QComboBox()
        for key, label in NOISE_MODES.items():
            self.noise_mode.addItem(label, key)
        self.noise_value = QDoubleSpinBox()
        self.noise_value.setDecimals(4)
        self.noise_value.setRange(0.0001, 1e9)
        self.noise_mode.currentIndexChanged.connect(self._noise_mode_picked)
        self.noise_value.valueChanged.connect(self._noise_value_edited)
        self.steps = _spin(2, 5000, 100, "Reverse-diffusion steps per posterior sample")
        self.samples = _spin(1, MAX_SAMPLES, 1, "Posterior samples (more: smoother KL and a posterior std)")
        self.seed = _spin(0, 2**31 - 1, 0, "Random seed: same seed, same device, same result")
        self.guidance_combo = QComboBox()
        for key, (label, tip) in GUIDANCE_LABELS.items():
            self.guidance_combo.addItem(label, key)
            self.guidance_combo.setItemData(self.guidance_combo.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
        self.profile_combo = QComboBox()
        for key, (label, tip) in PROFILE_LABELS.items():
            self.profile_combo.addItem(label, key)
            self.profile_combo.setItemData(self.profile_combo.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
        self.profile_combo.addItem("Custom", CUSTOM)
        self.profile_combo.model().item(self.profile_combo.count() - 1).setEnabled(False)
        self.profile_combo.activated.connect(self._profile_picked)
        self._schedule = PROFILES[DEFAULT_PROFILE]
        """The settings under the boxes: the picked profile's precision and noise-level schedule, which the
        next run keeps while the boxes change steps, samples and guidance."""
        for spin in (self.steps, self.samples):
            spin.valueChanged.connect(self._sampler_edited)
        self.escalate = _spin(0, MAX_SAMPLES, 0, "Two stages: every slice gets the samples above; the slices whose KL z-score "
                                        "passes the escalation threshold (passed by half of the prior's healthy "
                                        "calibration slices) get more chains, this many in all, and their verdict. "
                                        "The others are not flagged. Needs the prior calibrated for both sample "
                                        "counts (e.g. Screening, then 4)")
        self.escalate.setSpecialValueText("Off")
        self.guidance_combo.currentIndexChanged.connect(self._sampler_edited)
        self.device_combo.currentIndexChanged.connect(self._sampler_edited)  # the arithmetic depends on the device

        self.run_slice_button = QPushButton("Run slice")
        self.run_slice_button.setToolTip("Analyse the slice on screen")
        self.run_series_button = QPushButton("Run series")
        self.run_series_button.setToolTip("Analyse every slice of the series not yet analysed with these settings")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.run_slice_button.clicked.connect(self.run_slice)
        self.run_series_button.clicked.connect(self.run_series)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.eta = QLabel("Idle")
        self.eta.setStyleSheet("color: #a0a0a0;")
        self.summary = QLabel()
        self.summary.setWordWrap(True)

        prior_row = QHBoxLayout()
        prior_row.addWidget(self.prior_combo, 1)
        prior_row.addWidget(add)
        prior_box = QGroupBox("Prior")
        prior_form = QFormLayout(prior_box)
        prior_form.addRow(prior_row)
        prior_form.addRow(self.prior_info)
        prior_form.addRow("Device", self.device_combo)
        acq_box = QGroupBox("Acquisition")
        acq_form = QFormLayout(acq_box)
        acq_form.addRow("Views", self.views)
        acq_form.addRow("Noise", self.noise_mode)
        acq_form.addRow(self.noise_value)
        sampler_box = QGroupBox("Sampler")
        sampler_form = QFormLayout(sampler_box)
        sampler_form.addRow("Profile", self.profile_combo)
        # Two boxes per row (steps and seed; samples and the escalation's chains), so the run buttons stay in
        # view at 1366x768.
        steps_row = QHBoxLayout()
        steps_row.addWidget(self.steps, 1)
        steps_row.addWidget(QLabel("Seed"))
        steps_row.addWidget(self.seed, 1)
        sampler_form.addRow("Steps", steps_row)
        samples_row = QHBoxLayout()
        samples_row.addWidget(self.samples, 1)
        samples_row.addWidget(QLabel("Escalate to"))
        samples_row.addWidget(self.escalate, 1)
        sampler_form.addRow("Samples", samples_row)
        sampler_form.addRow("Guidance", self.guidance_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_slice_button)
        buttons.addWidget(self.run_series_button)
        buttons.addWidget(self.cancel_button)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        for box in (prior_box, acq_box, sampler_box):
            layout.addWidget(box)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.eta)
        layout.addWidget(self.summary)
        layout.addStretch(1)  # spare height goes below the panel, not between its rows
        self._fill_priors()
        self.restore()

    # ----- priors ------------------------------------------------------------------------

    def _fill_priors(self, select: str | None = None) -> None:
        self.prior_combo.blockSignals(True)
        self.prior_combo.clear()
        for name in list_priors():
            self.prior_combo.addItem(name, str(priors_dir() / name))
        for folder in self._prefs.get_list("priors/user"):
            if self.prior_combo.findData(folder) < 0:
                self.prior_combo.addItem(f"{Path(folder).name} (added)", folder)
                self.prior_combo.setItemData(self.prior_combo.count() - 1, folder, Qt.ItemDataRole.ToolTipRole)
        if self.prior_combo.count() == 0:
            self.prior_combo.addItem(f"{DEFAULT_PRIOR} (not installed)", "")
        wanted = select or self._prefs.get("priors/current", "") or str(priors_dir() / DEFAULT_PRIOR)
        row = self.prior_combo.findData(wanted)
        self.prior_combo.setCurrentIndex(max(row, 0))
        self.prior_combo.blockSignals(False)
        self._describe_prior()

    def prior_path(self) -> Path | None:
        data = self.prior_combo.currentData()
        return Path(data) if data else None

    def prior_name(self) -> str:
        path = self.prior_path()
        return path.name if path else "none"

    def add_prior_folder(self, folder: Path) -> bool:
        """Check that the folder loads as a prior, then remember it and select it."""
        try:
            load_prior(folder, "cpu")
        except KlviewerError as exc:
            self._notifier.error("Cannot use this prior", str(exc))
            return False
        text = str(Path(folder).resolve())
        folders = [text] + [f for f in self._prefs.get_list("priors/user") if f != text]
        self._prefs.set("priors/user", folders)
        self._fill_priors(select=text)
        self._prior_picked()
        return True

    def _browse_prior(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Add prior folder", self._prefs.get("priors/last_dir", ""))
        if folder:
            self._prefs.set("priors/last_dir", folder)
            self.add_prior_folder(Path(folder))

    def _prior_picked(self, _row: int = 0) -> None:
        path = self.prior_path()
        self._prefs.set("priors/current", str(path) if path else "")
        self._describe_prior()
        self.prior_changed.emit()

    def _describe_prior(self) -> None:
        path = self.prior_path()
        if path is None:
            self.prior_info.setText("No prior installed: add a prior folder to analyse.")
            return
        try:
            config = read_prior_config(path)
        except KlviewerError as exc:
            self.prior_info.setText(f"Unreadable: {exc}")
            return
        h, w = config.image_size
        spacing = f", {config.pixel_spacing_mm:.2f} mm/px" if config.pixel_spacing_mm else ""
        self.prior_info.setText(f"{config.name}: {config.architecture}, {w}×{h}{spacing}")
        self.prior_info.setToolTip(str(path))

    def prior_image_size(self) -> tuple[int, int] | None:
        path = self.prior_path()
        if path is None:
            return None
        try:
            return read_prior_config(path).image_size
        except KlviewerError:
            return None

    # ----- settings ------------------------------------------------------------------------

    def _noise_mode_picked(self, _row: int) -> None:
        mode = self.noise_mode.currentData()
        self.noise_value.setVisible(mode != "none")
        self.noise_value.blockSignals(True)
        self.noise_value.setDecimals(0 if mode == "dose" else 4)
        self.noise_value.setValue(self._noise_values[mode] if mode != "none" else 0)
        self.noise_value.blockSignals(False)

    def _noise_value_edited(self, value: float) -> None:
        self._noise_values[self.noise_mode.currentData()] = value

    def settings(self, map_settings: MapSettings) -> AnalysisSettings:
        mode = self.noise_mode.currentData()
        value = float(self.noise_value.value())
        settings = replace(
            self._schedule,
            views=self.views.value(), dose_i0=value if mode == "dose" else None,
            noise_sigma=value if mode == "gaussian" else None, steps=self.steps.value(),
            samples=self.samples.value(), patch=map_settings.patch, sigma_window=map_settings.sigma_window,
            seed=self.seed.value(), device=self.device_combo.currentData(), guidance=self.guidance_combo.currentData(),
        )
        return precision_for_device(settings)[0]

    def escalation(self) -> Escalation | None:
        """Two stages when the Escalate box is on: the slices whose KL z-score passes the escalation threshold get
        that many chains in all."""
        return Escalation(self.escalate.value()) if self.escalate.value() else None

    def profile(self) -> str:
        """The profile the sampler settings match, or "custom"."""
        return str(self.profile_combo.currentData())

    def _profile_picked(self, _row: int = 0) -> None:
        name = self.profile_combo.currentData()
        if name in PROFILES:
            self._set_sampler(PROFILES[name])
            self.profile_picked.emit(PROFILES[name])

    def _set_sampler(self, settings: AnalysisSettings) -> None:
        self._schedule = settings
        for widget in (self.steps, self.samples, self.guidance_combo):
            widget.blockSignals(True)
        self.steps.setValue(settings.steps)
        self.samples.setValue(settings.samples)
        row = self.guidance_combo.findData(settings.guidance)
        if row >= 0:
            self.guidance_combo.setCurrentIndex(row)
        for widget in (self.steps, self.samples, self.guidance_combo):
            widget.blockSignals(False)
        self._sampler_edited()

    def _sampler_edited(self, *_args: object) -> None:
        """Show the profile the sampler settings match now (custom when none) and what they run."""
        current = replace(self._schedule, steps=self.steps.value(), samples=self.samples.value(),
                          guidance=self.guidance_combo.currentData())
        keys = ("steps", "samples", "guidance", *EXTRA_SAMPLING_KEYS)
        name = next((n for n, p in PROFILES.items() if all(getattr(p, k) == getattr(current, k) for k in keys)), CUSTOM)
        self.profile_combo.setCurrentIndex(self.profile_combo.findData(name))
        _runs, notice = precision_for_device(replace(current, device=self.device_combo.currentData()))
        self.profile_combo.setToolTip(f"{current.describe_chains()}. Named settings the prior is calibrated for; "
                                      "changing steps, samples or guidance makes them custom"
                                      + ("" if notice is None else f". Here {notice}"))
        shared = "the shared chain" if current.trunks == 1 else "each shared chain"
        self.steps.setToolTip("Reverse-diffusion steps " + ("per posterior sample" if current.branch_sigma is None
                                                             else f"of {shared} down to σ {current.branch_sigma:g}"))

    def apply(self, settings: AnalysisSettings) -> None:
        self.views.setValue(settings.views)
        mode = "dose" if settings.dose_i0 is not None else "gaussian" if settings.noise_sigma is not None else "none"
        if mode != "none":
            self._noise_values[mode] = float(settings.dose_i0 if mode == "dose" else settings.noise_sigma)
        self.noise_mode.setCurrentIndex(self.noise_mode.findData(mode))
        self._noise_mode_picked(0)
        self._set_sampler(settings)
        self.seed.setValue(settings.seed)
        row = self.device_combo.findData(settings.device)
        if row >= 0 and self.device_combo.model().item(row).isEnabled():
            self.device_combo.setCurrentIndex(row)

    def restore(self) -> None:
        """The saved settings; a saved profile brings its own sampler settings, a custom one the saved ones."""
        p = self._prefs
        profile = p.get("analysis/profile", "")
        d = PROFILES.get(profile, PROFILES[DEFAULT_PROFILE])
        if profile == CUSTOM:
            d = PROFILES.get(p.get("analysis/schedule", ""), PROFILES[DEFAULT_PROFILE])
            d = replace(d, steps=p.get("analysis/steps", d.steps), samples=p.get("analysis/samples", d.samples),
                        guidance=p.get("analysis/guidance", d.guidance))
        mode = p.get("analysis/noise_mode", "none")
        value = p.get("analysis/noise_value", NOISE_DEFAULTS.get(mode, 0.0))
        self.escalate.setValue(p.get("analysis/escalate", 0))
        self.apply(replace(
            d, views=p.get("analysis/views", d.views), seed=p.get("analysis/seed", d.seed),
            device=p.get("analysis/device", d.device),
            dose_i0=value if mode == "dose" else None, noise_sigma=value if mode == "gaussian" else None,
        ))

    def save(self) -> None:
        p = self._prefs
        mode = self.noise_mode.currentData()
        p.set("analysis/views", self.views.value())
        p.set("analysis/noise_mode", mode)
        p.set("analysis/noise_value", self._noise_values.get(mode, 0.0))
        p.set("analysis/profile", self.profile())
        p.set("analysis/schedule", next((n for n, s in PROFILES.items() if s.changed_extras() == self._schedule.changed_extras()),
                                        DEFAULT_PROFILE))
        p.set("analysis/steps", self.steps.value())
        p.set("analysis/samples", self.samples.value())
        p.set("analysis/seed", self.seed.value())
        p.set("analysis/escalate", self.escalate.value())
        p.set("analysis/device", self.device_combo.currentData())
        p.set("analysis/guidance", self.guidance_combo.currentData())

    # ----- running -------------------------------------------------------------------------

    def set_running(self, running: bool, what: str = "") -> None:
        self.run_slice_button.setEnabled(not running)
        self.run_series_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self._started = time.monotonic()
            self.progress.setRange(0, 0)  # busy until the first step reports
            self.eta.setText(what or "Starting…")

    def show_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        elapsed = time.monotonic() - self._started
        if 0 < done < total:
            eta = elapsed * (total - done) / done
            self.eta.setText(f"Step {done} / {total} · {_clock(elapsed)} elapsed · ETA {_clock(eta)}")
        else:
            self.eta.setText(f"Step {done} / {total} · {_clock(elapsed)} elapsed")

    def show_idle(self, text: str, complete: bool) -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if complete else 0)
        self.eta.setText(text)


def _spin(low: int, high: int, value: int, tip: str) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(low, high)
    spin.setValue(value)
    spin.setToolTip(tip)
    return spin


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
