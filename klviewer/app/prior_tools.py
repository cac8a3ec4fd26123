"""The prior tools beside the viewer: the adapt, align and compare dialogs and the comparison windows they open."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject
from PySide6.QtWidgets import QWidget

from klviewer.app.adapt_dialog import AdaptDialog
from klviewer.app.align_dialog import AlignDialog, AlignDone
from klviewer.app.analysis_panel import AnalysisPanel
from klviewer.app.compare_dialog import CompareDialog
from klviewer.app.comparison_view import ComparisonView
from klviewer.app.display import MapSettings
from klviewer.app.messages import Notifier
from klviewer.app.scope import Scope
from klviewer.app.settings import Preferences
from klviewer.app.task_worker import TaskSlot
from klviewer.errors import KlviewerError
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.study import Series

if TYPE_CHECKING:
    from klviewer.evaluation.compare import Comparison


class PriorTools(QObject):
    """Opens the dialogs once and keeps them; new priors go into the Analysis panel's pickers."""

    def __init__(self, window: QWidget, prefs: Preferences, notifier: Notifier, panel: AnalysisPanel,
                 scope_for: Callable[[str], Scope], analysis_settings: Callable[[], AnalysisSettings],
                 map_settings: Callable[[], MapSettings], studies: Callable[[], Sequence[tuple[str, Series]]]) -> None:
        super().__init__(window)
        self._window, self._prefs, self._notifier, self._panel = window, prefs, notifier, panel
        self._scope_for, self._analysis_settings, self._map_settings = scope_for, analysis_settings, map_settings
        self._studies = studies
        self.adapt_dialog: AdaptDialog | None = None
        self.align_dialog: AlignDialog | None = None
        self.compare_dialog: CompareDialog | None = None
        self.comparisons: list[ComparisonView] = []

    def open_adapt_dialog(self) -> AdaptDialog:
        if self.adapt_dialog is None:
            self.adapt_dialog = AdaptDialog(self._prefs, self._notifier, self._studies, self._analysis_settings,
                                            self._window)
            self.adapt_dialog.adapted.connect(self._adapted)
        base = self._panel.prior_path()
        if base is not None and not self.adapt_dialog.slot.running:
            self.adapt_dialog.refresh_priors(select=base)
        self.adapt_dialog.show()
        self.adapt_dialog.raise_()
        return self.adapt_dialog

    def _offer(self, folder: Path) -> None:
        """Add a new prior to every picker; the analysis keeps the prior it had."""
        keep = self._panel.prior_path()
        if self._panel.add_prior_folder(folder) and keep is not None:
            self._panel.prior_combo.setCurrentIndex(max(self._panel.prior_combo.findData(str(keep)), 0))

    def _adapted(self, folder: Path) -> None:
        self._offer(folder)
        self._notifier.status("Adaptation finished", f"{folder.name} is now offered in every prior picker; its report "
                                                     "is in adaptation/ADAPTATION.md")

    def open_align_dialog(self) -> AlignDialog:
        if self.align_dialog is None:
            self.align_dialog = AlignDialog(self._prefs, self._notifier, self._scope_for, self._analysis_settings,
                                            self._window)
            self.align_dialog.aligned.connect(self._aligned)
            self.align_dialog.compare_requested.connect(self._compare_aligned)
        base = self._panel.prior_path()
        if base is not None and not self.align_dialog.slot.running:
            self.align_dialog.set_base(base)
        self.align_dialog.show()
        self.align_dialog.raise_()
        return self.align_dialog

    def open_compare_dialog(self) -> CompareDialog:
        if self.compare_dialog is None:
            self.compare_dialog = CompareDialog(self._prefs, self._notifier, self._scope_for, self._analysis_settings,
                                                self._window)
            self.compare_dialog.comparison_ready.connect(self.show_comparison)
        self.compare_dialog.show()
        self.compare_dialog.raise_()
        return self.compare_dialog

    def _aligned(self, done: AlignDone) -> None:
        self._offer(done.aligned)
        self._notifier.status("Alignment finished", f"{done.aligned.name} (aligned from {done.base.name} on "
                                                    f"{done.scope.label}) is now offered in every prior picker")

    def _compare_aligned(self, done: AlignDone) -> None:
        self.open_compare_dialog().set_priors(done.base, done.aligned.resolve())

    def show_comparison(self, comparison: Comparison) -> ComparisonView | None:
        """Open a comparison window (non-modal; the app keeps working beside it)."""
        try:
            view = ComparisonView(comparison, self._notifier, self._map_settings, self._window)
        except KlviewerError as exc:
            self._notifier.error("Nothing to compare", str(exc))
            return None
        self.comparisons.append(view)
        view.closed.connect(lambda v=view: self.comparisons.remove(v) if v in self.comparisons else None)
        view.show()
        view.raise_()
        return view

    def refresh(self) -> None:
        """The map sliders moved: every comparison window re-cuts its overlays; a new prior: every picker lists it."""
        for view in self.comparisons:
            view.refresh_overlays()

    def refresh_priors(self) -> None:
        for dialog in (self.adapt_dialog, self.align_dialog, self.compare_dialog):
            if dialog is not None:
                dialog.refresh_priors()

    def task_slots(self) -> list[TaskSlot]:
        return [d.slot for d in (self.adapt_dialog, self.align_dialog, self.compare_dialog) if d is not None]

    def close(self) -> None:
        for slot in self.task_slots():
            slot.stop()
        for view in list(self.comparisons):
            view.close()
