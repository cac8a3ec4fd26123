"""KL divergence between two diffusion priors, from clean images or from measurements only.

Image domain (Shoushtari et al. Eq. 4 with Tweedie):

    KL(p || q) = int_0^inf E_{x~p} || D_p(x + s n) - D_q(x + s n) ||^2 s^-3 ds .

Measurement domain: both denoisers see the *same* noisy zero-filled measurement
``u = V P (V^T x + s n)`` (noise on the observed coefficients only), and the squared difference
is counted on the observed coefficients with the weight 1 / E[P] (``weighting="derived"``; the
paper's printed ``W = E[P]^(-3/2)`` on all coefficients is ``"paper"``). Exact for product
distributions along V under random masks (inpainting, masked Fourier). Sparse-view CT has one
fixed operator: the observed coefficients are the row space of A, found by conjugate gradients,
and the estimate is an approximation. docs/shift_kl.md has the derivation, the sigma grid and
quadrature, the CT approximation and the measured errors.

Every estimator draws its noise from one CPU generator seeded with ``seed`` in a fixed order, so
the same seed gives the same noise for every pair of priors (common random numbers: rankings
compare priors on identical draws) and on every device.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.inference.analysis import ct_measurement_model
from klviewer.inference.likelihood import MeasurementModel
from klviewer.inference.sampler import AnalysisCancelled
from klviewer.physics.fourier import fft2c, ifft2c, line_keep_probabilities, random_line_mask
from klviewer.physics.inpainting import random_mask
from klviewer.priors.base import Prior

if TYPE_CHECKING:
    from klviewer.inference.measurements import MeasurementSet

WEIGHTINGS: tuple[str, ...] = ("derived", "paper", "unweighted")
"""derived: 1/E[P] on observed coefficients (docs/shift_kl.md); paper: E[P]^-3 on all
coefficients, the square of the paper's printed W = E[P]^(-3/2); unweighted: plain squared
difference on all pixels (what the paper's released code records)."""

DENOISERS: tuple[str, ...] = ("zero-filled", "marginal")
"""zero-filled: the prior's own denoiser at the zero-filled measurement (any prior);
marginal: the exact denoiser of the observed coordinates' marginal (Gaussian / GMM priors)."""

DEFAULT_CG_ITERS = 20
"""Conjugate-gradient iterations for the CT row-space projections (docs/shift_kl.md)."""

_CG_TOL = 1e-6
"""CG stops once the residual norm is this fraction of the right-hand side's."""

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

def check_compatible(p: Prior, q: Prior) -> None:
    """Two priors are compared pixel for pixel only when they share grid, channels and HU mapping."""
    a, b = p.config, q.config
    problems = []
    if tuple(a.image_size) != tuple(b.image_size) or a.channels != b.channels:
        problems.append(f"image size {a.channels}x{a.image_size[0]}x{a.image_size[1]} vs "
                        f"{b.channels}x{b.image_size[0]}x{b.image_size[1]}")
    if not (math.isclose(a.hu_offset, b.hu_offset, abs_tol=1e-9) and math.isclose(a.hu_scale, b.hu_scale, rel_tol=1e-9)):
        problems.append(f"HU mapping x = (HU - {a.hu_offset:g}) / {a.hu_scale:g} vs (HU - {b.hu_offset:g}) / {b.hu_scale:g}")
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


# ---- random-mask operators sharing V: inpainting and masked Fourier -------------------------------

@dataclass(frozen=True)
class MaskFamily:
    """Random operators ``H = P V^T`` with one orthonormal V and a random 0/1 diagonal P.

    inpainting: V = I, each pixel kept with probability ``p``. fourier: V^T = the orthonormal
    DFT, whole k-space rows kept (with their mirror rows) with probability ``p``, plus ``acs``
    centre rows always.
    """

    operator: str
    image_size: tuple[int, int]
    p: float
    acs: int = 0

    def __post_init__(self) -> None:
        if self.operator not in ("inpainting", "fourier"):
            raise KlviewerInputError(None, f"mask family operator must be inpainting or fourier, got {self.operator!r}")
        if not 0.0 < self.p <= 1.0:
            raise KlviewerInputError(None, f"keep probability must be in (0, 1], got {self.p}")
        if self.operator == "inpainting" and self.acs:
            raise KlviewerInputError(None, "acs lines apply to the fourier operator only")
        try:
            line_keep_probabilities(int(self.image_size[0]), self.p, self.acs)
        except ValueError as exc:
            raise KlviewerInputError(None, str(exc)) from None

    @property
    def keep_prob(self) -> torch.Tensor:
        """E[P] on the coefficient grid (H, W), float64: pixels, or unshifted k-space bins."""
        h, w = self.image_size
        if self.operator == "inpainting":
            return torch.full((h, w), float(self.p), dtype=torch.float64)
        return line_keep_probabilities(h, self.p, self.acs)[:, None].expand(h, w).clone()

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` independent boolean masks (n, 1, H, W) on the coefficient grid (CPU generator)."""
        if self.operator == "inpainting":
            return random_mask((n, 1, *self.image_size), self.p, generator)
        return torch.stack([random_line_mask(self.image_size, self.p, generator, acs=self.acs) for _ in range(n)])[:, None]

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.operator == "inpainting" else fft2c(x)

    def project(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``V P V^T x``: keep the observed coefficients of x, zero the rest."""
        m = masks.to(x.device)
        if self.operator == "inpainting":
            return x * m
        k = fft2c(x)
        return ifft2c(torch.where(m, k, torch.zeros((), dtype=k.dtype, device=k.device))).real.to(x.dtype)

    def describe(self) -> dict[str, Any]:
        return {"operator": self.operator, "keep_prob": self.p, "acs": self.acs,
                "mean_keep_prob": float(self.keep_prob.mean())}


def inpainting_family(image_size: tuple[int, int], keep_prob: float) -> MaskFamily:
    """Each pixel kept independently with probability ``keep_prob`` (the paper's p)."""
    return MaskFamily("inpainting", (int(image_size[0]), int(image_size[1])), float(keep_prob))


def fourier_family(image_size: tuple[int, int], keep_prob: float, acs: int = 0) -> MaskFamily:
    """Whole k-space rows kept with probability ``keep_prob`` (with their mirror rows), plus ``acs`` centre rows."""
    return MaskFamily("fourier", (int(image_size[0]), int(image_size[1])), float(keep_prob), int(acs))


@dataclass
class MaskedMeasurements:
    """N noise-free measurements ``P V^T x`` of one mask family, stored zero-filled (``V P V^T x``)."""

    family: MaskFamily
    masks: torch.Tensor
    """(N, 1, H, W) boolean, on the coefficient grid."""
    zero_filled: torch.Tensor
    """(N, C, H, W) real, prior units."""

    def __len__(self) -> int:
        return int(self.zero_filled.shape[0])


def simulate_masked(images: torch.Tensor, family: MaskFamily, seed: int = 0) -> MaskedMeasurements:
    """Measure each clean image (N, C, H, W) with its own random mask from ``family``."""
    if images.ndim != 4 or tuple(images.shape[-2:]) != tuple(family.image_size):
        raise KlviewerInputError(None, f"images must be (N, C, {family.image_size[0]}, {family.image_size[1]}) "
                                       f"for this mask family, got {tuple(images.shape)}")
    masks = family.draw(images.shape[0], torch.Generator().manual_seed(int(seed)))
    return MaskedMeasurements(family, masks, family.project(images, masks))


class _Masked(_Observations):
    domain = "measurement"
    weightings = WEIGHTINGS

    def __init__(self, measured: MaskedMeasurements, denoiser: str) -> None:
        if denoiser not in DENOISERS:
            raise KlviewerInputError(None, f"denoiser must be one of {', '.join(DENOISERS)}, got {denoiser!r}")
        if denoiser == "marginal" and measured.family.operator != "inpainting":
            raise KlviewerInputError(None, "marginal denoisers are available for inpainting masks only")
        self.m = measured
        self.operator = measured.family.operator
        self.denoiser = denoiser
        keep = measured.family.keep_prob.to(measured.zero_filled.device)
        self._inv_keep = 1.0 / keep
        self._paper = keep.clamp_min(_KEEP_FLOOR) ** -3

    def __len__(self) -> int:
        return len(self.m)

    def clean(self, idx):
        return self.m.zero_filled[idx]

    def noise(self, idx, generator):
        x = self.m.zero_filled[idx]
        n = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return self.m.family.project(n, self.m.masks[idx])

    def denoise(self, prior, u, sigma, idx):
        if self.denoiser == "marginal":
            return marginal_denoise(prior, u, self.m.masks[idx], sigma)
        return _denoise(prior, u, sigma)

    def norms(self, diffs, idx):
        masks = self.m.masks[idx].to(diffs[0].device)
        out = []
        for d in diffs:
            power = self.m.family.coefficients(d).abs().pow(2)
            out.append({
                "derived": (power * masks * self._inv_keep).flatten(1).sum(1),
                "paper": (power * self._paper).flatten(1).sum(1),
                "unweighted": power.flatten(1).sum(1),
            })
        return out

    def details(self):
        return {**self.m.family.describe(), "denoiser": self.denoiser}


def measurement_kl_operator_curves(
    p: Prior, q: Prior, measured: MaskedMeasurements, *, sigmas: np.ndarray | None = None, seed: int = 0,
    batch: int = 64, denoiser: str = "zero-filled", progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, ShiftCurve]:
    """Measurement-domain KL(p || q) under every weighting of WEIGHTINGS, from one set of draws."""
    check_compatible(p, q)
    grid = default_sigma_grid() if sigmas is None else check_sigma_grid(sigmas)
    obs = _Masked(measured, denoiser)
    (integrands,) = _run(obs, p, [q], grid, seed, batch, progress, cancel)
    details = {"seed": seed, **obs.details()}
    return {w: _curve(grid, integrands[w], len(obs), "measurement", obs.operator, w, details) for w in WEIGHTINGS}


def measurement_kl_operator(
    p: Prior, q: Prior, measured: MaskedMeasurements, *, sigmas: np.ndarray | None = None, seed: int = 0,
    batch: int = 64, weighting: str = "derived", denoiser: str = "zero-filled",
    progress: Progress | None = None, cancel: threading.Event | None = None,
) -> ShiftCurve:
    """Measurement-domain KL(p || q) from inpainting or masked-Fourier measurements of data from p.

    ``denoiser="zero-filled"`` evaluates each prior's denoiser at the noisy zero-filled
    measurement (any prior); ``"marginal"`` uses the exact denoiser of the observed coordinates'
    marginal (Gaussian / GMM priors, inpainting), for which the derived weighting is exact when p
    and q are product distributions over the coordinates.
    """
    if weighting not in WEIGHTINGS:
        raise KlviewerInputError(None, f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    return measurement_kl_operator_curves(p, q, measured, sigmas=sigmas, seed=seed, batch=batch, denoiser=denoiser,
                                          progress=progress, cancel=cancel)[weighting]


def marginal_denoise(prior: Prior, u: torch.Tensor, observed: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[x | u_S] for a Gaussian or Gaussian-mixture prior, where u_S = x_S + sigma n_S is seen on
    the coordinates ``observed`` (bool, broadcastable to u) and nothing else.

    Per component k the observed block is N(mu_kS, C_kSS + s^2 I). Padding that block with the
    identity on the unobserved coordinates keeps the (B, K, d, d) algebra dense and batched:
    the padded matrix has the observed block's determinant and inverse, and zero residuals
    elsewhere. Meant for low-dimensional priors (the GMM validation).
    """
    weights, means, covs = _mixture(prior)
    b, d = u.shape[0], means.shape[1]
    if d > 4096:
        raise KlviewerError(f"marginal denoiser: dimension {d} is too large for dense covariances")
    flat = u.reshape(b, d).to(torch.float64).to(means.device)
    m = observed.expand_as(u).reshape(b, d).to(torch.float64).to(means.device)
    eye = torch.eye(d, dtype=torch.float64, device=means.device)
    c = covs[None] + float(sigma) ** 2 * eye  # (1, K, d, d)
    padded = m[:, None, :, None] * c * m[:, None, None, :] + torch.diag_embed(1.0 - m)[:, None]
    resid = m[:, None, :] * (flat[:, None, :] - means[None])  # (B, K, d)
    chol = torch.linalg.cholesky(padded)
    z = torch.cholesky_solve(resid[..., None], chol)[..., 0]
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    logits = torch.log(weights)[None] - 0.5 * (logdet + (resid * z).sum(-1))
    resp = torch.softmax(logits, dim=1)  # the observed count's 2 pi term is common to all components
    post = means[None] + torch.einsum("kde,bke->bkd", covs, z)
    out = (resp[..., None] * post).sum(1)
    return out.to(u.dtype).to(u.device).reshape(u.shape)


def _mixture(prior: Prior) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from klviewer.priors.gaussian import GaussianMixturePrior, GaussianPrior

    if isinstance(prior, GaussianMixturePrior):
        return prior.weights, prior.means, prior.covs
    if isinstance(prior, GaussianPrior):
        return torch.ones(1, dtype=torch.float64, device=prior.mean.device), prior.mean[None], prior.cov[None]
    raise KlviewerError(f"marginal denoisers need a Gaussian or Gaussian-mixture prior, got '{prior.config.architecture}'")


# ---- sparse-view CT: the row space of A stands in for the observed coefficients -------------------

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
