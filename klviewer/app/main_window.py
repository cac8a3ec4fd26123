"""The main window: it wires the browser, viewer, panels and the background analysis together."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PySide6.QtCore import QByteArray, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCloseEvent, QDragEnterEvent, QDropEvent, QKeyEvent, QKeySequence
from PySide6.QtWidgets import QDockWidget, QFileDialog, QLabel, QMainWindow, QWidget

from klviewer.app.align_dialog import AlignDialog, AlignDone
from klviewer.app.analysis_panel import AnalysisPanel
from klviewer.app.browser import StudyBrowser, patient_label, study_label
from klviewer.app.case_list import CaseListView
from klviewer.app.cases import CaseEntry, CaseList
from klviewer.app.compare_dialog import CompareDialog
from klviewer.app.comparison_view import ComparisonView
from klviewer.app.dialogs import about_html, shortcuts_html, show_html
from klviewer.app.display import PRESETS, MapSettings, format_nats, overlay_frame
from klviewer.app.export_dialog import ExportDialog
from klviewer.app.export_job import SessionSnapshot
from klviewer.app.map_controls import MapControls
from klviewer.app.messages import Notifier
from klviewer.app.prior_fit_panel import PriorFitPanel
from klviewer.app.scope import Scope, measurement_scope
from klviewer.app.session import CachedResult, FlagThresholds, ResultCache, ResultKey
from klviewer.app.session_results import SessionSlice
from klviewer.app.settings import Preferences
from klviewer.app.task_worker import TaskSlot
from klviewer.app.viewer import SliceContext, SliceViewer
from klviewer.app.worker import AnalysisThread, PriorCache, RunRequest
from klviewer.devices import resolve_device
from klviewer.errors import KlviewerError
from klviewer.inference.analysis import AnalysisSettings, SliceResult, is_flagged
from klviewer.inference.healthy_reference import ZCalibration, slice_z_score
from klviewer.io.loader import open_paths
from klviewer.io.study import Catalog, Patient, Series, Study

if TYPE_CHECKING:
    from klviewer.inference.compare import Comparison

DEFAULT_SIZE = (1560, 960)
RESCORE_DELAY_MS = 150
"""Case-list scores follow the map sliders once they rest this long (every row is re-cut)."""


@dataclass
class OpenSeries:
    patient: Patient
    study: Study
    series: Series


class MainWindow(QMainWindow):
    analysis_finished = Signal(bool)
    """A run ended: True when every requested slice was analysed."""

    def __init__(self, prefs: Preferences, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("klviewerMainWindow")
        self.setWindowTitle("klviewer")
        self.setAcceptDrops(True)
        self.prefs = prefs
        self.notifier = Notifier(self)
        self.series: dict[str, OpenSeries] = {}
        self.current_uid: str | None = None
        self.index = 0
        self.results = ResultCache()
        self.cases = CaseList()
        self.thresholds = FlagThresholds()
        self.priors = PriorCache()
        self.thread: AnalysisThread | None = None
        self._run_ok = False
        self.align_dialog: AlignDialog | None = None
        self.compare_dialog: CompareDialog | None = None
        self.export_dialog: ExportDialog | None = None
        self.comparisons: list[ComparisonView] = []

        self.viewer = SliceViewer()
        self.viewer.graphics.setAcceptDrops(False)  # drops go to the window, which opens them
        self.setCentralWidget(self.viewer)
        self.browser = StudyBrowser()
        self.case_view = CaseListView(self.cases)
        self.panel = AnalysisPanel(prefs, self.notifier)
        self.map_controls = MapControls()
        self.prior_fit = PriorFitPanel(prefs, self.notifier, self.scope_for, self.analysis_settings)
        self._build_docks()
        self._build_menus()
        self._build_status()

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
        self.map_controls.changed.connect(self._map_changed)
        self.map_controls.changed.connect(self._refresh_comparisons)
        self.map_controls.opacity_changed.connect(self.viewer.overlay.set_opacity)
        self._restore()

    # ----- layout ----------------------------------------------------------------------------

    def _dock(self, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)  # saveState() needs names
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable | QDockWidget.DockWidgetFeature.DockWidgetFloatable
                         | QDockWidget.DockWidgetFeature.DockWidgetClosable)
        self.addDockWidget(area, dock)
        return dock

    def _build_docks(self) -> None:
        left, right = Qt.DockWidgetArea.LeftDockWidgetArea, Qt.DockWidgetArea.RightDockWidgetArea
        self.browser_dock = self._dock("Studies", "studiesDock", self.browser, left)
        self.cases_dock = self._dock("Case list", "casesDock", self.case_view, left)
        self.analysis_dock = self._dock("Analysis", "analysisDock", self.panel, right)
        self.map_dock = self._dock("KL map", "mapDock", self.map_controls, right)
        self.prior_fit_dock = self._dock("Prior fit", "priorFitDock", self.prior_fit, right)
        self.tabifyDockWidget(self.map_dock, self.prior_fit_dock)
        self.map_dock.raise_()
        self.resizeDocks([self.browser_dock, self.analysis_dock], [340, 340], Qt.Orientation.Horizontal)
        self.resizeDocks([self.browser_dock, self.cases_dock], [300, 480], Qt.Orientation.Vertical)
        self.resizeDocks([self.analysis_dock, self.map_dock], [self.panel.sizeHint().height(), 400],
                         Qt.Orientation.Vertical)

    def _action(self, text: str, slot, shortcut: QKeySequence | str | None = None) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(slot)
        return action

    def _build_menus(self) -> None:
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        file_menu.addAction(self._action("Open &file…", self._open_file_dialog, QKeySequence.StandardKey.Open))
        file_menu.addAction(self._action("Open f&older (or DICOMDIR folder)…", self._open_folder_dialog, "Ctrl+Shift+O"))
        self.recent_menu = file_menu.addMenu("Open &recent")
        file_menu.addAction(self._action("Open &demo study", self.open_demo))
        file_menu.addSeparator()
        file_menu.addAction(self._action("Save &screenshot…", self._screenshot_dialog))
        file_menu.addAction(self._action("&Export flagged…", self.open_export_dialog, "Ctrl+E"))
        file_menu.addSeparator()
        file_menu.addAction(self._action("&Quit", self.close, QKeySequence.StandardKey.Quit))

        view_menu = bar.addMenu("&View")
        for n, preset in enumerate(PRESETS):
            view_menu.addAction(self._action(f"{preset.name} window\t{n + 1}",
                                             lambda _=False, n=n: self.viewer.apply_preset(n)))
        view_menu.addSeparator()
        view_menu.addAction(self._action("KL overlay on/off\to",
                                         lambda: self.viewer.set_overlay_visible(not self.viewer.overlay.visible)))
        view_menu.addAction(self._action("Invert\ti", self.viewer.toggle_invert))
        view_menu.addAction(self._action("Reset view\tr", self.viewer.reset_view))
        view_menu.addSeparator()
        for dock in (self.browser_dock, self.cases_dock, self.analysis_dock, self.map_dock, self.prior_fit_dock):
            view_menu.addAction(dock.toggleViewAction())

        run_menu = bar.addMenu("&Analysis")
        run_menu.addAction(self._action("Run &slice", self.run_current_slice, "Ctrl+R"))
        run_menu.addAction(self._action("Run s&eries", self.run_series, "Ctrl+Shift+R"))
        run_menu.addAction(self._action("&Cancel", self.cancel_run, "Esc"))
        run_menu.addSeparator()
        run_menu.addAction(self._action("&Prior fit…", self.show_prior_fit))
        run_menu.addAction(self._action("&Align prior…", self.open_align_dialog))
        run_menu.addAction(self._action("C&ompare priors…", self.open_compare_dialog))

        help_menu = bar.addMenu("&Help")
        help_menu.addAction(self._action("&Keyboard shortcuts", self.show_shortcuts, QKeySequence.StandardKey.HelpContents))
        help_menu.addAction(self._action("&About klviewer", self.show_about))
        self._fill_recent()

    def _build_status(self) -> None:
        self.device_label = QLabel()
        self.prior_label = QLabel()
        self.statusBar().addPermanentWidget(self.prior_label)
        self.statusBar().addPermanentWidget(self.device_label)
        self._prior_changed()
        try:
            self.device_label.setText(f"Device: {resolve_device('auto').type.upper()}")
        except KlviewerError:
            self.device_label.setText("Device: CPU")

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        recent = self.prefs.recent()
        for path in recent:
            self.recent_menu.addAction(self._action(path, lambda _=False, p=path: self.open_paths([Path(p)])))
        if recent:
            self.recent_menu.addSeparator()
            self.recent_menu.addAction(self._action("Clear list", self._clear_recent))
        self.recent_menu.setEnabled(bool(recent))

    def _clear_recent(self) -> None:
        self.prefs.clear_recent()
        self._fill_recent()

    # ----- settings -------------------------------------------------------------------------

    def _restore(self) -> None:
        p = self.prefs
        d = MapSettings()
        self.map_controls.set_settings(MapSettings(
            patch=p.get("map/patch", d.patch),
            sigma_window=(p.get("map/sigma_low", d.sigma_window[0]), p.get("map/sigma_high", d.sigma_window[1])),
            threshold_fraction=p.get("map/threshold", d.threshold_fraction), opacity=p.get("map/opacity", d.opacity),
            show_z=p.get("map/show_z", d.show_z),
        ))
        self.viewer.overlay.set_opacity(self.map_controls.settings().opacity)
        geometry, state = p.get_bytes("window/geometry"), p.get_bytes("window/state")
        if geometry is None or not self.restoreGeometry(geometry):
            self.resize(*DEFAULT_SIZE)
        if state is not None:
            self.restoreState(state)

    def save_settings(self) -> None:
        p = self.prefs
        m = self.map_controls.settings()
        p.set("map/patch", m.patch)
        p.set("map/sigma_low", m.sigma_window[0])
        p.set("map/sigma_high", m.sigma_window[1])
        p.set("map/threshold", m.threshold_fraction)
        p.set("map/opacity", m.opacity)
        p.set("map/show_z", m.show_z)
        p.set("window/geometry", QByteArray(self.saveGeometry()))
        p.set("window/state", QByteArray(self.saveState()))
        self.panel.save()
        self.prior_fit.save()
        p.sync()

    # ----- opening data ---------------------------------------------------------------------

    def _open_file_dialog(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(
            self, "Open files", self.prefs.get("open/last_dir", ""),
            "Images (*.dcm *.DCM DICOMDIR *.npy *.npz *.json);;All files (*)")
        if files:
            self.prefs.set("open/last_dir", str(Path(files[0]).parent))
            self.open_paths([Path(f) for f in files])

    def _open_folder_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open folder", self.prefs.get("open/last_dir", ""))
        if folder:
            self.prefs.set("open/last_dir", folder)
            self.open_paths([Path(folder)])

    def open_demo(self) -> bool:
        from klviewer.demo import ensure_demo_study

        self.statusBar().showMessage("Preparing the demo study…")
        try:
            folder = ensure_demo_study()
        except (OSError, KlviewerError) as exc:
            self.notifier.error("Cannot create the demo study", str(exc))
            return False
        return self.open_paths([folder], remember=False)

    def open_paths(self, paths: list[Path], remember: bool = True) -> bool:
        """Open files/folders; every problem becomes a message, never an exception."""
        try:
            catalog = open_paths(paths)
        except KlviewerError as exc:
            self.notifier.error("Cannot open", str(exc))
            return False
        except Exception as exc:  # a reader bug must not close the app with the user's other studies
            self.notifier.error("Cannot open", f"{type(exc).__name__}: {exc}", traceback.format_exc())
            return False
        names = ", ".join(p.name or str(p) for p in paths)
        skipped = "\n".join(f"{s.path}: {s.reason}" for s in catalog.skipped)
        if not catalog.all_series():
            first = catalog.skipped[0].reason if catalog.skipped else "no files"
            self.notifier.error("No images found", f"Nothing in {names} could be loaded ({first}).", skipped)
            return False
        if remember:
            for path in paths:
                self.prefs.add_recent(path)
            self._fill_recent()
        added = self._register(catalog)
        if catalog.skipped:
            self.notifier.warning("Some files were skipped",
                                  f"{len(catalog.skipped)} file(s) in {names} could not be read; see details.", skipped)
        first_uid = added[0] if added else catalog.all_series()[0].uid
        self.browser.select_series(first_uid)
        self.show_series(first_uid)
        self.viewer.setFocus()
        return True

    def _register(self, catalog: Catalog) -> list[str]:
        added = []
        for patient in catalog.patients:
            for study in patient.studies:
                for series in study.series:
                    if series.uid not in self.series:
                        self.series[series.uid] = OpenSeries(patient, study, series)
                        added.append(series.uid)
        self.browser.add_patients(catalog.patients)
        return added

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802
        paths = [Path(url.toLocalFile()) for url in event.mimeData().urls() if url.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self.open_paths(paths)

    # ----- navigation -----------------------------------------------------------------------

    @property
    def current(self) -> OpenSeries | None:
        return self.series.get(self.current_uid) if self.current_uid else None

    def show_series(self, uid: str, index: int | None = None) -> None:
        entry = self.series.get(uid)
        if entry is None:
            return
        new = uid != self.current_uid
        self.current_uid = uid
        self.index = index if index is not None else (entry.series.n_slices // 2 if new else self.index)
        self.index = min(max(self.index, 0), max(entry.series.n_slices - 1, 0))
        self.browser.select_series(uid)
        self._show_current(reset=new)
        refusal = entry.series.analysis_refusal()
        self.setWindowTitle(f"klviewer — {entry.series.description or uid}")
        if refusal:
            self.statusBar().showMessage(f"View only: {refusal}", 10_000)

    def set_slice(self, index: int) -> None:
        entry = self.current
        if entry is None:
            return
        index = min(max(index, 0), entry.series.n_slices - 1)
        if index != self.index:
            self.index = index
            self._show_current()

    def current_result(self) -> CachedResult | None:
        return self.results.latest(self.current_uid, self.index) if self.current_uid else None

    def _show_current(self, reset: bool = False) -> None:
        entry = self.current
        if entry is None:
            self.viewer.clear()
            return
        cached = self.current_result()
        result = cached.result if cached else None
        self.viewer.show_slice(SliceContext(
            series=entry.series, index=self.index, patient=patient_label(entry.patient), study=study_label(entry.study),
            result=result, prior_name=result.prior_name if result else self.panel.prior_name(),
        ), reset=reset)
        self._update_map_ranges(entry.series, cached)
        self.refresh_overlay()

    def _update_map_ranges(self, series: Series, cached: CachedResult | None) -> None:
        if cached is not None:
            anchors = [v for window in self.thresholds.calibrated_windows(cached.prior_path) for v in window]
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

    def _threshold(self, cached: CachedResult, settings: MapSettings) -> float | None:
        patch = settings.clamped(cached.result.energy.image_shape).patch
        return self.thresholds.threshold(cached.prior_path, cached.result.settings, patch, settings.sigma_window)

    def _z(self, cached: CachedResult, settings: MapSettings) -> tuple[ZCalibration, np.ndarray] | None:
        """The prior's healthy reference for these map settings, with the slice's reconstruction."""
        clamped = settings.clamped(cached.result.energy.image_shape)
        z = self.thresholds.z_calibration(cached.prior_path, cached.result.settings, clamped.patch, clamped.sigma_window)
        return None if z is None else (z, cached.result.recon_hu)

    def refresh_overlay(self) -> None:
        """Re-cut the shown slice's KL map from its energy field with the slider settings."""
        self._map_timer.stop()
        cached = self.current_result()
        if cached is None:
            self.viewer.set_overlay(None)
            self.map_controls.set_display_threshold(None)
            return
        settings = self.map_controls.settings()
        z = self._z(cached, settings)
        frame = overlay_frame(cached.result.energy, settings, self._threshold(cached, settings), z)
        self.viewer.set_overlay(frame)
        self.map_controls.set_z_available(z is not None)
        self.map_controls.set_display_threshold(frame.display_threshold, "z" if frame.shows_z else "nats")
        row = self.cases.find(self.current_uid, self.index)
        if row is not None:
            self.cases.set_score(row, frame.score, frame.flagged, frame.z_score)

    def _score(self, cached: CachedResult, settings: MapSettings) -> tuple[float, bool, float | None]:
        """A slice's score, automatic flag and KL z-score (None without a reference) under the map settings."""
        clamped = settings.clamped(cached.result.energy.image_shape)
        score = cached.result.energy.kl_map(clamped.patch, clamped.sigma_window).score
        z = self._z(cached, settings)
        if z is None:
            return score, is_flagged(score, self._threshold(cached, settings), None, None), None
        calibration, recon_hu = z
        z_score = slice_z_score(calibration.reference.z_map(cached.result.energy, recon_hu))
        return score, is_flagged(score, None, z_score, calibration.threshold), z_score

    def rescore_cases(self) -> None:
        """Scores and automatic flags of every listed slice, under the current map settings."""
        self._rescore_timer.stop()
        settings = self.map_controls.settings()
        for row, entry in enumerate(list(self.cases.entries)):
            cached = self.results.latest(entry.series_uid, entry.slice_index)
            if cached is not None:
                self.cases.set_score(row, *self._score(cached, settings))

    # ----- running the analysis -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.thread is not None

    def run_current_slice(self) -> bool:
        return self._start_run([self.index], "this slice")

    def run_series(self) -> bool:
        entry = self.current
        return self._start_run(list(range(entry.series.n_slices)) if entry else [], "the series")

    def _start_run(self, indices: list[int], what: str) -> bool:
        """Start a background run; False (with a message saying why) when it cannot start."""
        entry = self.current
        if self.running:
            self.notifier.info("Analysis already running", "Wait for it to finish or cancel it first.")
            return False
        if entry is None:
            self.notifier.error("Nothing to analyse", "Open a study first (File → Open, or the demo study).")
            return False
        refusal = entry.series.analysis_refusal()
        if refusal:
            self.notifier.error("Cannot analyse this series", f"'{entry.series.description or entry.series.uid}': {refusal}.")
            return False
        prior_path = self.panel.prior_path()
        if prior_path is None or not prior_path.is_dir():
            self.notifier.error("No prior", f"The prior folder {prior_path or ''} is not there; add a prior folder "
                                            "in the Analysis panel.")
            return False
        settings = self.panel.settings(self.map_controls.settings())
        try:
            resolve_device(settings.device)
        except KlviewerError as exc:
            self.notifier.error("Device not available", str(exc))
            return False
        self.panel.save()
        todo = []
        for index in indices:
            key = ResultKey.of(entry.series.uid, index, prior_path, settings)
            hit = self.results.get(key)
            if hit is None:
                todo.append(index)
            else:
                self.results.put(key, hit.result, prior_path)  # makes it the slice's latest again
        if not todo:
            self._show_current()
            self.statusBar().showMessage("Shown from the results of this session (same settings).", 5_000)
            self.analysis_finished.emit(True)
            return True
        self.thread = AnalysisThread(RunRequest(entry.series, tuple(todo), prior_path, settings), self.priors, self)
        self.thread.progress.connect(self.panel.show_progress)
        self.thread.slice_done.connect(self._slice_done)
        self.thread.failed.connect(self._run_failed)
        self.thread.cancelled.connect(self._run_cancelled)
        self.thread.finished.connect(self._run_finished)
        self._run_ok = True
        count = f"{len(todo)} slices" if len(todo) > 1 else f"slice {todo[0] + 1}"
        self.panel.set_running(True, f"Analysing {count} with {prior_path.name}…")
        self.statusBar().showMessage(f"Analysing {what}…")
        self.thread.start()
        return True

    def cancel_run(self) -> None:
        if self.thread is not None:
            self.thread.cancel()
            self.panel.eta.setText("Cancelling…")

    def _slice_done(self, request: RunRequest, index: int, result: SliceResult) -> None:
        key = ResultKey.of(request.series.uid, index, request.prior_path, request.settings)
        self.results.put(key, result, request.prior_path)
        entry = self.series.get(request.series.uid)
        score, flagged, z_score = self._score(CachedResult(result, request.prior_path), self.map_controls.settings())
        self.cases.upsert(CaseEntry(
            series_uid=request.series.uid, slice_index=index, patient=patient_label(entry.patient) if entry else "",
            series=request.series.description or request.series.uid, score=score, auto_flagged=flagged,
            prior=result.prior_name, z_score=z_score,
        ))
        if request.series.uid == self.current_uid and index == self.index:
            self._show_current()
        self._show_summary(result)

    def _show_summary(self, result: SliceResult) -> None:
        notes = "".join(f"<br>• {n}" for n in result.notes)
        if result.flag_rule == "z":
            verdict = (f"KL z-score {result.z_score:.3g}, {'flagged' if result.flagged else 'not flagged'} "
                       f"(healthy-reference threshold {result.z_threshold:.3g})")
        else:
            threshold = f"{format_nats(result.flag_threshold)} nats" if result.flag_threshold is not None else "not calibrated"
            verdict = f"{'flagged' if result.flagged else 'not flagged'} (threshold {threshold})"
        self.panel.summary.setText(
            f"Last slice: score {format_nats(result.score)} nats at the run's settings, {verdict}, "
            f"{result.seconds:.1f} s.{notes}")

    def _run_failed(self, message: str, details: str) -> None:
        self._run_ok = False
        self.notifier.error("Analysis failed", message, details)

    def _run_cancelled(self) -> None:
        self._run_ok = False
        self.notifier.status("Analysis cancelled", "results of the slices already finished are kept")

    def _run_finished(self) -> None:
        thread, self.thread = self.thread, None
        if thread is not None:
            thread.deleteLater()
        self.panel.set_running(False)
        self.panel.show_idle("Done" if self._run_ok else "Stopped", complete=self._run_ok)
        if self._run_ok:
            self.statusBar().showMessage("Analysis finished.", 5_000)
        self.analysis_finished.emit(self._run_ok)

    def stop_run(self) -> None:
        """Cancel a run and join its thread (used on close)."""
        thread, self.thread = self.thread, None
        if thread is not None:
            thread.stop_and_discard(thread.progress, thread.slice_done, thread.failed, thread.cancelled, thread.finished)

    # ----- priors: fit, alignment, comparison ------------------------------------------------

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

    def open_align_dialog(self) -> AlignDialog:
        if self.align_dialog is None:
            self.align_dialog = AlignDialog(self.prefs, self.notifier, self.scope_for, self.analysis_settings, self)
            self.align_dialog.aligned.connect(self._aligned)
            self.align_dialog.compare_requested.connect(self._compare_aligned)
        base = self.panel.prior_path()
        if base is not None and not self.align_dialog.slot.running:
            self.align_dialog.set_base(base)
        self.align_dialog.show()
        self.align_dialog.raise_()
        return self.align_dialog

    def open_compare_dialog(self) -> CompareDialog:
        if self.compare_dialog is None:
            self.compare_dialog = CompareDialog(self.prefs, self.notifier, self.scope_for, self.analysis_settings, self)
            self.compare_dialog.comparison_ready.connect(self.show_comparison)
        self.compare_dialog.show()
        self.compare_dialog.raise_()
        return self.compare_dialog

    def _aligned(self, done: AlignDone) -> None:
        """Offer the new prior in every picker; the analysis keeps the prior it had."""
        keep = self.panel.prior_path()
        if self.panel.add_prior_folder(done.aligned) and keep is not None:
            self.panel.prior_combo.setCurrentIndex(max(self.panel.prior_combo.findData(str(keep)), 0))
        self.notifier.status("Alignment finished", f"{done.aligned.name} (aligned from {done.base.name} on "
                                                   f"{done.scope.label}) is now offered in every prior picker")

    def _compare_aligned(self, done: AlignDone) -> None:
        dialog = self.open_compare_dialog()
        dialog.set_priors(done.base, done.aligned.resolve())

    def show_comparison(self, comparison: Comparison) -> ComparisonView | None:
        """Open a comparison window (non-modal; the app keeps working beside it)."""
        try:
            view = ComparisonView(comparison, self.notifier, self.map_controls.settings, self)
        except KlviewerError as exc:
            self.notifier.error("Nothing to compare", str(exc))
            return None
        self.comparisons.append(view)
        view.closed.connect(lambda v=view: self.comparisons.remove(v) if v in self.comparisons else None)
        view.show()
        view.raise_()
        return view

    def _refresh_comparisons(self) -> None:
        for view in self.comparisons:
            view.refresh_overlays()

    # ----- export ---------------------------------------------------------------------------

    def session_snapshot(self) -> SessionSnapshot:
        """Every slice in the case list with its latest result, flag and note, as shown now."""
        settings = self.map_controls.settings()
        slices = []
        for entry in self.cases.entries:
            cached = self.results.latest(entry.series_uid, entry.slice_index)
            opened = self.series.get(entry.series_uid)
            if cached is None or opened is None:
                continue
            slices.append(SessionSlice(opened.series, entry.slice_index, cached.result, cached.prior_path,
                                       entry.flagged, self._threshold(cached, settings), entry.note))
        return SessionSnapshot(slices, settings)

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
        for dialog in (self.align_dialog, self.compare_dialog):
            if dialog is not None:
                dialog.refresh_priors()
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

    def _screenshot_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save screenshot", "klviewer.png", "PNG image (*.png)")
        if path:
            self.save_screenshot(Path(path))

    def save_screenshot(self, path: Path) -> bool:
        if not self.grab().save(str(path)):
            self.notifier.error("Cannot save screenshot", f"{path} could not be written.")
            return False
        return True

    def task_slots(self) -> list[TaskSlot]:
        dialogs = (self.align_dialog, self.compare_dialog, self.export_dialog)
        return [self.prior_fit.slot] + [d.slot for d in dialogs if d is not None]

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        self.stop_run()
        for slot in self.task_slots():
            slot.stop()
        for view in list(self.comparisons):
            view.close()
        self.save_settings()
        self.case_view.model.detach()
        super().closeEvent(event)
