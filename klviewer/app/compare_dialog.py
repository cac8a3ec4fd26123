"""Analysis → Compare priors…: run the analysis with a "before" and an "after" prior on the same measurements.

The job (`klviewer.evaluation.compare.compare_priors`) runs in the background with progress
and Cancel; its Comparison goes to the main window, which opens a comparison window on it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from klviewer.app.messages import Notifier
from klviewer.app.prior_choices import chosen_path, fill_combo, known_priors
from klviewer.app.scope import SCOPES, Scope
from klviewer.app.settings import Preferences
from klviewer.app.task_progress import TaskProgress
from klviewer.app.task_worker import JobContext, TaskSlot
from klviewer.errors import KlviewerError
from klviewer.inference.settings import AnalysisSettings

NO_REFERENCE = "None (no shift curves)"


class CompareDialog(QDialog):
    comparison_ready = Signal(object)
    """A klviewer.evaluation.compare.Comparison."""

    def __init__(self, prefs: Preferences, notifier: Notifier, scope_for: Callable[[str], Scope],
                 settings_for: Callable[[], AnalysisSettings], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Compare priors")
        self.setModal(False)
        self._prefs = prefs
        self._notifier = notifier
        self._scope_for = scope_for
        self._settings_for = settings_for
        self.slot = TaskSlot(self)
        self.slot.succeeded.connect(self._succeeded)
        self.slot.failed.connect(lambda message, details: notifier.error("Comparison failed", message, details))
        self.slot.cancelled.connect(lambda: notifier.status("Comparison cancelled", "nothing was kept"))
        self.slot.finished.connect(lambda _ok: self.start_button.setEnabled(True))

        self.before = QComboBox()
        self.after = QComboBox()
        self.reference = QComboBox()
        self.reference.setToolTip("With a reference prior, the measurement-domain KL from it to the before and "
                                  "after priors is reported too")
        self.scope = QComboBox()
        for key, label in SCOPES.items():
            self.scope.addItem(label, key)
        self.scope.setCurrentIndex(max(self.scope.findData(prefs.get("compare/scope", "slice")), 0))
        self.start_button = QPushButton("Compare")
        self.start_button.setDefault(True)
        self.start_button.clicked.connect(self.start)
        close = QPushButton("Close")
        close.clicked.connect(self.hide)
        self.progress = TaskProgress(self.slot)
        note = QLabel("Both priors analyse the same measurements with the Analysis panel's acquisition and "
                      "sampler settings (views, noise, steps, samples, seed, device).")
        note.setWordWrap(True)
        note.setStyleSheet("color: #a0a0a0;")

        form = QFormLayout()
        form.addRow("Before", self.before)
        form.addRow("After", self.after)
        form.addRow("Reference", self.reference)
        form.addRow("Measurements", self.scope)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addStretch(1)
        buttons.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(note)
        layout.addWidget(self.progress)
        layout.addLayout(buttons)
        self.resize(520, self.sizeHint().height())
        self.refresh_priors()

    def refresh_priors(self) -> None:
        choices = known_priors(self._prefs)
        first = self.before.count() == 0
        for combo, key, none_label in ((self.before, "compare/before", None), (self.after, "compare/after", None),
                                       (self.reference, "compare/reference", NO_REFERENCE)):
            stored = self._prefs.get(key, "")
            keep = (Path(stored) if stored else None) if first else chosen_path(combo)
            fill_combo(combo, choices, keep=keep, none_label=none_label)

    def set_priors(self, before: Path, after: Path, reference: Path | None = None) -> None:
        self.refresh_priors()
        for combo, path in ((self.before, before), (self.after, after), (self.reference, reference)):
            row = combo.findData(str(path) if path else "")
            if row >= 0:
                combo.setCurrentIndex(row)

    def set_scope(self, kind: str) -> None:
        self.scope.setCurrentIndex(self.scope.findData(kind))

    def save(self) -> None:
        for combo, key in ((self.before, "compare/before"), (self.after, "compare/after"),
                           (self.reference, "compare/reference")):
            path = chosen_path(combo)
            self._prefs.set(key, str(path) if path else "")
        self._prefs.set("compare/scope", self.scope.currentData())

    def start(self) -> bool:
        """Start the comparison; False (with a message saying why) when it cannot start."""
        from klviewer.evaluation.compare import compare_priors

        if self.slot.running:
            self._notifier.info("Comparison already running", "Wait for it to finish or cancel it first.")
            return False
        before, after, reference = (chosen_path(c) for c in (self.before, self.after, self.reference))
        missing = [p for p in (before, after, reference) if p is not None and not p.is_dir()]
        if before is None or after is None or missing:
            self._notifier.error("Prior not found", f"{missing[0] if missing else 'none'}: pick installed prior folders.")
            return False
        if before == after:
            self._notifier.error("Same prior twice", f"Before and after are both {before.name}: pick two priors.")
            return False
        try:
            scope = self._scope_for(self.scope.currentData())
        except KlviewerError as exc:
            self._notifier.error("Nothing to compare on", str(exc))
            return False
        settings = self._settings_for()
        self.save()

        def job(ctx: JobContext):
            def progress(done: int, total: int) -> None:
                ctx.report(done, total, f"Analysing with {before.name} and {after.name}")

            return compare_priors(before, after, scope.plan, settings, reference=reference,
                                  slices=scope.slices, progress=progress, cancel=ctx.cancel)

        self.start_button.setEnabled(False)
        return self.slot.start(job)

    def _succeeded(self, comparison: object) -> None:
        self.comparison_ready.emit(comparison)
