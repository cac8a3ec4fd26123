"""Analysis → Adapt prior to my studies…: a site prior from the open studies the user vouches for as healthy.

It runs `klviewer.evaluation.adapt.adapt_prior` in the background (split by patient, fine-tune a
copy of the base prior, calibrate on the held-out patients, report), with progress and Cancel.
A cancelled run can be resumed. The base prior is never written; the new prior is offered in
every prior picker when it is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import platformdirs
from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from klviewer.app.messages import Notifier
from klviewer.app.prior_choices import chosen_path, fill_combo, known_priors
from klviewer.app.settings import Preferences
from klviewer.app.task_progress import TaskProgress, result_label
from klviewer.app.task_worker import JobContext, TaskSlot
from klviewer.errors import KlviewerError
from klviewer.inference.settings import DETECTION_SETTINGS, AnalysisSettings
from klviewer.io.study import Series

MODES = {"full": "Full fine-tuning", "norm-bias": "Norm and bias only (small adapter)",
         "lora": "LoRA (low-rank adapter)"}


def default_output(base: Path) -> Path:
    """A new folder for the site prior in the user's data folder (never beside the base prior)."""
    return Path(platformdirs.user_data_dir("klviewer")) / "priors" / f"{base.name}-site-{time.strftime('%Y%m%d-%H%M%S')}"


