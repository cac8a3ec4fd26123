"""`klviewer analyze`: analyse every requested slice of every input and write the results folder.

Layout of DIR (the analysis contract):
    DIR/summary.json         run settings, prior, and one row per slice
    DIR/summary.csv          the same rows as a table
    DIR/<case>/<slice>.npz   per-slice arrays (see SliceResult.save_npz)
"""

from __future__ import annotations

import csv
import io
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from klviewer import __version__
from klviewer.devices import resolve_device
from klviewer.errors import KlviewerInputError
from klviewer.inference.analysis import AnalysisSettings, SliceResult, analyze_prepared, flag_rule, prepare_slice
from klviewer.inference.calibration import flag_threshold_for, z_calibration_for
from klviewer.inference.healthy_reference import ZCalibration
from klviewer.inference.measurements import SeriesPlan, plan_series
from klviewer.io.loader import open_images
from klviewer.io.safe_write import OutputExistsError, atomic_write_text
from klviewer.priors.checkpoint import DEFAULT_PRIOR, load_prior, prior_fingerprint, resolve_prior_path

CSV_COLUMNS = [
    "input", "case", "slice_index", "score", "total_kl", "flagged", "z_score", "views", "dose_i0", "noise_sigma",
    "steps", "samples", "guidance", "patch", "sigma_lo", "sigma_hi", "seed", "prior", "seconds", "file",
    "source_kind", "series_uid", "source_file", "sop_instance_uid",
]


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_output_folder(out: Path, inputs: Sequence[str | Path]) -> None:
    """Results never go into (or over) an input folder."""
    for raw in inputs:
        src = Path(raw)
        folder = src if src.is_dir() else src.parent
        if _inside(out, folder) or (src.is_dir() and _inside(folder, out)):
            raise KlviewerInputError(out, f"output folder overlaps the input {src}; choose a folder outside the inputs")


@dataclass
class AnalysisRun:
    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class LoadedPrior:
    """A prior loaded once, with what every results folder records about it."""

    path: Path
    model: Any
    device: torch.device
    threshold: float | None
    fingerprint: str
    z_calibration: ZCalibration | None = None

    @classmethod
    def load(cls, prior: str | Path, settings: AnalysisSettings) -> "LoadedPrior":
        device = resolve_device(settings.device)
        path = resolve_prior_path(prior)
        return cls(path, load_prior(path, device=device), device, flag_threshold_for(path, settings), prior_fingerprint(path),
                   z_calibration_for(path, settings))


def run_analysis(
    inputs: Sequence[str | Path],
    out: str | Path,
    settings: AnalysisSettings,
    *,
    prior: str | Path = DEFAULT_PRIOR,
    slices: str = "all",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    on_slice: Callable[[dict[str, Any], SliceResult], None] | None = None,
) -> AnalysisRun:
    """Analyse inputs and write the results folder; returns the summary rows."""
    out = Path(out)
    check_output_folder(out, inputs)
    if (out / "summary.json").exists() and not overwrite:
        raise OutputExistsError(out / "summary.json")
    loaded = LoadedPrior.load(prior, settings)
    plan = plan_series(open_images(inputs), slices)
    return analyze_plan(plan, out, settings, loaded, overwrite=overwrite, progress=progress, cancel=cancel,
                        on_slice=on_slice)


def analyze_plan(
    plan: SeriesPlan,
    out: Path,
    settings: AnalysisSettings,
    loaded: LoadedPrior,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    on_slice: Callable[[dict[str, Any], SliceResult], None] | None = None,
) -> AnalysisRun:
    """Analyse every planned slice with an already loaded prior and write the results folder `out`.

    `progress(done, total)` counts sampler steps over the whole plan.
    """
    run = AnalysisRun(out=out, skipped=plan.skipped)
    steps_per_slice = settings.steps * settings.samples
    total = steps_per_slice * plan.n_slices
    done_before = 0
    for planned in plan.series:
        for index in planned.indices:
            prepared = prepare_slice(planned.series, index, loaded.model, settings, loaded.device)
            base = done_before

            def slice_progress(done: int, _total: int, base: int = base) -> None:
                if progress is not None:
                    progress(base + done, total)

            result = analyze_prepared(prepared, loaded.model, settings, prior_name=loaded.path.name,
                                      flag_threshold=loaded.threshold, z_calibration=loaded.z_calibration,
                                      progress=slice_progress, cancel=cancel)
            done_before += steps_per_slice
            target = out / planned.case / f"{index:04d}.npz"
            result.save_npz(target, overwrite=overwrite)
            row = summary_row(planned.source, planned.case, index, result, target.relative_to(out))
            row.update(planned.slice_source(index))
            run.rows.append(row)
            if on_slice is not None:
                on_slice(row, result)
    write_summary(run, settings, loaded.path, loaded.fingerprint, loaded.threshold, overwrite,
                  None if loaded.z_calibration is None else loaded.z_calibration.threshold)
    return run


def summary_row(source: str, case: str, index: int, result: SliceResult, file: Path) -> dict[str, Any]:
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
    }


def write_summary(run: AnalysisRun, settings: AnalysisSettings, prior_path: Path, fingerprint: str,
                   threshold: float | None, overwrite: bool, z_threshold: float | None = None) -> None:
    summary = {
        "klviewer_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "prior": {"name": prior_path.name, "path": str(prior_path), "sha256": fingerprint},
        "settings": settings.to_dict(),
        "flag_threshold": threshold,
        "z_threshold": z_threshold,
        "flag_rule": flag_rule(threshold, z_threshold, settings.flag_threshold),
        "rows": run.rows,
        "skipped": run.skipped,
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(run.rows)
    atomic_write_text(run.out / "summary.csv", buffer.getvalue(), overwrite=overwrite)
    atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=2), overwrite=overwrite)
