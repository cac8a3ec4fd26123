"""The estimator every domain shares, and the image domain it starts from.

One Monte Carlo loop (``_run``) over the sigma grid serves every domain: an ``_Observations``
says what the domain sees, which noise it adds and how it measures a difference, so the
measurement domains (``masked``, ``ct``) add only that and reuse the grid, the quadrature and the
common-random-numbers noise stream defined here. The image domain (``_Images``) is the base case.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.inference.sampler import AnalysisCancelled
from klviewer.priors.base import Prior, PriorConfig

_KEEP_FLOOR = 1e-3  # E[P] below this is clamped wherever it divides (the paper weight E[P]^-3 would overflow)

Progress = Callable[[int, int], None]


@dataclass
class ShiftCurve:
    """KL(p || q) accumulated over the noise level, in nats."""

    sigmas: np.ndarray
    """Ascending sigma grid (prior units)."""
    integrand: np.ndarray
    """d KL / d sigma at each grid point."""
    cumulative: np.ndarray
    """KL accumulated from the smallest sigma up to each grid point, nats."""
    total: float
    """cumulative[-1], nats."""
    n: int
    """Number of images / measurements averaged."""
    domain: str
    """'image' or 'measurement'."""
    operator: str
    """'identity', 'inpainting', 'fourier' or 'ct'."""
    weighting: str
    """'none' (image domain), or one of WEIGHTINGS (random masks) / CT_WEIGHTINGS (sparse-view CT)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Estimator settings (seed, denoiser, CT observed fraction, ...), JSON-ready."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "sigmas": [float(s) for s in self.sigmas],
            "integrand": [float(v) for v in self.integrand],
            "cumulative": [float(v) for v in self.cumulative],
            "total": float(self.total),
            "n": int(self.n),
            "domain": self.domain,
            "operator": self.operator,
            "weighting": self.weighting,
            "details": json.loads(json.dumps(self.details)),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShiftCurve:
        return cls(sigmas=np.asarray(d["sigmas"], float), integrand=np.asarray(d["integrand"], float),
                   cumulative=np.asarray(d["cumulative"], float), total=float(d["total"]), n=int(d["n"]),
                   domain=d["domain"], operator=d["operator"], weighting=d["weighting"],
                   details=dict(d.get("details", {})))


# ---- sigma grid and quadrature ------------------------------------------------------------------

def default_sigma_grid(sigma_min: float = 0.002, sigma_max: float = 80.0, n: int = 40) -> np.ndarray:
    """``n`` log-spaced noise levels from sigma_min to sigma_max (EDM's range by default)."""
    if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)) or n < 2:
        raise KlviewerInputError(None, f"sigma grid needs 0 < sigma_min < sigma_max and n >= 2, got "
                                       f"{sigma_min}, {sigma_max}, {n}")
    return np.geomspace(sigma_min, sigma_max, int(n))


def check_sigma_grid(sigmas: Sequence[float] | np.ndarray) -> np.ndarray:
    s = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if s.size < 2 or not np.all(np.isfinite(s)) or s[0] <= 0 or np.any(np.diff(s) <= 0):
        raise KlviewerInputError(None, "the sigma grid must hold at least two positive, finite, strictly "
                                       "ascending noise levels")
    return s


def cumulative_integral(sigmas: np.ndarray, integrand: np.ndarray) -> np.ndarray:
    """int_{sigmas[0]}^{sigmas[k]} f ds by the trapezoid rule in ln(sigma) on sigma * f.

    On a log grid sigma * f(sigma) is a smooth bump in ln(sigma) (it vanishes like sigma^2 at
    small sigma and like 1/sigma^2 at large sigma), which the log-trapezoid rule integrates far
    more accurately than a trapezoid in sigma on the same points.
    """
    g = sigmas * integrand
    steps = 0.5 * (g[1:] + g[:-1]) * np.diff(np.log(sigmas))
    return np.concatenate([[0.0], np.cumsum(steps)])


def _curve(sigmas: np.ndarray, integrand: np.ndarray, n: int, domain: str, operator: str, weighting: str,
           details: dict[str, Any]) -> ShiftCurve:
    cumulative = cumulative_integral(sigmas, integrand)
    return ShiftCurve(sigmas.copy(), integrand, cumulative, float(cumulative[-1]), n, domain, operator, weighting,
                      details)


# ---- priors ---------------------------------------------------------------------------------------

def grid_differences(a: PriorConfig, b: PriorConfig) -> list[str]:
    """How two priors' grids, channels and HU mappings differ (empty: comparable pixel for pixel)."""
    problems = []
    if tuple(a.image_size) != tuple(b.image_size) or a.channels != b.channels:
        problems.append(f"image size {a.channels}x{a.image_size[0]}x{a.image_size[1]} vs "
                        f"{b.channels}x{b.image_size[0]}x{b.image_size[1]}")
    if not (math.isclose(a.hu_offset, b.hu_offset, abs_tol=1e-9) and math.isclose(a.hu_scale, b.hu_scale, rel_tol=1e-9)):
        problems.append(f"HU mapping x = (HU - {a.hu_offset:g}) / {a.hu_scale:g} vs (HU - {b.hu_offset:g}) / {b.hu_scale:g}")
    return problems


