"""Measurement-domain KL for sparse-view CT: one fixed operator instead of random masks.

With a single A there is no mask distribution, so the row space of A (found by conjugate
gradients) stands in for the observed coefficients and E[P] per frequency ring is measured from
projected white noise. That makes the estimate an approximation, kept apart from the exact
random-mask case; docs/shift_kl.md section 6 has its measured errors.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.inference.likelihood import MeasurementModel
from klviewer.inference.measurements import ct_measurement_model
from klviewer.inference.sampler import AnalysisCancelled
from klviewer.inference.shift_kl.core import (
    _KEEP_FLOOR,
    Progress,
    ShiftCurve,
    _curve,
    _Observations,
    _run,
    check_compatible,
    check_sigma_grid,
    default_sigma_grid,
)
from klviewer.physics.fourier import fft2c
from klviewer.priors.base import Prior

if TYPE_CHECKING:
    from klviewer.inference.measurements import MeasurementSet

DEFAULT_CG_ITERS = 20
"""Conjugate-gradient iterations for the CT row-space projections (docs/shift_kl.md)."""

_CG_TOL = 1e-6
"""CG stops once the residual norm is this fraction of the right-hand side's."""


def _batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.dim() - 1)))


def _cg(normal: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, iters: int, tol: float = _CG_TOL) -> torch.Tensor:
    """Solve normal(x) = rhs from x = 0 by conjugate gradients, in float64; returns rhs's dtype.

    With rhs in the range of the PSD map this gives the minimum-norm solution; stopping early
    leaves out the weakest singular directions. float64 and the relative tolerance matter: on a
    singular system, float32 rounding feeds the null space and CG drifts into it after enough
    iterations.
    """
    b = rhs.to(torch.float64)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = _batch_dot(r, r)
    stop = (tol**2) * rs
    for _ in range(iters):
        ap = normal(p)
        alpha = rs / _batch_dot(p, ap).clamp_min(1e-300)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _batch_dot(r, r)
        if bool((rs_new <= stop).all()):
            break
        p = r + (rs_new / rs.clamp_min(1e-300)) * p
        rs = rs_new
    return x.to(rhs.dtype)


