"""The main window: it wires the browser, viewer, panels and the background analysis to the session model.

The state (open series, shown slice, results, case list, verdicts) lives in the Qt-free
`SessionModel`; this window turns user actions into model calls and re-draws the views from it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QTimer, Signal
from PySide6.QtGui import QCloseEvent, QKeyEvent
from PySide6.QtWidgets import QMainWindow, QWidget

from klviewer.app.adapt_dialog import AdaptDialog
from klviewer.app.align_dialog import AlignDialog
from klviewer.app.analysis_panel import AnalysisPanel
from klviewer.app.analysis_runs import AnalysisRuns
from klviewer.app.browser import StudyBrowser
from klviewer.app.case_list import CaseListView
from klviewer.app.cases import CaseList
from klviewer.app.compare_dialog import CompareDialog
from klviewer.app.comparison_view import ComparisonView
from klviewer.app.dialogs import about_html, shortcuts_html, show_html
from klviewer.app.display import (
    frame_of,
    frame_on_source,
    nearest_calibrated,
    patient_label,
    source_shape,
    study_label,
    summary_html,
)
from klviewer.app.export_dialog import ExportDialog
from klviewer.app.export_job import SessionSnapshot
from klviewer.app.map_controls import MapControls
from klviewer.app.menus import build_menus, fill_recent
from klviewer.app.messages import Notifier
from klviewer.app.model import OpenSeries, SessionModel
from klviewer.app.opening import OpeningMixin
from klviewer.app.prior_fit_panel import PriorFitPanel
from klviewer.app.prior_tools import PriorTools
from klviewer.app.scope import Scope, measurement_scope
from klviewer.app.session import CachedResult, ResultCache
from klviewer.app.session_file import confirm_close
from klviewer.app.settings import Preferences
from klviewer.app.study_banner import StudyBanner
from klviewer.app.viewer import SliceContext, SliceViewer
from klviewer.app.viewer_tools import ViewerTools
from klviewer.app.window_layout import build_central, build_docks, build_status
from klviewer.app.window_state import restore_window, save_window
from klviewer.app.worker import AnalysisThread, PriorCache, RunRequest
from klviewer.devices import resolve_device
from klviewer.errors import KlviewerError
from klviewer.inference.result import SliceResult
from klviewer.inference.scoring import verdict_of
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.study import Series

if TYPE_CHECKING:
    from klviewer.evaluation.compare import Comparison

RESCORE_DELAY_MS = 150
"""Case-list scores follow the map sliders once they rest this long (every row is re-cut)."""


class MainWindow(OpeningMixin, QMainWindow):
    analysis_finished = Signal(bool)
    """A run ended: True when every requested slice was analysed."""

    def __init__(self, prefs: Preferences, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("klviewerMainWindow")
        self.setWindowTitle("klviewer")
        self.setAcceptDrops(True)
        self.prefs = prefs
        self.notifier = Notifier(self)
        self.model = SessionModel()
        self.export_dialog: ExportDialog | None = None

        self.viewer = SliceViewer()
        self.banner = StudyBanner()
        build_central(self)
        self.browser = StudyBrowser()
        self.case_view = CaseListView(self.model.cases)
        self.panel = AnalysisPanel(prefs, self.notifier)
        self.map_controls = MapControls()
        self.prior_fit = PriorFitPanel(prefs, self.notifier, self.scope_for, self.analysis_settings)
        self.runs = AnalysisRuns(self.panel, self.notifier, self.statusBar().showMessage, self)
        self.runs.slice_done.connect(self._slice_done)
        self.runs.finished.connect(self.analysis_finished)
        self.tools = PriorTools(self, prefs, self.notifier, self.panel, self.scope_for, self.analysis_settings,
                                self.map_controls.settings, self.model.patient_series)
        self.tools_view = ViewerTools(self)
        build_docks(self)
        self.recent_menu = build_menus(self)
        fill_recent(self)
        build_status(self)
        self._prior_changed()

        self._map_timer = QTimer(self, singleShot=True, interval=0)  # coalesces a burst of slider moves
        self._map_timer.timeout.connect(self.refresh_overlay)
        self._rescore_timer = QTimer(self, singleShot=True, interval=RESCORE_DELAY_MS)
        self._rescore_timer.timeout.connect(self.rescore_cases)

        self.viewer.slice_step.connect(lambda step: self.set_slice(self.index + step))
        self.browser.series_selected.connect(self.show_series)
        self.case_view.case_selected.connect(self.show_series)
        self.panel.run_slice.connect(self.run_current_slice)
        self.panel.run_series.connect(self.run_series)
        self.panel.cancel.connect(self.cancel_run)
        self.panel.prior_changed.connect(self._prior_changed)
        self.panel.profile_picked.connect(self._profile_picked)
        self.map_controls.changed.connect(self._map_changed)
        self.map_controls.changed.connect(lambda: self.tools.refresh())
        self.map_controls.opacity_changed.connect(self.viewer.overlay.set_opacity)
        self.map_controls.reset_requested.connect(self.reset_map)
        restore_window(self)

    # ----- the model's state, as the views and tests read it --------------------------------------

    @property
    def series(self) -> dict[str, OpenSeries]:
        return self.model.series

    @property
    def current_uid(self) -> str | None:
        return self.model.current_uid

    @current_uid.setter
    def current_uid(self, uid: str | None) -> None:
        self.model.current_uid = uid

    @property
    def index(self) -> int:
        return self.model.index

    @property
    def results(self) -> ResultCache:
        return self.model.results

    @property
    def cases(self) -> CaseList:
        return self.model.cases

    @property
    def current(self) -> OpenSeries | None:
        return self.model.current

    def current_result(self) -> CachedResult | None:
        return self.model.current_result()

    # ----- navigation -----------------------------------------------------------------------

    def show_series(self, uid: str, index: int | None = None) -> None:
        entry = self.series.get(uid)
        if entry is None:
            return
        new = self.model.show(uid, index)
        self.browser.select_series(uid)
        if new:  # the last run's line is about another series now
            self.panel.summary.clear()
        self._show_current(reset=new)
        refusal = entry.series.analysis_refusal()
        self.setWindowTitle(f"klviewer — {entry.series.description or uid}")
        if refusal:
            self.statusBar().showMessage(f"View only: {refusal}", 10_000)

    def set_slice(self, index: int) -> None:
        if self.model.set_slice(index):
            self._show_current()

    def _show_current(self, reset: bool = False) -> None:
        entry = self.current
        if entry is None:
            self.viewer.clear()
            self.banner.show_for(None)
            return
        cached = self.current_result()
        result = cached.result if cached else None
        self.viewer.show_slice(SliceContext(
            series=entry.series, index=self.index, patient=patient_label(entry.patient), study=study_label(entry.study),
            result=result, prior_name=result.prior_name if result else self.panel.prior_name(),
        ), reset=reset)
        self.banner.show_for(result)
        self._update_map_ranges(entry.series, cached)
        self.refresh_overlay()

    def _update_map_ranges(self, series: Series, cached: CachedResult | None) -> None:
        if cached is not None:
            anchors = [v for window in self.model.calibrations.calibrated_windows(cached.prior_path) for v in window]
            low, high = cached.result.energy.sigma_range
            self.map_controls.set_sigma_range(low, high, anchors + list(cached.result.settings.sigma_window or ()))
            self.map_controls.set_pixel_spacing(cached.result.pixel_spacing_mm)
            return
        spacing = series.pixel_spacing_mm[1] if series.pixel_spacing_mm else None
        prior_size = self.panel.prior_image_size()
        if spacing is not None and prior_size is not None:
            spacing *= series.image_shape[1] / prior_size[1]  # patches are counted on the prior's grid
        self.map_controls.set_pixel_spacing(spacing)

    # ----- the KL map -----------------------------------------------------------------------

    def _map_changed(self) -> None:
        self._map_timer.start()
        self._rescore_timer.start()

    def refresh_overlay(self) -> None:
        """Re-cut the shown slice's KL map from its energy field with the slider settings."""
        self._map_timer.stop()
        cached = self.current_result()
        if cached is None:
            self.viewer.set_overlay(None)
            self.map_controls.set_display_threshold(None)
            self.map_controls.show_calibration(None, [])
            return
        settings = self.map_controls.settings()
        scored = self.model.score(cached, settings)
        frame = frame_of(scored, settings.clamped(cached.result.energy.image_shape))
        frame = frame_on_source(frame, cached.result.grid_for(source_shape(self.current.series, self.index)))
        frame.verdict = verdict_of(scored, cached.result.prior_fit)
        frame.guidance = cached.result.settings.guidance
        self.viewer.set_overlay(frame)
        self.map_controls.set_z_available(scored.z_map is not None)
        self.map_controls.show_calibration(scored.rule is not None, self.model.calibrated_maps(cached))
        self.map_controls.set_display_threshold(frame.display_threshold, "z" if frame.shows_z else "nats")
        self.model.update_case(self.current_uid, self.index, scored)

    def _profile_picked(self, profile: AnalysisSettings) -> None:
        """A profile's runs are calibrated at its patch and noise levels: show the map there."""
        if profile.sigma_window is not None:
            self.map_controls.set_settings(replace(self.map_controls.settings(), patch=profile.patch,
                                                   sigma_window=profile.sigma_window))

    def reset_map(self) -> None:
        """The calibrated patch and sigma window nearest the sliders, for the shown slice's run."""
        cached = self.current_result()
        chosen = nearest_calibrated(self.map_controls.settings(), self.model.calibrated_maps(cached)) if cached else None
        if chosen is not None:
            self.map_controls.set_settings(chosen)
            self._map_changed()

    def rescore_cases(self) -> None:
        """Scores and automatic flags of every listed slice, under the current map settings."""
        self._rescore_timer.stop()
        self.model.rescore(self.map_controls.settings())

    # ----- running the analysis -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.runs.running

    @property
    def thread(self) -> AnalysisThread | None:
        return self.runs.thread

    @property
    def priors(self) -> PriorCache:
        return self.runs.priors

    @priors.setter
    def priors(self, cache: PriorCache) -> None:
        self.runs.priors = cache

    def run_current_slice(self) -> bool:
        return self._start_run([self.index], "this slice")

    def run_series(self) -> bool:
        entry = self.current
        return self._start_run(list(range(entry.series.n_slices)) if entry else [], "the series")

    def _start_run(self, indices: list[int], what: str) -> bool:
        """Start a background run; False (with a message saying why) when it cannot start."""
        if self.running:
            self.notifier.info("Analysis already running", "Wait for it to finish or cancel it first.")
            return False
        prior_path = self.panel.prior_path()
        settings = self.panel.settings(self.map_controls.settings())
        escalation = self.panel.escalation()
        refusal = self.model.run_refusal(prior_path, settings, escalation)
        if refusal is not None:
            self.notifier.error(*refusal)
            return False
        self.panel.save()
        series = self.current.series
        todo = self.model.unanalysed(series.uid, indices, prior_path, settings, escalation)
        if not todo:
            self._show_current()
            self.statusBar().showMessage("Shown from the results of this session (same settings).", 5_000)
            self.analysis_finished.emit(True)
            return True
        self.runs.start(RunRequest(series, tuple(todo), prior_path, settings, escalation), what)
        return True

    def cancel_run(self) -> None:
        self.runs.cancel()

    def _slice_done(self, request: RunRequest, index: int, result: SliceResult) -> None:
        self.model.add_result(request.series.uid, index, request.prior_path, request.settings, result,
                              self.map_controls.settings(), request.escalation)
        if request.series.uid == self.current_uid and index == self.index:
            self._show_current()
        self._show_summary(result)

    def _show_summary(self, result: SliceResult) -> None:
        self.panel.summary.setText(summary_html(result))

    def stop_run(self) -> None:
        """Cancel a run and join its thread (used on close)."""
        self.runs.stop()

    # ----- prior tools and export --------------------------------------------------------------

    def scope_for(self, kind: str) -> Scope:
        """The loaded data a prior-fit, alignment or comparison job reads (see klviewer.app.scope)."""
        entry = self.current
        return measurement_scope(kind, [e.series for e in self.series.values()], entry.series if entry else None,
                                 self.index)

    def analysis_settings(self) -> AnalysisSettings:
        return self.panel.settings(self.map_controls.settings())

    def show_prior_fit(self) -> None:
        self.prior_fit_dock.show()
        self.prior_fit_dock.raise_()

    def open_adapt_dialog(self) -> AdaptDialog:
        return self.tools.open_adapt_dialog()

    def open_align_dialog(self) -> AlignDialog:
        return self.tools.open_align_dialog()

    def open_compare_dialog(self) -> CompareDialog:
        return self.tools.open_compare_dialog()

    @property
    def compare_dialog(self) -> CompareDialog | None:
        return self.tools.compare_dialog

    @property
    def comparisons(self) -> list[ComparisonView]:
        return self.tools.comparisons

    def show_comparison(self, comparison: Comparison) -> ComparisonView | None:
        return self.tools.show_comparison(comparison)


    def session_snapshot(self) -> SessionSnapshot:
        """Every slice in the case list with its latest result, flag and note, as shown now."""
        settings = self.map_controls.settings()
        return SessionSnapshot(self.model.snapshot(settings), settings)

    def open_export_dialog(self) -> ExportDialog:
        if self.export_dialog is None:
            self.export_dialog = ExportDialog(self.prefs, self.notifier, self.session_snapshot, self)
        self.export_dialog.refresh_session()
        self.export_dialog.show()
        self.export_dialog.raise_()
        return self.export_dialog

    # ----- misc -----------------------------------------------------------------------------

    def _prior_changed(self) -> None:
        self.prior_label.setText(f"Prior: {self.panel.prior_name()}")
        self.prior_fit.refresh_priors()
        self.tools.refresh_priors()
        if self.current is not None and self.current_result() is None:
            self._show_current()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802
        # Keys a focused panel widget did not use still drive the viewer.
        if not self.viewer.handle_key(event):
            super().keyPressEvent(event)

    def show_shortcuts(self) -> None:
        show_html(self, "Keyboard shortcuts", shortcuts_html())

    def show_about(self) -> None:
        try:
            device = str(resolve_device("auto"))
        except KlviewerError:
            device = "cpu"
        show_html(self, "About klviewer", about_html(device, self.panel.prior_name()))

    def save_screenshot(self, path: Path) -> bool:
        if not self.grab().save(str(path)):
            self.notifier.error("Cannot save screenshot", f"{path} could not be written.")
            return False
        return True

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        if not confirm_close(self):  # flags, notes and measurements are not lost without a word
            event.ignore()
            return
        self.stop_run()
        self.prior_fit.slot.stop()
        if self.export_dialog is not None:
            self.export_dialog.slot.stop()
        self.tools.close()
        save_window(self)
        self.case_view.model.detach()
        super().closeEvent(event)
