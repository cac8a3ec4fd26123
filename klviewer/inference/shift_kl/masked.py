"""Measurement-domain KL under random operators ``H = P V^T`` sharing one orthonormal V.

Inpainting and masked Fourier are kept apart from CT because here E[P] is known in closed form
and the derived weighting is exact for product distributions along V; the marginal denoiser
(Gaussian / GMM priors) lets the validation check that exactness without a learned denoiser.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.inference.shift_kl.core import (
    _KEEP_FLOOR,
    Progress,
    ShiftCurve,
    _curve,
    _denoise,
    _Observations,
    _run,
    check_compatible,
    check_sigma_grid,
    default_sigma_grid,
)
from klviewer.physics.fourier import fft2c, ifft2c, line_keep_probabilities, random_line_mask
from klviewer.physics.inpainting import random_mask
from klviewer.priors.base import Prior

WEIGHTINGS: tuple[str, ...] = ("derived", "paper", "unweighted")
"""derived: 1/E[P] on observed coefficients (docs/shift_kl.md); paper: E[P]^-3 on all
coefficients, the square of the paper's printed W = E[P]^(-3/2); unweighted: plain squared
difference on all pixels (what the paper's released code records)."""

DENOISERS: tuple[str, ...] = ("zero-filled", "marginal")
"""zero-filled: the prior's own denoiser at the zero-filled measurement (any prior);
marginal: the exact denoiser of the observed coordinates' marginal (Gaussian / GMM priors,
inpainting). The default, "auto", takes marginal wherever it exists: on Gaussian-mixture pairs it
is the smaller bias at every observation rate measured (benchmarks/results/shift_bias.md)."""


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


def _resolve_denoiser(denoiser: str, p: Prior, q: Prior, family: MaskFamily) -> str:
    """The denoiser "auto" stands for: marginal where both priors have it (Gaussian or mixture
    priors, inpainting masks), else zero-filled. Any other name is returned as given."""
    if denoiser != "auto":
        return denoiser
    analytic = all(_has_mixture(prior) for prior in (p, q))
    return "marginal" if analytic and family.operator == "inpainting" else "zero-filled"


class _Masked(_Observations):
    domain = "measurement"
    weightings = WEIGHTINGS

    def __init__(self, measured: MaskedMeasurements, denoiser: str) -> None:
        if denoiser not in DENOISERS:
            raise KlviewerInputError(None, f"denoiser must be auto or one of {', '.join(DENOISERS)}, got {denoiser!r}")
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


RATE_STEP = 0.1
"""Extrapolation in the observation rate: the estimate at p and at p - RATE_STEP (the same
measurements with observed pixels dropped at random) give the line through both, read at p = 1."""


THINNING_STREAM = 1
"""Spawn key of the random stream that thins measurements, apart from the seed's own stream."""


def thin_measurements(measured: MaskedMeasurements, keep_prob: float, seed: int) -> MaskedMeasurements:
    """The same inpainting measurements seen at the lower rate ``keep_prob``: each observed pixel
    stays observed with probability keep_prob / p, so the masks are those of the family at keep_prob."""
    family = measured.family
    if family.operator != "inpainting" or not 0 < keep_prob <= family.p:
        raise KlviewerInputError(None, f"thinning needs inpainting measurements and 0 < rate <= {family.p}, "
                                       f"got {family.operator} at {keep_prob}")
    # A stream of its own: masks drawn with the same seed (simulate_masked) would make the draws here
    # the same numbers, so "keep" would be nearly the old mask and almost nothing would be dropped.
    stream = int(np.random.SeedSequence(int(seed), spawn_key=(THINNING_STREAM,)).generate_state(1)[0])
    drop = torch.rand(measured.masks.shape, generator=torch.Generator().manual_seed(stream)) < keep_prob / family.p
    masks = measured.masks & drop.to(measured.masks.device)
    thinner = inpainting_family(family.image_size, keep_prob)
    return MaskedMeasurements(thinner, masks, thinner.project(measured.zero_filled, masks))


def _offset(progress: Progress | None, done_before: int, total: int) -> Progress | None:
    return None if progress is None else (lambda done, _total: progress(done_before + done, total))


def measurement_kl_operator_curves(
    p: Prior, q: Prior, measured: MaskedMeasurements, *, sigmas: np.ndarray | None = None, seed: int = 0,
    batch: int = 64, denoiser: str = "auto", extrapolate: bool = False, progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, ShiftCurve]:
    """Measurement-domain KL(p || q) under every weighting of WEIGHTINGS, from one set of draws.

    ``extrapolate`` (inpainting, keep probability p > RATE_STEP): both biases of the estimator
    (dependent coordinates, zero-filling) vanish at p = 1, where nothing is missing. The estimate
    is also made from the same measurements thinned to p - RATE_STEP, on the same noise, and the
    line through the two is read at p = 1, per noise level (twice the denoiser calls).
    """
    check_compatible(p, q)
    grid = default_sigma_grid() if sigmas is None else check_sigma_grid(sigmas)
    chosen = _resolve_denoiser(denoiser, p, q, measured.family)
    obs = _Masked(measured, chosen)
    details = {"seed": seed, **obs.details()}
    if extrapolate and measured.family.p < 1:
        rate = measured.family.p
        if measured.family.operator != "inpainting" or rate <= RATE_STEP:
            raise KlviewerInputError(None, f"rate extrapolation needs inpainting with keep probability above {RATE_STEP}")
        thinned = _Masked(thin_measurements(measured, rate - RATE_STEP, seed), chosen)
        half = len(grid) * len(range(0, len(obs), batch))
        (at_p,) = _run(obs, p, [q], grid, seed, batch, _offset(progress, 0, 2 * half), cancel)
        (below,) = _run(thinned, p, [q], grid, seed, batch, _offset(progress, half, 2 * half), cancel)
        factor = (1.0 - rate) / RATE_STEP
        integrands = {w: at_p[w] + factor * (at_p[w] - below[w]) for w in WEIGHTINGS}
        details["extrapolated"] = {"from_keep_prob": rate, "via_keep_prob": rate - RATE_STEP, "to_keep_prob": 1.0}
    else:
        (integrands,) = _run(obs, p, [q], grid, seed, batch, progress, cancel)
    return {w: _curve(grid, integrands[w], len(obs), "measurement", obs.operator, w, details) for w in WEIGHTINGS}


def measurement_kl_operator(
    p: Prior, q: Prior, measured: MaskedMeasurements, *, sigmas: np.ndarray | None = None, seed: int = 0,
    batch: int = 64, weighting: str = "derived", denoiser: str = "auto", extrapolate: bool = False,
    progress: Progress | None = None, cancel: threading.Event | None = None,
) -> ShiftCurve:
    """Measurement-domain KL(p || q) from inpainting or masked-Fourier measurements of data from p.

    ``denoiser="zero-filled"`` evaluates each prior's denoiser at the noisy zero-filled
    measurement (any prior); ``"marginal"`` uses the exact denoiser of the observed coordinates'
    marginal (Gaussian / GMM priors, inpainting), for which the derived weighting is exact when p
    and q are product distributions over the coordinates; ``"auto"`` (the default) is marginal
    where it exists. ``details["denoiser"]`` says which ran. Both are biased for dependent
    coordinates, in opposite directions (docs/shift_kl.md, section 2); ``extrapolate`` removes
    most of either bias at p >= 0.7 (see measurement_kl_operator_curves).
    """
    if weighting not in WEIGHTINGS:
        raise KlviewerInputError(None, f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    return measurement_kl_operator_curves(p, q, measured, sigmas=sigmas, seed=seed, batch=batch, denoiser=denoiser,
                                          extrapolate=extrapolate, progress=progress, cancel=cancel)[weighting]


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


def _has_mixture(prior: Prior) -> bool:
    from klviewer.priors.gaussian import GaussianMixturePrior, GaussianPrior

    return isinstance(prior, (GaussianMixturePrior, GaussianPrior))


def _mixture(prior: Prior) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from klviewer.priors.gaussian import GaussianMixturePrior, GaussianPrior

    if isinstance(prior, GaussianMixturePrior):
        return prior.weights, prior.means, prior.covs
    if isinstance(prior, GaussianPrior):
        return torch.ones(1, dtype=torch.float64, device=prior.mean.device), prior.mean[None], prior.cov[None]
    raise KlviewerError(f"marginal denoisers need a Gaussian or Gaussian-mixture prior, got '{prior.config.architecture}'")
