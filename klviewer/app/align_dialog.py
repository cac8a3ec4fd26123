"""Analysis → Align prior…: fine-tune a copy of a prior on the loaded studies' measurements, in the background.

The base prior is never written; the aligned prior is a new folder. When it is done the
main window adds it to every prior picker, and "Compare base vs aligned…" opens the
comparison with both priors filled in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from klviewer.app.messages import Notifier
from klviewer.app.prior_choices import chosen_path, fill_combo, known_priors
from klviewer.app.scope import SCOPES, Scope
from klviewer.app.settings import Preferences
from klviewer.app.task_progress import TaskProgress, result_label
from klviewer.app.task_worker import JobContext, TaskSlot
from klviewer.errors import KlviewerError
from klviewer.inference.settings import AnalysisSettings

MODES = {"norm-bias": "Norm and bias only (small adapter)", "lora": "LoRA (low-rank adapter)",
         "full": "Full fine-tuning"}
INPUT_LABELS = {"recon": "Posterior sample (base prior)", "pinv": "Least-squares image (pseudo-inverse)"}
"""Labels for klviewer.inference.align.INPUT_IMAGES; any other choice it offers is shown by its key."""


@dataclass(frozen=True)
class AlignDone:
    base: Path
    aligned: Path
    scope: Scope


def default_output(base: Path) -> Path:
    """A new folder for the aligned prior in the user's data folder (never beside the base prior)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(platformdirs.user_data_dir("klviewer")) / "priors" / f"{base.name}-aligned-{stamp}"


