"""Writing the session's in-memory results as `klviewer analyze` results folders, so export can read them.

No Qt here. The app keeps results in memory only; export reads the analysis contract's
layout (summary.json, summary.csv, <case>/<slice>.npz). Each slice is written as the user
sees it: its KL map re-cut with the map sliders' patch and sigma window, and its flag as the
case list has it (automatic or set by hand). Slices analysed with different priors or
sampling settings go to separate folders, because a summary records one prior and one set
of settings; the slices of one two-stage run go to one folder, which records the escalation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from klviewer.app.display import MapSettings
from klviewer.app.session import run_of, run_sampling_key
from klviewer.errors import KlviewerError
from klviewer.inference.calibration import PriorCalibration
from klviewer.inference.escalation import escalation_rule
from klviewer.inference.plan import PlannedSeries, case_name
from klviewer.inference.result import SliceResult, recut
from klviewer.inference.verdict_text import slice_label
from klviewer.io.study import Series
from klviewer.priors.checkpoint import prior_fingerprint
from klviewer.results.slice_file import write_slice_npz
from klviewer.results.summary import AnalysisRun, summary_row, write_summary


@dataclass
class SessionSlice:
    series: Series
    index: int
    result: SliceResult
    prior_path: Path
    flagged: bool
    flag_threshold: float | None
    note: str = ""
    measurements: list[str] = field(default_factory=list)
    """What the distances and ROIs drawn on the slice read."""


@dataclass
class SessionFolder:
    """One written results folder: the slices that share a prior and sampling settings."""

    path: Path
    prior: str
    notes: dict[str, str] = field(default_factory=dict)
    """Case name -> the case list's notes of its slices, for the PDF report."""
    measurements: dict[str, list[str]] = field(default_factory=dict)
    """Case name -> the measurements drawn on its slices, one line each, for the PDF report."""


def as_shown(result: SliceResult, settings: MapSettings, flagged: bool, threshold: float | None) -> SliceResult:
    """The result with the KL map, score and flag the app shows under the map settings.

    The KL z-scores stay only while the map settings are those their healthy reference was
    fitted for; under any other patch or window there is no reference to compare with."""
    clamped = settings.clamped(result.energy.image_shape)
    shown = recut(result, replace(result.settings, patch=clamped.patch, sigma_window=tuple(clamped.sigma_window)))
    return replace(shown, flagged=flagged, flag_threshold=threshold)


def write_session_results(slices: list[SessionSlice], out: Path, settings: MapSettings) -> list[SessionFolder]:
    """Write `slices` under `out` (one folder per prior and sampling settings); returns the folders."""
    if not slices:
        raise KlviewerError("no analysed slices in this session: run the analysis first")
    groups: dict[tuple, list[SessionSlice]] = {}
    for item in slices:
        groups.setdefault((str(item.prior_path), run_sampling_key(*run_of(item.result))), []).append(item)
    folders = []
    for n, members in enumerate(groups.values(), start=1):
        prior = members[0].prior_path.name
        target = out if len(groups) == 1 else out / f"{n:02d}-{_safe(prior)}"
        folders.append(_write_group(members, target, settings))
    return folders


def _write_group(members: list[SessionSlice], out: Path, settings: MapSettings) -> SessionFolder:
    prior_path = members[0].prior_path
    folder = SessionFolder(out, prior_path.name)
    planned: dict[str, PlannedSeries] = {}
    taken: set[str] = set()
    run = AnalysisRun(out=out)
    case_notes: dict[str, list[str]] = {}
    summary_settings = None
    z_thresholds: set[float | None] = set()
    for item in sorted(members, key=lambda m: (m.series.uid, m.index)):
        plan = planned.get(item.series.uid)
        if plan is None:
            source = str(item.series.files[0] if item.series.files else item.series.uid)
            plan = planned[item.series.uid] = PlannedSeries(item.series, case_name(item.series, taken), source, [])
        plan.indices.append(item.index)
        shown = as_shown(item.result, settings, item.flagged, item.flag_threshold)
        summary_settings = summary_settings or shown.settings
        z_thresholds.add(shown.z_threshold)
        target = out / plan.case / f"{item.index:04d}.npz"
        write_slice_npz(shown, target)
        row = summary_row(plan.source, plan.case, item.index, shown, target.relative_to(out))
        row.update(plan.slice_source(item.index))
        run.rows.append(row)
        if item.note.strip():
            case_notes.setdefault(plan.case, []).append(f"{slice_label(item.index)}: {item.note.strip()}")
        for line in item.measurements:
            folder.measurements.setdefault(plan.case, []).append(f"{slice_label(item.index)}: {line}")
    z_thresholds.discard(None)
    fit_threshold = next((m.result.prior_fit.threshold for m in members if m.result.prior_fit is not None), None)
    stage = members[0].result.stage
    if stage is not None and z_thresholds:
        # Two stages, shown at the map they were judged at: stage 2's thresholds decide the flags, as in `analyze`.
        rule = escalation_rule(PriorCalibration.read(prior_path), stage.stage1(members[0].result.settings),
                               stage.escalation)
        write_summary(run, replace(summary_settings, samples=stage.stage1_samples), prior_path,
                      prior_fingerprint(prior_path), rule.stage2_nats, False, rule.stage2_z.threshold,
                      rule.stage2_prior_fit, rule)
    else:
        write_summary(run, summary_settings, prior_path, prior_fingerprint(prior_path), members[0].flag_threshold,
                      False, z_thresholds.pop() if len(z_thresholds) == 1 else None, fit_threshold)
    folder.notes = {case: "; ".join(lines) for case, lines in case_notes.items()}
    return folder


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "prior"
