"""The app's state without Qt, in the manner of napari's ViewerModel: the open series, the shown slice, the
session's results, the case list and every slice's verdict under the map sliders.

`MainWindow` wires widgets to this model and re-draws from it; tests drive it without a window.
Verdicts come from `klviewer.inference.scoring.score_slice`, as in `klviewer analyze`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from klviewer.app.cases import CaseEntry, CaseList
from klviewer.app.display import MapSettings, patient_label, series_label
from klviewer.app.measurements import Measurement
from klviewer.app.session import CachedResult, FlagThresholds, ResultCache, ResultKey
from klviewer.app.session_results import SessionSlice
from klviewer.devices import resolve_device
from klviewer.errors import KlviewerError
from klviewer.evaluation.adapt import patient_key
from klviewer.inference.escalation import Escalation, escalation_rule
from klviewer.inference.result import SliceResult
from klviewer.inference.scoring import FLAGGED, SliceScore, score_slice
from klviewer.inference.settings import AnalysisSettings
from klviewer.inference.verdict_text import score_verdict
from klviewer.io.study import Catalog, Patient, Series, Study


@dataclass
class OpenSeries:
    patient: Patient
    study: Study
    series: Series


class SessionModel:
    """Everything the session knows: open series, where the viewer is, results, the case list, calibrations."""

    def __init__(self) -> None:
        self.series: dict[str, OpenSeries] = {}
        self.current_uid: str | None = None
        self.index = 0
        self.results = ResultCache()
        self.cases = CaseList()
        self.calibrations = FlagThresholds()
        self.measurements: list[Measurement] = []
        """Distances and ROIs drawn on slices (see klviewer.app.measurements)."""
        self.saved_handwork: str | None = None
        """Flags, notes and measurements as last saved or opened (see klviewer.app.session_file)."""

    # ----- open series and the shown slice -------------------------------------------------------

    def register(self, catalog: Catalog) -> list[str]:
        """Add the catalog's series that are not open yet; returns their uids."""
        added = []
        for patient in catalog.patients:
            for study in patient.studies:
                for series in study.series:
                    if series.uid not in self.series:
                        self.series[series.uid] = OpenSeries(patient, study, series)
                        added.append(series.uid)
        return added

    def patient_series(self) -> list[tuple[str, Series]]:
        """Every open image series that can be analysed, with its patient (PatientID, else the study): what a
        site adaptation trains and calibrates on."""
        return [(patient_key(e.patient.patient_id, e.study.uid), e.series) for e in self.series.values()
                if e.series.analysis_refusal() is None and e.series.slices]

    @property
    def current(self) -> OpenSeries | None:
        return self.series.get(self.current_uid) if self.current_uid else None

    def show(self, uid: str, index: int | None = None) -> bool:
        """Show series `uid` at `index` (a newly shown series opens at its middle slice); True when the series changed."""
        entry = self.series[uid]
        new = uid != self.current_uid
        self.current_uid = uid
        wanted = index if index is not None else (entry.series.n_slices // 2 if new else self.index)
        self.index = min(max(wanted, 0), max(entry.series.n_slices - 1, 0))
        return new

    def set_slice(self, index: int) -> bool:
        """Move to `index` (kept in range); True when the shown slice changed."""
        entry = self.current
        if entry is None:
            return False
        index = min(max(index, 0), entry.series.n_slices - 1)
        changed = index != self.index
        self.index = index
        return changed

    def current_result(self) -> CachedResult | None:
        return self.results.latest(self.current_uid, self.index) if self.current_uid else None

    def run_refusal(self, prior_path: Path | None, settings: AnalysisSettings,
                    escalation: Escalation | None = None) -> tuple[str, str] | None:
        """Why the shown slice cannot be analysed with this prior and settings (a title and a message), or None."""
        entry = self.current
        if entry is None:
            return "Nothing to analyse", "Open a study first (File → Open, or the demo study)."
        refusal = entry.series.analysis_refusal()
        if refusal:
            return "Cannot analyse this series", f"'{entry.series.description or entry.series.uid}': {refusal}."
        if prior_path is None or not prior_path.is_dir():
            return "No prior", f"The prior folder {prior_path or ''} is not there; add a prior folder in the Analysis panel."
        try:
            resolve_device(settings.device)
        except KlviewerError as exc:
            return "Device not available", str(exc)
        if escalation is not None:
            try:
                escalation_rule(self.calibrations.calibration(prior_path), settings, escalation)
            except KlviewerError as exc:
                return "Cannot run two stages", str(exc)
        return None

    # ----- results and verdicts --------------------------------------------------------------------

    def unanalysed(self, uid: str, indices: list[int], prior_path: Path, settings: AnalysisSettings,
                   escalation: Escalation | None = None) -> list[int]:
        """The slices among `indices` without a result for these settings; the others become their slice's latest again."""
        todo = []
        for index in indices:
            key = ResultKey.of(uid, index, prior_path, settings, escalation)
            hit = self.results.get(key)
            if hit is None:
                todo.append(index)
            else:
                self.results.put(key, hit.result, prior_path)
        return todo

    def score(self, cached: CachedResult, map_settings: MapSettings) -> SliceScore:
        """A slice's KL map, KL z-scores and verdict under the map sliders, by the prior's calibration for them."""
        result = cached.result
        m = map_settings.clamped(result.energy.image_shape)
        s = result.settings
        z_calibration = self.calibrations.z_calibration(cached.prior_path, s, m.patch, m.sigma_window)
        if z_calibration is not None and result.stage is not None and result.stage.decides(m.patch, m.sigma_window):
            # a two-stage run's slice that stayed at stage 1: the escalation threshold decided it
            z_calibration = replace(z_calibration, threshold=result.stage.threshold)
        return score_slice(
            result.energy, result.recon_hu, m.patch, m.sigma_window,
            nats_threshold=self.calibrations.threshold(cached.prior_path, s, m.patch, m.sigma_window),
            z_calibration=z_calibration, forced_nats=s.flag_threshold,
        )

    def calibrated_maps(self, cached: CachedResult) -> list[tuple[int, tuple[float, float]]]:
        """The (patch, sigma window) pairs the result's prior was calibrated with for its sampling settings."""
        return self.calibrations.calibrated_maps(cached.prior_path, cached.result.settings)

    def add_result(self, series_uid: str, index: int, prior_path: Path, settings: AnalysisSettings,
                   result: SliceResult, map_settings: MapSettings, escalation: Escalation | None = None) -> None:
        """Keep a finished slice (of a run with `settings` and `escalation`) and list it with its verdict under the
        map sliders."""
        self.results.put(ResultKey.of(series_uid, index, prior_path, settings, escalation), result, prior_path)
        scored = self.score(CachedResult(result, prior_path), map_settings)
        verdict = score_verdict(scored, result.prior_fit)
        entry = self.series.get(series_uid)
        series = entry.series if entry else None
        self.cases.upsert(CaseEntry(
            series_uid=series_uid, slice_index=index,
            patient=(entry.patient.patient_id or patient_label(entry.patient)) if entry else "",
            series=series_label(series) if series else series_uid, score=scored.score,
            auto_flagged=verdict.status == FLAGGED, prior=result.prior_name, z_score=scored.z_score,
            verdict=verdict.status, rule=verdict.rule_text,
        ))

    def update_case(self, uid: str, index: int, scored: SliceScore) -> None:
        """The listed slice's verdict under the map sliders (its prior fit does not depend on them)."""
        row = self.cases.find(uid, index)
        cached = self.results.latest(uid, index)
        if row is not None and cached is not None:
            verdict = score_verdict(scored, cached.result.prior_fit)
            self.cases.set_score(row, scored.score, verdict.status == FLAGGED, scored.z_score, verdict.status,
                                 verdict.rule_text)

    def rescore(self, map_settings: MapSettings) -> None:
        """Scores and automatic flags of every listed slice, under the map sliders."""
        for entry in list(self.cases.entries):
            cached = self.results.latest(entry.series_uid, entry.slice_index)
            if cached is not None:
                self.update_case(entry.series_uid, entry.slice_index, self.score(cached, map_settings))

    def snapshot(self, map_settings: MapSettings) -> list[SessionSlice]:
        """Every listed slice with its latest result, flag and note, as shown now (what export writes)."""
        slices = []
        for entry in self.cases.entries:
            cached = self.results.latest(entry.series_uid, entry.slice_index)
            opened = self.series.get(entry.series_uid)
            if cached is None or opened is None:
                continue
            threshold = self.score(cached, map_settings).nats_threshold
            drawn = [m.text for m in self.measurements if (m.series_uid, m.slice_index) == entry.key and m.text]
            slices.append(SessionSlice(opened.series, entry.slice_index, cached.result, cached.prior_path,
                                       entry.flagged, threshold, entry.note, drawn))
        return slices