class AlignDialog(QDialog):
    aligned = Signal(object)
    """An AlignDone: the new prior folder is complete."""
    compare_requested = Signal(object)
    """An AlignDone: the user wants the base and aligned priors compared on the same data."""

    def __init__(self, prefs: Preferences, notifier: Notifier, scope_for: Callable[[str], Scope],
                 settings_for: Callable[[], AnalysisSettings], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from klviewer.inference.align import INPUT_IMAGES, AlignConfig

        self.setWindowTitle("Align prior")
        self.setModal(False)
        self._prefs = prefs
        self._notifier = notifier
        self._scope_for = scope_for
        self._settings_for = settings_for
        self.done_info: AlignDone | None = None
        self._pending: AlignDone | None = None
        self.slot = TaskSlot(self)
        self.slot.succeeded.connect(self._succeeded)
        self.slot.failed.connect(self._failed)
        self.slot.cancelled.connect(self._cancelled)
        self.slot.finished.connect(self._finished)
        defaults = AlignConfig.__dataclass_fields__

        self.base = QComboBox()
        self.base.currentIndexChanged.connect(self._base_picked)
        self.mode = QComboBox()
        for key, label in MODES.items():
            self.mode.addItem(label, key)
        self.mode.currentIndexChanged.connect(self._mode_picked)
        self.steps = QSpinBox()
        self.steps.setRange(1, 1_000_000)
        self.steps.setValue(prefs.get("align/steps", int(defaults["steps"].default)))
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(6)
        self.lr.setRange(1e-6, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(prefs.get("align/lr", float(defaults["lr"].default)))
        self.lora_rank = QSpinBox()
        self.lora_rank.setRange(1, 256)
        self.lora_rank.setValue(int(defaults["lora_rank"].default))
        self.input_image = QComboBox()
        for key in INPUT_IMAGES:
            self.input_image.addItem(INPUT_LABELS.get(key, key), key)
        self.input_image.setToolTip("The image the training noise is added to: made from each measurement alone")
        self.scope = QComboBox()
        for key, label in SCOPES.items():
            self.scope.addItem(label, key)
        self.scope.setCurrentIndex(max(self.scope.findData(prefs.get("align/scope", "series")), 0))
        self.out = QLineEdit()
        browse = QToolButton(text="Browse…")
        browse.clicked.connect(self._browse_out)
        self.resume = QCheckBox("Resume the run in this folder")
        self.resume.setToolTip("Continue a cancelled alignment from its last checkpoint (same settings)")
        self.mode.setCurrentIndex(self.mode.findData(prefs.get("align/mode", str(defaults["mode"].default))))
        self._mode_picked()

        self.start_button = QPushButton("Align")
        self.start_button.setDefault(True)
        self.start_button.clicked.connect(self.start)
        self.compare_button = QPushButton("Compare base vs aligned…")
        self.compare_button.setEnabled(False)
        self.compare_button.clicked.connect(self._compare)
        close = QPushButton("Close")
        close.clicked.connect(self.hide)
        self.progress = TaskProgress(self.slot)
        self.result_label = result_label()

        out_row = QHBoxLayout()
        out_row.addWidget(self.out, 1)
        out_row.addWidget(browse)
        form = QFormLayout()
        form.addRow("Base prior", self.base)
        form.addRow("Mode", self.mode)
        form.addRow("LoRA rank", self.lora_rank)
        form.addRow("Steps", self.steps)
        form.addRow("Learning rate", self.lr)
        form.addRow("Input image", self.input_image)
        form.addRow("Measurements", self.scope)
        form.addRow("Output folder", out_row)
        form.addRow("", self.resume)
        note = QLabel("Acquisition (views, noise), device, seed and the sampler steps of posterior-sample inputs "
                      "come from the Analysis panel.")
        note.setWordWrap(True)
        note.setStyleSheet("color: #a0a0a0;")
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.compare_button)
        buttons.addStretch(1)
        buttons.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(note)
        layout.addWidget(self.progress)
        layout.addWidget(self.result_label)
        layout.addLayout(buttons)
        self.resize(560, self.sizeHint().height())
        self.refresh_priors()

    # ----- fields ---------------------------------------------------------------------------

    def refresh_priors(self, select: Path | None = None) -> None:
        stored = self._prefs.get("align/base", "")
        keep = select or (Path(stored) if stored and self.base.count() == 0 else chosen_path(self.base))
        fill_combo(self.base, known_priors(self._prefs), keep=keep)
        self._base_picked()

    def set_base(self, path: Path) -> None:
        self.refresh_priors(select=path)

    def _base_picked(self, _row: int = 0) -> None:
        base = chosen_path(self.base)
        if base is not None and not self.slot.running and not self.resume.isChecked():
            self.out.setText(str(default_output(base)))

    def _mode_picked(self, _row: int = 0) -> None:
        self.lora_rank.setEnabled(self.mode.currentData() == "lora")

    def _browse_out(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder for the aligned prior (a new sub-folder is made)",
                                                  self._prefs.get("align/last_dir", ""))
        if folder:
            self._prefs.set("align/last_dir", folder)
            base = chosen_path(self.base)
            self.out.setText(str(Path(folder) / (default_output(base).name if base else "aligned-prior")))

    def save(self) -> None:
        base = chosen_path(self.base)
        self._prefs.set("align/base", str(base) if base else "")
        self._prefs.set("align/mode", self.mode.currentData())
        self._prefs.set("align/steps", self.steps.value())
        self._prefs.set("align/lr", self.lr.value())
        self._prefs.set("align/scope", self.scope.currentData())

    # ----- running --------------------------------------------------------------------------

    def start(self) -> bool:
        """Start the alignment; False (with a message saying why) when it cannot start."""
        from klviewer.inference.align import MIN_MEASUREMENTS, AlignConfig, AlignProgress, align_prior

        if self.slot.running:
            self._notifier.info("Alignment already running", "Wait for it to finish or cancel it first.")
            return False
        base = chosen_path(self.base)
        if base is None or not base.is_dir():
            self._notifier.error("No base prior", f"The prior folder {base or ''} is not there.")
            return False
        if not self.out.text().strip():
            self._notifier.error("No output folder", "Choose a folder for the aligned prior.")
            return False
        try:
            scope = self._scope_for(self.scope.currentData())
        except KlviewerError as exc:
            self._notifier.error("Nothing to align on", str(exc))
            return False
        settings = self._settings_for()
        try:
            cfg = AlignConfig(
                prior=base, inputs=list(scope.inputs), out=Path(self.out.text().strip()).expanduser(),
                mode=self.mode.currentData(), steps=self.steps.value(), lr=self.lr.value(),
                lora_rank=self.lora_rank.value(), seed=settings.seed, device=settings.device,
                resume=self.resume.isChecked(), slices=scope.slices, views=settings.views, dose_i0=settings.dose_i0,
                noise_sigma=settings.noise_sigma, input_image=self.input_image.currentData(),
                recon_steps=settings.steps, command="klviewer gui: Analysis → Align prior…",
            )
        except KlviewerError as exc:
            self._notifier.error("Cannot align", str(exc))
            return False
        if scope.n_slices < MIN_MEASUREMENTS:
            self._notifier.warning("Few measurements", f"Aligning on {scope.n_slices} measurement(s) of {scope.label}; "
                                                       f"fewer than {MIN_MEASUREMENTS} may over-fit (the paper "
                                                       "used 64 or 128).")
        self.save()
        self._pending = AlignDone(base, cfg.out, scope)

        def job(ctx: JobContext) -> Path:
            def progress(p: AlignProgress) -> None:
                if p.stage == "reconstruct":
                    ctx.report(p.step, p.steps, "Reconstructing the inputs")
                else:
                    ctx.report(p.step, p.steps, f"Aligning · loss {p.loss:.4g}")

            return align_prior(cfg, progress=progress, cancel=ctx.cancel, plan=scope.plan)

        self.start_button.setEnabled(False)
        self.compare_button.setEnabled(False)
        self.result_label.setText(f"Aligning {base.name} ({self.mode.currentText().lower()}) on {scope.label}…")
        return self.slot.start(job)

    def _succeeded(self, folder: Path) -> None:
        done = AlignDone(self._pending.base, Path(folder), self._pending.scope)
        self.done_info = done
        self.resume.setChecked(False)
        self.result_label.setText(f"Aligned prior written to {folder}. It is now offered in every prior picker.")
        self.compare_button.setEnabled(True)
        self.aligned.emit(done)

    def _failed(self, message: str, details: str) -> None:
        self.result_label.setText(f"Alignment failed: {message}")
        self._notifier.error("Alignment failed", message, details)

    def _cancelled(self) -> None:
        # align_prior writes a resume checkpoint when cancelled: offer to continue from it.
        self.resume.setChecked(True)
        self.result_label.setText(f"Cancelled. The run in {self._pending.aligned} can be continued: "
                                  "'Resume' is ticked, press Align.")
        self._notifier.status("Alignment cancelled", f"resume state kept in {self._pending.aligned}")

    def _finished(self, _ok: bool) -> None:
        self.start_button.setEnabled(True)

    def _compare(self) -> None:
        if self.done_info is not None:
            self.compare_requested.emit(self.done_info)
