"""`klviewer analyze` as a service: analyse every planned slice and write the results folder.

The batch workers call `analyze_plan` with a prior they keep loaded; each study's folder is
exactly an analyze results folder.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from klviewer.inference.escalation import Escalation, escalation_rule
from klviewer.inference.pipeline import LoadedPrior, analyze_slices
from klviewer.inference.plan import SeriesPlan, plan_series
from klviewer.inference.result import SliceResult
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.loader import open_images
from klviewer.io.safe_write import OutputExistsError, check_output_folder
from klviewer.priors.checkpoint import DEFAULT_PRIOR
from klviewer.results.slice_file import write_slice_npz
from klviewer.results.summary import AnalysisRun, summary_row, write_summary


def run_analysis(
    inputs: Sequence[str | Path],
    out: str | Path,
    settings: AnalysisSettings,
    *,
    prior: str | Path = DEFAULT_PRIOR,
    slices: str = "all",
    overwrite: bool = False,
    slice_batch: int | None = None,
    escalation: Escalation | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    on_slice: Callable[[dict[str, Any], SliceResult], None] | None = None,
) -> AnalysisRun:
    """Analyse inputs and write the results folder; returns the summary rows. `slice_batch`, `escalation`:
    see `analyze_slices`."""
    out = Path(out)
    check_output_folder(out, inputs)
    if (out / "summary.json").exists() and not overwrite:
        raise OutputExistsError(out / "summary.json")
    loaded = LoadedPrior.load(prior, settings.device)
    plan = plan_series(open_images(inputs), slices)
    return analyze_plan(plan, out, settings, loaded, overwrite=overwrite, slice_batch=slice_batch,
                        escalation=escalation, progress=progress, cancel=cancel, on_slice=on_slice)


def analyze_plan(
    plan: SeriesPlan,
    out: Path,
    settings: AnalysisSettings,
    loaded: LoadedPrior,
    *,
    overwrite: bool = False,
    slice_batch: int | None = None,
    escalation: Escalation | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    on_slice: Callable[[dict[str, Any], SliceResult], None] | None = None,
) -> AnalysisRun:
    """Analyse every planned slice with an already loaded prior and write the results folder `out`.

    `progress(done, total)` counts sampler steps over the whole plan. With `escalation` (two stages)
    the summary's thresholds and rule are stage 2's, which decide every flag, and it records the
    escalation; each row says whether its slice was escalated.
    """
    rule = None if escalation is None else escalation_rule(loaded.calibration, settings, escalation)
    run = AnalysisRun(out=out, skipped=plan.skipped)
    for item in analyze_slices(plan, loaded, settings, slice_batch=slice_batch, escalation=escalation,
                               progress=progress, cancel=cancel):
        target = out / item.planned.case / f"{item.index:04d}.npz"
        write_slice_npz(item.result, target, overwrite=overwrite)
        row = summary_row(item.planned.source, item.planned.case, item.index, item.result, target.relative_to(out))
        row.update(item.planned.slice_source(item.index))
        run.rows.append(row)
        if on_slice is not None:
            on_slice(row, item.result)
    if rule is not None:
        write_summary(run, settings, loaded.path, loaded.fingerprint, rule.stage2_nats, overwrite,
                      rule.stage2_z.threshold, rule.stage2_prior_fit, rule)
        return run
    z = loaded.calibration.z_calibration(settings)
    write_summary(run, settings, loaded.path, loaded.fingerprint, loaded.calibration.nats_threshold(settings),
                  overwrite, None if z is None else z.threshold, loaded.calibration.prior_fit_threshold(settings))
    return run
