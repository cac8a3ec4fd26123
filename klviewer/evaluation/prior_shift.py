"""`klviewer shift` as a service: how far measured studies have drifted from candidate priors.

With a reference prior the candidates are ranked by the measurement-domain KL(reference || candidate);
without one, by their measurement-domain denoising fit (see `klviewer.inference.prior_selection`).
`run_shift` measures, ranks, and writes the JSON report and the PNG of the cumulative curves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from klviewer import __version__
from klviewer.devices import resolve_device
from klviewer.errors import KlviewerInputError
from klviewer.inference.measurements import collect_measurements
from klviewer.inference.prior_selection import PriorRank, rank_priors
from klviewer.inference.settings import AnalysisSettings
from klviewer.inference.shift_kl import DEFAULT_CG_ITERS, default_sigma_grid
from klviewer.io.safe_write import OutputExistsError, atomic_write, atomic_write_text, check_output_folder
from klviewer.priors.checkpoint import load_prior, prior_fingerprint, read_prior_config, resolve_prior_path

DEFAULT_SIGMA_RANGE = (0.002, 80.0)
DEFAULT_SIGMA_POINTS = 40


@dataclass
class ShiftRun:
    ranks: list[PriorRank]
    report: dict[str, Any]


def run_shift(
    inputs: Sequence[str | Path],
    candidates: Sequence[str | Path],
    *,
    reference: str | Path | None = None,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    settings: AnalysisSettings | None = None,
    slices: str = "all",
    sigmas: np.ndarray | None = None,
    weighting: str = "derived",
    cg_iters: int = DEFAULT_CG_ITERS,
    batch: int = 4,
    overwrite: bool = False,
    command: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ShiftRun:
    """Measure ``inputs`` (CT images are simulated with the settings' views and noise, sinograms
    are used as given), rank ``candidates``, and write the JSON (``out``) and PNG (``plot``)."""
    settings = settings or AnalysisSettings()
    for target in (out, plot):
        if target is not None:
            check_output_folder(Path(target), inputs)
            if Path(target).exists() and not overwrite:
                raise OutputExistsError(Path(target))
    if not candidates:
        raise KlviewerInputError(None, "give at least one candidate prior (--prior)")
    grid = default_sigma_grid(*DEFAULT_SIGMA_RANGE, DEFAULT_SIGMA_POINTS) if sigmas is None else sigmas
    device = resolve_device(settings.device)
    grid_prior_path = resolve_prior_path(reference if reference is not None else candidates[0])
    measurements = collect_measurements(inputs, load_prior(grid_prior_path, device=device), settings,
                                        slices=slices, device=device)
    ranks = rank_priors(candidates, measurements, reference=reference, sigmas=grid, seed=settings.seed, batch=batch,
                        weighting=weighting, cg_iters=cg_iters, device=device, progress=progress)
    report = {
        "klviewer_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "criterion": ranks[0].criterion,
        "reference": None if reference is None else {
            "name": read_prior_config(grid_prior_path).name, "path": str(grid_prior_path),
            "sha256": prior_fingerprint(grid_prior_path)},
        "settings": {
            "views": settings.views, "dose_i0": settings.dose_i0, "noise_sigma": settings.noise_sigma,
            "seed": settings.seed, "slices": slices, "device": str(device), "weighting": weighting,
            "cg_iters": cg_iters, "sigma_min": float(grid[0]), "sigma_max": float(grid[-1]), "sigma_points": len(grid),
        },
        "measurements": [{"case": m.case, "input": m.source, "slice_index": m.index, "notes": m.prepared.notes}
                         for m in measurements.slices],
        "skipped": measurements.skipped,
        "ranks": [{**r.to_dict(), "sha256": prior_fingerprint(Path(r.path))} for r in ranks],
    }
    if out is not None:
        atomic_write_text(Path(out), json.dumps(report, indent=2) + "\n", overwrite=overwrite)
    if plot is not None:
        shift_figure(ranks, Path(plot), overwrite=overwrite)
    return ShiftRun(ranks, report)


def shift_figure(ranks: Sequence[PriorRank], path: Path, overwrite: bool = False) -> Path:
    """Cumulative curves against sigma: the KL, or for the fit its excess over the best candidate."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and no pyplot state

    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    ax = fig.subplots()
    fit = ranks[0].criterion == "denoising-fit"
    best = ranks[0].curve
    for r in ranks:
        if r.curve is None:
            continue
        values = r.curve.cumulative - best.cumulative if fit and best is not None else r.curve.cumulative
        ax.plot(r.curve.sigmas, values, label=f"{r.name} ({r.delta if fit else r.score:.3g})")
    ax.set_xscale("log")
    ax.set_xlabel("noise level sigma (prior units)")
    if fit:
        ax.set_ylabel("denoising fit minus best (nats)")
        ax.set_title("Measurement-domain fit (no reference)")
    else:
        ax.set_ylabel("cumulative KL (nats)")
        ax.set_title("Measurement-domain KL(reference || prior)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"), overwrite=overwrite)
