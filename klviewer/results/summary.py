"""The results folder's tables: one row per analysed slice, in `summary.json` and `summary.csv`.

Layout of a results folder (the analysis contract):
    DIR/summary.json         run settings, prior, thresholds, the flag rule, and one row per slice
    DIR/summary.csv          the same rows as a table
    DIR/<case>/<slice>.npz   per-slice arrays (see `klviewer.results.slice_file`)
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from klviewer import __version__
from klviewer.inference.escalation import EscalationRule
from klviewer.inference.prior_fit import judge, study_prior_fit
from klviewer.inference.result import SliceResult
from klviewer.inference.scoring import flag_rule
from klviewer.inference.settings import AnalysisSettings
from klviewer.inference.verdict_text import rule_text
from klviewer.io.safe_write import atomic_write_text

CSV_COLUMNS = [
    "input", "case", "slice_index", "score", "total_kl", "flagged", "z_score", "views", "dose_i0", "noise_sigma",
    "steps", "samples", "guidance", "patch", "sigma_lo", "sigma_hi", "seed", "prior", "seconds", "file",
    "source_kind", "series_uid", "source_file", "sop_instance_uid", "verdict", "prior_fit", "prior_fit_score",
    "geometry_warnings", "escalated", "z_threshold",
]


@dataclass
class AnalysisRun:
    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    flag_rule: str | None = None
    """The rule the rows were flagged by ("z", "nats" or None: nothing could be flagged), once the summary is written."""
    rule_text: str = ""
    """That rule in words, with its threshold (klviewer.inference.verdict_text.rule_text)."""


def summary_row(source: str, case: str, index: int, result: SliceResult, file: Path) -> dict[str, Any]:
    """One slice's row; `escalated` says whether a two-stage run gave it stage 2's chains (None: one stage)."""
    s = result.settings
    lo, hi = result.kl_map.sigma_window
    return {
        "input": source, "case": case, "slice_index": index, "score": round(result.score, 6),
        "total_kl": round(result.total_kl, 6), "flagged": result.flagged,
        "z_score": None if result.z_score is None else round(result.z_score, 6),
        "views": s.views,
        "dose_i0": s.dose_i0, "noise_sigma": s.noise_sigma, "steps": s.steps, "samples": s.samples,
        "guidance": s.guidance, "patch": result.kl_map.patch, "sigma_lo": lo, "sigma_hi": hi, "seed": s.seed,
        "prior": result.prior_name, "seconds": round(result.seconds, 3), "file": str(file),
        "verdict": result.verdict().status,
        "prior_fit": "uncalibrated" if result.prior_fit is None else result.prior_fit.verdict,
        "prior_fit_score": None if result.prior_fit_score is None else round(result.prior_fit_score, 6),
        "geometry_warnings": "; ".join(result.geometry_warnings),
        "escalated": None if result.stage is None else result.stage.escalated,
        "z_threshold": result.z_threshold,
    }


def case_prior_fits(rows: list[dict[str, Any]], threshold: float | None) -> dict[str, dict[str, Any]]:
    """Each case's (study's) prior-fit verdict from its slices' scores (`study_prior_fit`); none without a threshold."""
    scores: dict[str, list[float]] = {}
    for row in rows:
        if row.get("prior_fit_score") is not None:
            scores.setdefault(row["case"], []).append(float(row["prior_fit_score"]))
    if threshold is None:
        return {}
    return {case: study_prior_fit([judge(v, threshold) for v in values]).to_dict() for case, values in scores.items()}


def write_summary(run: AnalysisRun, settings: AnalysisSettings, prior_path: Path, fingerprint: str,
                  threshold: float | None, overwrite: bool, z_threshold: float | None = None,
                  prior_fit_threshold: float | None = None, escalation: EscalationRule | None = None) -> None:
    """Write summary.json and summary.csv. With `escalation` the thresholds given are stage 2's, and the rule
    names both stages."""
    run.flag_rule = flag_rule(threshold, z_threshold, settings.flag_threshold)
    run.rule_text = (rule_text(run.flag_rule, threshold, z_threshold, settings.flag_threshold is not None)
                     if escalation is None else escalation.describe())
    summary = {
        "klviewer_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prior": {"name": prior_path.name, "path": str(prior_path), "sha256": fingerprint},
        "settings": settings.to_dict(),
        "flag_threshold": threshold,
        "z_threshold": z_threshold,
        "flag_rule": run.flag_rule,
        "prior_fit_threshold": prior_fit_threshold,
        "escalation": None if escalation is None else escalation.to_dict(),
        "cases": case_prior_fits(run.rows, prior_fit_threshold),
        "rows": run.rows,
        "skipped": run.skipped,
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(run.rows)
    atomic_write_text(run.out / "summary.csv", buffer.getvalue(), overwrite=overwrite)
    atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=2), overwrite=overwrite)
