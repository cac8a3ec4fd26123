"""The "Prior fit" dock: cumulative measurement-domain KL vs sigma for the loaded studies, and a ranking.

The job runs on a background thread (`TaskSlot`) with progress and Cancel; the curves and
the ranking come from `klviewer.app.prior_fit.run_prior_fit`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from klviewer.inference.verdict_text import format_nats
from klviewer.app.messages import Notifier
from klviewer.app.prior_choices import chosen_path, fill_combo, known_priors
from klviewer.app.prior_fit import FitRequest, FitResult, legend_label, run_prior_fit
from klviewer.app.scope import SCOPES, Scope
from klviewer.app.settings import Preferences
from klviewer.app.task_progress import TaskProgress
from klviewer.app.task_worker import JobContext, TaskSlot
from klviewer.errors import KlviewerError
from klviewer.inference.settings import AnalysisSettings

NO_REFERENCE = "None: rank by denoising fit"
RANK_COLUMNS = ("#", "Prior", "Score (nats)", "Δ vs best (nats)")


class PriorFitPanel(QWidget):
    def __init__(self, prefs: Preferences, notifier: Notifier, scope_for: Callable[[str], Scope],
                 settings_for: Callable[[], AnalysisSettings], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._prefs = prefs
        self._notifier = notifier
        self._scope_for = scope_for
        self._settings_for = settings_for
        self.result: FitResult | None = None
        self.slot = TaskSlot(self)
        self.slot.succeeded.connect(self.show_result)
        self.slot.failed.connect(lambda message, details: notifier.error("Prior fit failed", message, details))
        self.slot.cancelled.connect(lambda: notifier.status("Prior fit cancelled", "no curves were changed"))
        self.slot.finished.connect(lambda _ok: self.compute_button.setEnabled(True))

        self.reference = QComboBox()
        self.reference.setToolTip("A prior that fits the studies (e.g. one aligned to them); the KL of each "
                                  "candidate is measured against it")
        self.candidates = QListWidget()
        self.candidates.setMaximumHeight(80)
        self.candidates.setToolTip("Priors to measure and rank")
        self.scope = QComboBox()
        for key, label in SCOPES.items():
            self.scope.addItem(label, key)
        self.scope.setCurrentIndex(max(self.scope.findData(prefs.get("prior_fit/scope", "series")), 0))
        self.compute_button = QPushButton("Compute")
        self.compute_button.clicked.connect(self.compute)
        self.progress = TaskProgress(self.slot)

        self.plot = pg.PlotWidget()
        self.plot.setLogMode(x=True, y=False)
        self.plot.setLabel("bottom", "σ (prior units)")
        self.plot.setLabel("left", "KL (nats)")  # short: a long label is clipped at the axis' height
        self.plot.setMinimumHeight(160)
        self.legend = self.plot.addLegend(offset=(10, 10))
        self.note = QLabel("Pick a reference and candidate priors, then Compute.")
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: #a0a0a0;")
        self.table = QTableWidget(0, len(RANK_COLUMNS))
        self.table.setHorizontalHeaderLabels(RANK_COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setMinimumHeight(60)

        form = QFormLayout()
        form.addRow("Reference", self.reference)
        form.addRow("Candidates", self.candidates)
        form.addRow("Measurements", self.scope)
        buttons = QHBoxLayout()
        buttons.addWidget(self.compute_button)
        buttons.addWidget(self.progress, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.note)
        layout.addWidget(self.table)
        self.refresh_priors()

    # ----- priors ---------------------------------------------------------------------------

    def refresh_priors(self) -> None:
        """Offer every known prior (call after a prior was added or an alignment finished)."""
        choices = known_priors(self._prefs)
        stored_reference = self._prefs.get("prior_fit/reference", "")
        first = self.reference.count() == 0
        keep = (Path(stored_reference) if stored_reference else None) if first else chosen_path(self.reference)
        fill_combo(self.reference, choices, keep=keep, none_label=NO_REFERENCE)
        if self.candidates.count() == 0:
            stored = set(self._prefs.get_list("prior_fit/candidates"))
            states = {str(c.path): not stored or str(c.path) in stored for c in choices}
        else:  # keep what the user ticked; a prior new to the list (e.g. just aligned) starts ticked
            items = (self.candidates.item(r) for r in range(self.candidates.count()))
            states = {i.data(Qt.ItemDataRole.UserRole): i.checkState() == Qt.CheckState.Checked for i in items}
        self.candidates.clear()
        for choice in choices:
            item = QListWidgetItem(choice.label)
            item.setData(Qt.ItemDataRole.UserRole, str(choice.path))
            item.setToolTip(str(choice.path))
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            on = states.get(str(choice.path), True)
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
            self.candidates.addItem(item)

    def checked_candidates(self) -> list[Path]:
        items = (self.candidates.item(r) for r in range(self.candidates.count()))
        return [Path(i.data(Qt.ItemDataRole.UserRole)) for i in items if i.checkState() == Qt.CheckState.Checked]

    def set_reference(self, path: Path | None) -> None:
        self.reference.setCurrentIndex(max(self.reference.findData(str(path) if path else ""), 0))

    def set_candidates(self, paths: list[Path]) -> None:
        wanted = {str(p) for p in paths}
        for r in range(self.candidates.count()):
            item = self.candidates.item(r)
            on = item.data(Qt.ItemDataRole.UserRole) in wanted
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)

    def set_scope(self, kind: str) -> None:
        self.scope.setCurrentIndex(self.scope.findData(kind))

    def save(self) -> None:
        reference = chosen_path(self.reference)
        self._prefs.set("prior_fit/reference", str(reference) if reference else "")
        self._prefs.set("prior_fit/candidates", [str(p) for p in self.checked_candidates()])
        self._prefs.set("prior_fit/scope", self.scope.currentData())

    # ----- running --------------------------------------------------------------------------

    def compute(self) -> bool:
        """Start the job; False (with a message saying why) when it cannot start."""
        if self.slot.running:
            self._notifier.info("Prior fit already running", "Wait for it to finish or cancel it first.")
            return False
        reference = chosen_path(self.reference)
        candidates = [p for p in self.checked_candidates() if p != reference]
        if not candidates:
            self._notifier.error("No candidate priors", "Tick at least one candidate prior other than the reference.")
            return False
        missing = [p for p in [reference, *candidates] if p is not None and not p.is_dir()]
        if missing:
            self._notifier.error("Prior not found", f"{missing[0]}: the prior folder is not there.")
            return False
        try:
            scope = self._scope_for(self.scope.currentData())
        except KlviewerError as exc:
            self._notifier.error("Nothing to measure", str(exc))
            return False
        self.save()
        settings = self._settings_for()
        request = FitRequest(reference, tuple(candidates), scope, settings, seed=settings.seed)

        def job(ctx: JobContext) -> FitResult:
            return run_prior_fit(request, ctx.report, ctx.cancel)

        self.compute_button.setEnabled(False)
        return self.slot.start(job)

    def show_result(self, result: FitResult) -> None:
        self.result = result
        self.plot.clear()
        self.legend.clear()
        relative = result.reference is None
        for n, row in enumerate(result.rows):
            self.plot.plot(np.asarray(row.curve.sigmas, dtype=float), np.asarray(row.curve.cumulative, dtype=float),
                           pen=pg.mkPen(pg.intColor(n, hues=max(len(result.rows), 3)), width=2),
                           name=legend_label(row, relative))
        self.plot.setLabel("left", "KL (nats)" if not relative else "fit (nats)")  # cumulative over σ: see the title
        self.plot.setTitle(f"cumulative KL({result.reference} ‖ prior)" if not relative else "cumulative denoising fit")
        if relative:
            self.note.setText(f"No reference prior: {len(result.rows)} prior(s) ranked by their denoising fit on "
                              f"{result.n_measurements} measurement(s) of {result.scope_label}. The fit is the KL "
                              "from the studies plus a constant shared by all priors: compare the Δ column.")
        else:
            self.note.setText(f"KL from {result.reference} to each candidate over {result.n_measurements} "
                              f"measurement(s) of {result.scope_label}; lower means the prior fits the studies better.")
        self.note.setToolTip(result.criterion)
        self.table.setRowCount(len(result.rows))
        for r, row in enumerate(result.rows):
            for c, text in enumerate((str(r + 1), row.name, format_nats(row.score), format_nats(row.delta))):
                item = QTableWidgetItem(text)
                if c == 1:
                    item.setToolTip(str(row.path))
                self.table.setItem(r, c, item)
