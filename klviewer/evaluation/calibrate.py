"""`klviewer calibrate`: flag thresholds for one prior and one set of analysis settings.

The threshold is the score that at most a fraction `fpr` of held-out healthy slices exceed.
By default they are phantoms from their own seed range (CALIBRATION_SEED_BASE), so they overlap
neither the training pool nor the detection benchmark. For real data, `healthy` names studies
the user vouches for as healthy; every picked slice of them is scored instead.

The same slices fit the healthy reference behind KL z-scores (`healthy_reference`). Its z
threshold is taken from cross-fitted z-scores, each slice scored by a reference fitted
without it; the reference stored is fitted on all of them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klviewer.devices import resolve_device
from klviewer.errors import KlviewerInputError
from klviewer.evaluation.cached_runs import analyze_with_cache
from klviewer.evaluation.detection import CALIBRATION_SEED_BASE, run_cases
from klviewer.inference.calibration import calibration_key, threshold_at_fpr, write_calibration
from klviewer.inference.healthy_reference import HealthySlice, cross_fitted_scores, fit_reference
from klviewer.inference.measurements import collect_measurements
from klviewer.inference.plan import SeriesPlan
from klviewer.inference.prior_fit import STATISTIC, prior_fit_score
from klviewer.inference.result import SliceResult
from klviewer.inference.settings import AnalysisSettings
from klviewer.priors.base import Prior
from klviewer.priors.checkpoint import installed_prior_reason, load_prior, prior_fingerprint, resolve_prior_path


@dataclass
class Calibration:
    threshold: float
    fpr: float
    scores: np.ndarray
    """Healthy image scores (nats), in phantom order."""
    entry: dict[str, Any]
    """What was written to calibration.json."""
    path: Path | None
    z_threshold: float | None = None
    z_scores: np.ndarray | None = None
    """Cross-fitted healthy KL z-scores; None when there were too few slices for a reference."""


PRIOR_FIT_MARGIN = 2.0
"""The prior-fit threshold is this multiple of the healthy score at the false-positive rate: a few healthy
calibration slices cannot show the spread of a new patient's, while a prior that does not describe a study
adds several times the healthy KL (docs/prior_fit.md)."""

MIN_REFERENCE_SLICES = 4
"""Fewer healthy slices than this leave each cross-fitting fold too thin for a spread per bin."""


def calibrate_prior(
    prior: str | Path,
    settings: AnalysisSettings,
    *,
    n: int = 20,
    fpr: float = 0.05,
    seed: int = 0,
    cache: Path | None = None,
    write: bool = True,
    overwrite: bool = False,
    command: str = "",
    progress: Callable[[int, int], None] | None = None,
    healthy: Sequence[str | Path] | SeriesPlan | None = None,
    slices: str = "all",
    cancel: threading.Event | None = None,
) -> Calibration:
    """Score `n` healthy phantoms (or the `slices` of the `healthy` studies, paths or the series of a plan)
    with `settings` and set the thresholds at false-positive rate `fpr`. `cache` keeps each slice's
    result, per prior weights, so a re-run skips sampling."""
    device = resolve_device(settings.device)
    prior_path = resolve_prior_path(prior)
    refusal = installed_prior_reason(prior_path) if write else None
    if refusal:
        raise KlviewerInputError(prior_path, refusal)
    network = load_prior(prior_path, device=device)
    fingerprint = prior_fingerprint(prior_path)
    if healthy is not None:
        study_cache = None if cache is None else cache / fingerprint[:16]
        results, source = _score_studies(network, prior_path.name, settings, healthy, slices, device, progress, cancel,
                                         study_cache)
    else:
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        cases = run_cases(network, settings, n_id=n, n_ood=0, seed=seed, seed_base=CALIBRATION_SEED_BASE, cache=cache,
                          device=device, progress=progress, cancel=cancel)
        results, source = [c.result for c in cases], {"phantom_seeds": [c.seed for c in cases]}
    scores = np.array([r.score for r in results])
    threshold = threshold_at_fpr(scores, fpr)
    entry = {
        "settings": calibration_key(settings),
        "threshold": threshold,
        "fpr": fpr,
        "n_healthy": int(scores.size),
        "healthy_exceeding": int((scores > threshold).sum()),
        "healthy_scores": {"min": float(scores.min()), "median": float(np.median(scores)), "max": float(scores.max())},
        **source,
        "prior_sha256": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    z_threshold = z_scores = None
    if len(results) >= MIN_REFERENCE_SLICES:
        reference_slices = [HealthySlice(r.energy, r.recon_hu) for r in results]
        z_scores = cross_fitted_scores(reference_slices, settings.patch, settings.sigma_window)
        z_threshold = threshold_at_fpr(z_scores, fpr)
        entry["healthy_reference"] = {
            **fit_reference(reference_slices, settings.patch, settings.sigma_window).to_dict(),
            "z_threshold": z_threshold,
            "healthy_exceeding": int((z_scores > z_threshold).sum()),
            "healthy_z_scores": {"min": float(z_scores.min()), "median": float(np.median(z_scores)),
                                 "max": float(z_scores.max())},
            # Every slice's, so that two-stage screening can set its escalation threshold at any rate.
            "cross_fitted_z_scores": [float(z) for z in z_scores],
        }
    fit_scores = np.array([prior_fit_score(r.energy, r.recon_hu, settings.sigma_window) for r in results])
    fit_threshold = PRIOR_FIT_MARGIN * threshold_at_fpr(fit_scores, fpr)
    entry["prior_fit"] = {
        "statistic": STATISTIC, "threshold": fit_threshold, "margin": PRIOR_FIT_MARGIN,
        "healthy_exceeding": int((fit_scores > fit_threshold).sum()),
        "healthy_scores": {"min": float(fit_scores.min()), "median": float(np.median(fit_scores)),
                           "max": float(fit_scores.max())},
    }
    path = write_calibration(prior_path, entry, overwrite=overwrite) if write else None
    return Calibration(threshold, fpr, scores, entry, path, z_threshold, z_scores)


def _score_studies(network: Prior, prior_name: str, settings: AnalysisSettings,
                   inputs: Sequence[str | Path] | SeriesPlan, slices: str, device: torch.device,
                   progress: Callable[[int, int], None] | None, cancel: threading.Event | None,
                   cache: Path | None) -> tuple[list[SliceResult], dict[str, Any]]:
    """Analyse every picked slice of the healthy studies; returns the results and what the entry records of them."""
    measurements = collect_measurements(inputs, network, settings, slices=slices, device=device)
    items = [(None if cache is None else cache / f"{m.case}_{m.index:04d}.npz", lambda m=m: m.prepared)
             for m in measurements.slices]
    results = analyze_with_cache(items, network, settings, prior_name=prior_name, device=device, progress=progress,
                                 cancel=cancel)
    recorded = inputs.sources if isinstance(inputs, SeriesPlan) else [str(Path(p).resolve()) for p in inputs]
    source = {"healthy_inputs": recorded, "healthy_slices": slices, "skipped": measurements.skipped}
    return results, source