def check_compatible(p: Prior, q: Prior) -> None:
    """Two priors are compared pixel for pixel only when they share grid, channels and HU mapping."""
    a, b = p.config, q.config
    problems = grid_differences(a, b)
    if problems:
        raise KlviewerError(f"priors '{a.name}' and '{b.name}' cannot be compared: " + "; ".join(problems)
                            + " (no resampling is done; retrain or pick priors on the same grid and mapping)")


def _denoise(prior: Prior, u: torch.Tensor, sigma: float) -> torch.Tensor:
    with torch.no_grad():
        return prior.denoise(u.to(prior.device), float(sigma)).to(u.device, u.dtype)


# ---- what each domain contributes to the estimator ------------------------------------------------

class _Observations:
    """One domain: the clean (or zero-filled) inputs, the noise it adds, and how a difference is measured.

    ``norms`` maps a batch of differences to {weighting: (B,) squared norms}.
    """

    domain = "image"
    operator = "identity"
    weightings: tuple[str, ...] = ("none",)

    def __len__(self) -> int:
        raise NotImplementedError

    def clean(self, idx: slice) -> torch.Tensor:
        raise NotImplementedError

    def noise(self, idx: slice, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def norms(self, diffs: list[torch.Tensor], idx: slice) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def denoise(self, prior: Prior, u: torch.Tensor, sigma: float, idx: slice) -> torch.Tensor:
        return _denoise(prior, u, sigma)

    def details(self) -> dict[str, Any]:
        return {}


class _Images(_Observations):
    def __init__(self, images: torch.Tensor) -> None:
        if images.ndim < 2 or images.shape[0] == 0:
            raise KlviewerInputError(None, f"need a non-empty (N, ...) batch of images, got shape {tuple(images.shape)}")
        if not bool(torch.isfinite(images).all()):
            raise KlviewerInputError(None, "images contain NaN or infinite values")
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def clean(self, idx: slice) -> torch.Tensor:
        return self.images[idx]

    def noise(self, idx: slice, generator: torch.Generator) -> torch.Tensor:
        x = self.images[idx]
        return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)

    def norms(self, diffs, idx):
        return [{"none": d.flatten(1).pow(2).sum(1)} for d in diffs]


def _run(obs: _Observations, reference: Prior | None, candidates: Sequence[Prior], sigmas: np.ndarray, seed: int,
         batch: int, progress: Progress | None, cancel: threading.Event | None) -> list[dict[str, np.ndarray]]:
    """Integrands per candidate and weighting: E ||w (D_ref(u) - D_cand(u))||^2 / s^3.

    Without a reference the target is the clean (zero-filled) input instead of D_ref(u): the
    candidate's denoising loss on observed data, weighted like the KL.
    """
    if batch < 1:
        raise KlviewerInputError(None, f"batch must be at least 1, got {batch}")
    n = len(obs)
    generator = torch.Generator().manual_seed(int(seed))
    sums = [{w: np.zeros(len(sigmas)) for w in obs.weightings} for _ in candidates]
    starts = range(0, n, batch)
    total, done = len(sigmas) * len(starts), 0
    for k, s in enumerate(sigmas):
        for start in starts:
            if cancel is not None and cancel.is_set():
                raise AnalysisCancelled("shift estimate cancelled")
            idx = slice(start, min(start + batch, n))
            x = obs.clean(idx)
            u = x + float(s) * obs.noise(idx, generator)
            target = x if reference is None else obs.denoise(reference, u, s, idx)
            diffs = [target - obs.denoise(q, u, s, idx) for q in candidates]
            for acc, norms in zip(sums, obs.norms(diffs, idx)):
                for w, values in norms.items():
                    acc[w][k] += float(values.sum())
            done += 1
            if progress is not None:
                progress(done, total)
    return [{w: v / n / sigmas**3 for w, v in acc.items()} for acc in sums]


def image_kl_curves(p: Prior, candidates: Sequence[Prior], images: torch.Tensor, *, sigmas: np.ndarray | None = None,
                    seed: int = 0, batch: int = 16, progress: Progress | None = None,
                    cancel: threading.Event | None = None) -> list[ShiftCurve]:
    """KL(p || q) for every candidate q from clean ``images`` drawn from p, shape (N, C, H, W) in
    prior units (Eq. 4). Each image gets fresh noise at every sigma; all denoisers see the same
    noisy image, and p's denoiser runs once per draw."""
    for q in candidates:
        check_compatible(p, q)
    grid = default_sigma_grid() if sigmas is None else check_sigma_grid(sigmas)
    obs = _Images(images)
    integrands = _run(obs, p, list(candidates), grid, seed, batch, progress, cancel)
    return [_curve(grid, v["none"], len(obs), "image", "identity", "none", {"seed": seed}) for v in integrands]


def image_kl(p: Prior, q: Prior, images: torch.Tensor, *, sigmas: np.ndarray | None = None, seed: int = 0,
             batch: int = 16, progress: Progress | None = None, cancel: threading.Event | None = None) -> ShiftCurve:
    """KL(p || q) from clean ``images`` drawn from p, shape (N, C, H, W) in prior units (Eq. 4)."""
    (curve,) = image_kl_curves(p, [q], images, sigmas=sigmas, seed=seed, batch=batch, progress=progress, cancel=cancel)
    return curve