def radial_index(size: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Integer radius (in DFT bins, rounded) of every unshifted frequency of an (H, W) grid."""
    h, w = size
    fy = torch.fft.fftfreq(h, d=1.0 / h, dtype=torch.float64)
    fx = torch.fft.fftfreq(w, d=1.0 / w, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 * (max(h, w) / h) ** 2 + fx[None, :] ** 2 * (max(h, w) / w) ** 2)
    return radius.round().long().to(device) if device is not None else radius.round().long()


def _ring_sums(values: torch.Tensor, rings: torch.Tensor, n_rings: int) -> torch.Tensor:
    sums = torch.zeros(n_rings, dtype=torch.float64, device=values.device)
    sums.index_add_(0, rings.flatten(), values.to(torch.float64).flatten())
    return sums


@dataclass
class _CTSlice:
    model: MeasurementModel
    zero_filled: torch.Tensor
    """(1, 1, H, W): the minimum-norm least-squares image of the measurement (prior units)."""
    noise: torch.Tensor
    """(1, 1, H, W): a white-noise draw projected onto the row space, reused at every sigma."""
    geometry: str


CT_WEIGHTINGS: tuple[str, ...] = ("derived", "paper", "ring", "unweighted")
"""For one fixed operator E[P] is the row-space projector, so the derived weight 1/E[P] and the
paper's E[P]^(-3/2) are both 1 on the row space: derived and paper are the same number, the
observed (row-space) part of the difference. ring: that part re-weighted by 1/(fraction of its
frequency ring the views see), an isotropy extrapolation to the unseen coefficients; unweighted:
the difference over all pixels. docs/shift_kl.md section 6 has the measured errors."""


class _CT(_Observations):
    """Sparse-view CT: the observed coefficients are the row space of A, by conjugate gradients."""

    domain = "measurement"
    operator = "ct"
    weightings = CT_WEIGHTINGS

    def __init__(self, measurements: MeasurementSet, prior: Prior, seed: int, cg_iters: int,
                 progress: Progress | None, cancel: threading.Event | None) -> None:
        if len(measurements) == 0:
            raise KlviewerInputError(None, "no measurements to estimate the shift from")
        if cg_iters < 1:
            raise KlviewerInputError(None, f"cg_iters must be at least 1, got {cg_iters}")
        self.cg_iters = cg_iters
        size = tuple(prior.config.image_size)
        generator = torch.Generator().manual_seed(int(seed) + 7919)  # distinct from the per-sigma stream
        self.slices: list[_CTSlice] = []
        for i, measured in enumerate(measurements.slices):
            if cancel is not None and cancel.is_set():
                raise AnalysisCancelled("shift estimate cancelled")
            acq = measured.prepared.acquisition
            if tuple(acq.operator.image_size) != size:
                raise KlviewerError(f"{measured.source}: measurement prepared on a {acq.operator.image_size} grid, "
                                    f"the prior works on {size}; collect the measurements with this prior")
            model = ct_measurement_model(acq, prior)
            x_hat = _cg(model.normal, model.data_term(), cg_iters)
            white = torch.randn((1, 1, *size), generator=generator, dtype=torch.float32).to(acq.device)
            self.slices.append(_CTSlice(model, x_hat, self.project(model, white),
                                        json.dumps(acq.operator.describe(), sort_keys=True)))
            if progress is not None:
                progress(i + 1, len(measurements))
        self.size = size
        self.rings = radial_index(size, self.slices[0].zero_filled.device)
        self.n_rings = int(self.rings.max()) + 1
        self.keep = {g: self._ring_keep(g) for g in {s.geometry for s in self.slices}}

    def project(self, model: MeasurementModel, r: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection onto the row space of A: (K^T W K)^+ K^T W K r."""
        return _cg(model.normal, model.normal(r), self.cg_iters)

    def _ring_keep(self, geometry: str) -> torch.Tensor:
        """E[P] per frequency ring: the fraction of white-noise power the projection keeps,
        pooled over the slices that share this geometry."""
        kept = torch.zeros(self.n_rings, dtype=torch.float64, device=self.rings.device)
        count = torch.zeros_like(kept)
        for s in self.slices:
            if s.geometry == geometry:
                kept += _ring_sums(fft2c(s.noise[0, 0]).abs().pow(2), self.rings, self.n_rings)
                count += torch.bincount(self.rings.flatten(), minlength=self.n_rings).to(torch.float64)
        return (kept / count.clamp_min(1)).clamp(0.0, 1.0)

    def observed_fraction(self) -> float:
        """Mean E[P] over all coefficients: the share of the image the measurements see."""
        per_ring = torch.bincount(self.rings.flatten(), minlength=self.n_rings).to(torch.float64)
        fractions = [float((k * per_ring).sum() / per_ring.sum()) for k in self.keep.values()]
        return float(np.mean(fractions))

    def __len__(self):
        return len(self.slices)

    def clean(self, idx):
        return torch.cat([s.zero_filled for s in self.slices[idx]])

    def noise(self, idx, generator):
        return torch.cat([s.noise for s in self.slices[idx]])

    def norms(self, diffs, idx):
        out = [dict() for _ in diffs]
        stacked = torch.stack(diffs, 1)  # (B, J, 1, H, W): project all candidates of a slice at once
        for b, s in enumerate(self.slices[idx]):
            d = stacked[b]
            observed = self.project(s.model, d)
            keep = self.keep[s.geometry][self.rings].clamp_min(_KEEP_FLOOR)
            power_obs = fft2c(observed[:, 0]).abs().pow(2).to(torch.float64)
            row_space = power_obs.flatten(1).sum(1)
            values = {
                "derived": row_space,
                "paper": row_space,
                "ring": (power_obs / keep).flatten(1).sum(1),
                "unweighted": d.to(torch.float64).flatten(1).pow(2).sum(1),
            }
            for j in range(len(diffs)):
                for w, v in values.items():
                    out[j].setdefault(w, []).append(v[j])
        return [{w: torch.stack(v) for w, v in o.items()} for o in out]

    def details(self):
        return {"cg_iters": self.cg_iters, "observed_fraction": round(self.observed_fraction(), 6)}


def measurement_kl_curves(
    p: Prior | None, candidates: Sequence[Prior], measurements: MeasurementSet, *, sigmas: np.ndarray | None = None,
    seed: int = 0, batch: int = 4, cg_iters: int = DEFAULT_CG_ITERS, progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> list[dict[str, ShiftCurve]]:
    """Measurement-domain curves of every candidate against reference ``p`` from sparse-view CT
    measurements, under every weighting of CT_WEIGHTINGS.

    With ``p=None`` each curve is the candidate's denoising fit instead: the same sum with the
    measured zero-filled image as the target (weighting names unchanged; see prior_selection).
    All candidates see the same noise, and the reference is evaluated once per draw.
    """
    if not candidates:
        raise KlviewerInputError(None, "no candidate priors given")
    base = p if p is not None else candidates[0]
    for q in candidates:
        check_compatible(base, q)
    grid = default_sigma_grid() if sigmas is None else check_sigma_grid(sigmas)
    n_prep = len(measurements)
    n_run = len(grid) * math.ceil(n_prep / max(batch, 1))

    def prep_progress(done: int, _total: int) -> None:
        if progress is not None:
            progress(done, n_prep + n_run)

    def run_progress(done: int, _total: int) -> None:
        if progress is not None:
            progress(n_prep + done, n_prep + n_run)

    obs = _CT(measurements, base, seed, cg_iters, prep_progress, cancel)
    integrands = _run(obs, p, list(candidates), grid, seed, batch, run_progress, cancel)
    details = {"seed": seed, **obs.details()}
    return [{w: _curve(grid, v[w], len(obs), "measurement", "ct", w, details) for w in obs.weightings}
            for v in integrands]


def measurement_kl(
    p: Prior, q: Prior, measurements: MeasurementSet, *, sigmas: np.ndarray | None = None, seed: int = 0,
    batch: int = 4, weighting: str = "derived", cg_iters: int = DEFAULT_CG_ITERS,
    progress: Progress | None = None, cancel: threading.Event | None = None,
) -> ShiftCurve:
    """Measurement-domain KL(p || q) from sparse-view CT measurements of data from p (an approximation:
    docs/shift_kl.md). ``measurements`` come from ``collect_measurements`` with p (or any prior on
    the same grid)."""
    if weighting not in CT_WEIGHTINGS:
        raise KlviewerInputError(None, f"weighting must be one of {', '.join(CT_WEIGHTINGS)}, got {weighting!r}")
    (curves,) = measurement_kl_curves(p, [q], measurements, sigmas=sigmas, seed=seed, batch=batch, cg_iters=cg_iters,
                                      progress=progress, cancel=cancel)
    return curves[weighting]