class AdaptDialog(QDialog):
    adapted = Signal(object)
    """The folder of the finished site prior."""

    def __init__(self, prefs: Preferences, notifier: Notifier, studies: Callable[[], Sequence[tuple[str, Series]]],
                 settings_for: Callable[[], AnalysisSettings], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from klviewer.evaluation.adapt import AdaptConfig

        self.setWindowTitle("Adapt prior to my studies")
        self.setModal(False)
        self._prefs, self._notifier, self._studies, self._settings_for = prefs, notifier, studies, settings_for
        self._pending: Path | None = None
        self.slot = TaskSlot(self)
        self.slot.succeeded.connect(self._succeeded)
        self.slot.failed.connect(self._failed)
        self.slot.cancelled.connect(self._cancelled)
        self.slot.finished.connect(lambda _ok: self.start_button.setEnabled(True))
        defaults = AdaptConfig(base="", inputs=["-"], out=Path("-"))

        self.base = QComboBox()
        self.base.currentIndexChanged.connect(self._base_picked)
        self.mode = QComboBox()
        for key, label in MODES.items():
            self.mode.addItem(label, key)
        self.mode.setCurrentIndex(max(self.mode.findData(prefs.get("adapt/mode", defaults.mode)), 0))
        self.steps = QSpinBox()
        self.steps.setRange(1, 1_000_000)
        self.steps.setValue(prefs.get("adapt/steps", defaults.steps))
        self.held_out = QSpinBox()
        self.held_out.setRange(10, 60)
        self.held_out.setSuffix(" % of the slices")
        self.held_out.setValue(prefs.get("adapt/held_out", round(100 * defaults.held_out)))
        self.detection = QCheckBox("Also calibrate the detection settings (4 samples, patch 4, σ 0.01–0.05)")
        self.out = QLineEdit()
        self.resume = QCheckBox("Resume the run in this folder")
        self.vouch = QCheckBox("I vouch that the open studies are healthy (no lesions, no implants)")
        self.start_button = QPushButton("Adapt")
        self.start_button.setDefault(True)
        self.start_button.clicked.connect(self.start)
        close = QPushButton("Close")
        close.clicked.connect(self.hide)
        self.progress = TaskProgress(self.slot)
        self.result_label = result_label()

        form = QFormLayout()
        form.addRow("Base prior", self.base)
        form.addRow("Mode", self.mode)
        form.addRow("Steps", self.steps)
        form.addRow("Held out", self.held_out)
        form.addRow("", self.detection)
        form.addRow("Output folder", self.out)
        form.addRow("", self.resume)
        note = QLabel("Every open series is used: whole patients (PatientID, else the study) are held out to "
                      "calibrate the new prior; one patient is cut into slabs with a gap. Device and seed come "
                      "from the Analysis panel.")
        note.setWordWrap(True)
        note.setStyleSheet("color: #a0a0a0;")
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addStretch(1)
        buttons.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(note)
        layout.addWidget(self.vouch)
        layout.addWidget(self.progress)
        layout.addWidget(self.result_label)
        layout.addLayout(buttons)
        self.refresh_priors()

    def refresh_priors(self, select: Path | None = None) -> None:
        fill_combo(self.base, known_priors(self._prefs), keep=select or chosen_path(self.base))
        self._base_picked()

    def _base_picked(self, _row: int = 0) -> None:
        base = chosen_path(self.base)
        if base is not None and not self.slot.running and not self.resume.isChecked():
            self.out.setText(str(default_output(base)))

    def start(self) -> bool:
        """Start the adaptation; False (with a message saying why) when it cannot start."""
        from klviewer.evaluation.adapt import AdaptConfig, AdaptProgress, adapt_prior

        if self.slot.running:
            self._notifier.info("Adaptation already running", "Wait for it to finish or cancel it first.")
            return False
        base = chosen_path(self.base)
        if base is None or not base.is_dir():
            self._notifier.error("No base prior", f"The prior folder {base or ''} is not there.")
            return False
        if not self.vouch.isChecked():
            self._notifier.error("Healthy studies only", "Tick that the open studies are healthy: the new prior "
                                                         "learns them as normal.")
            return False
        studies = list(self._studies())
        analysis = self._settings_for()
        calibrated = [AnalysisSettings(views=analysis.views, dose_i0=analysis.dose_i0, noise_sigma=analysis.noise_sigma)]
        if self.detection.isChecked():
            calibrated.append(replace(DETECTION_SETTINGS, views=analysis.views, dose_i0=analysis.dose_i0,
                                      noise_sigma=analysis.noise_sigma))
        try:
            cfg = AdaptConfig(
                base=base, inputs=sorted({str(s.files[0]) for _, s in studies if s.files}),
                out=Path(self.out.text().strip()).expanduser(), mode=self.mode.currentData(),
                steps=self.steps.value(), seed=analysis.seed, device=analysis.device, resume=self.resume.isChecked(),
                held_out=self.held_out.value() / 100, settings=calibrated,
                command="klviewer gui: Analysis → Adapt prior to my studies…",
            )
        except KlviewerError as exc:
            self._notifier.error("Cannot adapt", str(exc))
            return False
        self._prefs.set("adapt/mode", cfg.mode)
        self._prefs.set("adapt/steps", cfg.steps)
        self._prefs.set("adapt/held_out", self.held_out.value())
        self._pending = cfg.out

        def job(ctx: JobContext) -> Path:
            def progress(p: AdaptProgress) -> None:
                text = {"train": f"Fine-tuning · loss {p.loss:.4g}", "calibrate": "Calibrating on the held-out slices"}
                ctx.report(p.step, p.steps, text.get(p.stage, p.stage))

            return adapt_prior(cfg, progress=progress, cancel=ctx.cancel, series=studies).out

        self.start_button.setEnabled(False)
        self.result_label.setText(f"Adapting {base.name} on {len(studies)} open series…")
        return self.slot.start(job)

    def _succeeded(self, folder: Path) -> None:
        self.resume.setChecked(False)
        self.result_label.setText(f"Site prior written to {folder} (report: adaptation/ADAPTATION.md). It is now "
                                  "offered in every prior picker.")
        self.adapted.emit(Path(folder))

    def _failed(self, message: str, details: str) -> None:
        self.result_label.setText(f"Adaptation failed: {message}")
        self._notifier.error("Adaptation failed", message, details)

    def _cancelled(self) -> None:
        self.resume.setChecked(True)
        self.result_label.setText(f"Cancelled. The run in {self._pending} can be continued: 'Resume' is ticked, "
                                  "press Adapt.")
        self._notifier.status("Adaptation cancelled", f"resume state kept in {self._pending}")
