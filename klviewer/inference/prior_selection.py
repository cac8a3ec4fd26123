"""Ranking candidate priors by how well they match a set of measurements.

With a reference prior (one trained on data like the measured studies), candidates are ranked
by the measurement-domain KL(reference || candidate), lowest first.

Without one, they are ranked by their measurement-domain denoising fit, lowest first:

    fit(q) = int E || w P (D_q(u_s) - x_hat) ||^2 s^-3 ds,   u_s = x_hat + s P n,

the candidate's error at denoising the noisy measurement back to the measured (zero-filled)
image, counted on the observed coefficients only and weighted like the KL. Because the true
posterior mean D_p is the best denoiser, E||D_q - x||^2 = E||D_p - x||^2 + E||D_p - D_q||^2,
so fit(q) = KL_meas(p_data || q) + C, where the constant C depends on the data only. Differences
of fits between candidates are therefore differences of measurement-domain KL from the unknown
data distribution (docs/shift_kl.md); the absolute value means nothing on its own.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from klviewer.errors import KlviewerInputError
from klviewer.inference.shift_kl import CT_WEIGHTINGS, DEFAULT_CG_ITERS, Progress, ShiftCurve, measurement_kl_curves
from klviewer.priors.checkpoint import load_prior, resolve_prior_path

if TYPE_CHECKING:
    from klviewer.inference.measurements import MeasurementSet

CRITERIA = ("measurement-kl", "denoising-fit")


@dataclass
class PriorRank:
    name: str
    path: str
    score: float
    """Nats: KL(reference || candidate), or the denoising fit (KL from the data + a constant)."""
    curve: ShiftCurve | None
    criterion: str
    """'measurement-kl' (against a reference) or 'denoising-fit' (no reference)."""
    delta: float = 0.0
    """score minus the best candidate's score; for the fit, the KL difference to the best."""
    totals: dict[str, float] = field(default_factory=dict)
    """The end value under every weighting of shift_kl.CT_WEIGHTINGS."""

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "score": self.score, "delta": self.delta,
                "criterion": self.criterion, "totals": dict(self.totals),
                "curve": None if self.curve is None else self.curve.to_dict()}


def rank_priors(
    candidates: Sequence[str | Path],
    measurements: MeasurementSet,
    *,
    reference: str | Path | None = None,
    sigmas: np.ndarray | None = None,
    seed: int = 0,
    batch: int = 4,
    weighting: str = "derived",
    cg_iters: int = DEFAULT_CG_ITERS,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> list[PriorRank]:
    """Rank ``candidates`` (prior names or folders) on sparse-view CT ``measurements``, best first.

    ``measurements`` must be on the priors' grid (``collect_measurements`` with any of them).
    Every candidate sees the same noise draws, so differences between them are not sampling noise
    of independent runs.
    """
    if not candidates:
        raise KlviewerInputError(None, "give at least one candidate prior")
    if weighting not in CT_WEIGHTINGS:
        raise KlviewerInputError(None, f"weighting must be one of {', '.join(CT_WEIGHTINGS)}, got {weighting!r}")
    paths = [resolve_prior_path(c) for c in candidates]
    priors = [load_prior(p, device=device) for p in paths]
    ref = load_prior(reference, device=device) if reference is not None else None
    curves = measurement_kl_curves(ref, priors, measurements, sigmas=sigmas, seed=seed, batch=batch,
                                   cg_iters=cg_iters, progress=progress, cancel=cancel)
    criterion = CRITERIA[0] if ref is not None else CRITERIA[1]
    ranks = []
    for path, prior, by_weighting in zip(paths, priors, curves):
        curve = by_weighting[weighting]
        if ref is None:
            curve.details["quantity"] = "denoising fit: KL from the data distribution plus a data-only constant"
        ranks.append(PriorRank(name=prior.config.name, path=str(path), score=curve.total, curve=curve,
                               criterion=criterion, totals={w: c.total for w, c in by_weighting.items()}))
    ranks.sort(key=lambda r: r.score)
    best = ranks[0].score
    for r in ranks:
        r.delta = r.score - best
    return ranks
