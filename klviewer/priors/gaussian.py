"""Analytic priors whose denoiser is exact at every noise level: a Gaussian and a Gaussian mixture.

They are the ground truth for math tests (posterior means, Tweedie, path-KL identities) and for
the measurement-domain KL work. Each covariance is eigendecomposed once, so any sigma costs two
matrix products: ``Sigma (Sigma + s^2 I)^-1 = U diag(l / (l + s^2)) U^T``. Computation is float64;
outputs take the input's dtype.

Inputs are (B, *image_shape): (B, C, H, W) for images, or (B, d) for plain vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from klviewer.errors import KlviewerInputError
from klviewer.priors.base import Prior, PriorConfig, sigma_column

_LOG_2PI = math.log(2 * math.pi)


def _config(architecture: str, name: str, image_shape: Sequence[int], sigma_data: float, hu_offset: float,
            hu_scale: float, **arch) -> PriorConfig:
    shape = [int(n) for n in image_shape]
    image_size = tuple(shape[-2:]) if len(shape) >= 2 else (1, shape[0])
    return PriorConfig(name=name, architecture=architecture, image_size=image_size,
                       channels=shape[0] if len(shape) == 3 else 1, hu_offset=hu_offset, hu_scale=hu_scale,
                       sigma_data=max(sigma_data, 1e-6), arch={"image_shape": shape, **arch})


def _image_dim(config: PriorConfig) -> tuple[list[int], int]:
    """The config's image shape and its dimension, checked before anything is sized by them."""
    shape = config.arch["image_shape"]
    if not (isinstance(shape, list) and 1 <= len(shape) <= 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise ValueError(f"arch.image_shape must list 1 to 3 positive integers, got {str(shape)[:80]}")
    return shape, math.prod(shape)


def _components(config: PriorConfig) -> int:
    k = config.arch["components"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"arch.components must be a positive integer, got {str(k)[:80]}")
    return k


def _eigh(cov: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.allclose(cov, cov.transpose(-1, -2), atol=1e-10, rtol=1e-8):
        raise KlviewerInputError(None, f"{what} must be symmetric")
    diagonal = torch.diagonal(cov, dim1=-2, dim2=-1)
    if torch.equal(cov, torch.diag_embed(diagonal)):
        # Diagonal (the placeholder `from_config` builds before the real weights are loaded): no
        # O(d^3) decomposition of a matrix that is about to be replaced.
        lam, order = diagonal.sort(dim=-1)
        vecs = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
        vecs = torch.gather(vecs, -1, order.unsqueeze(-2).expand_as(cov)).contiguous()
    else:
        lam, vecs = torch.linalg.eigh(cov)
    scale = lam.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
    if (lam < -1e-9 * scale).any():
        raise KlviewerInputError(None, f"{what} must be positive semi-definite (min eigenvalue {lam.min().item():.3g})")
    return lam.clamp_min(0.0), vecs


class _AnalyticPrior(Prior):
    """Shared plumbing: flattening, dtype handling, eigendecomposition refresh after loading."""

    image_shape: tuple[int, ...]

    def __init__(self, config: PriorConfig, image_shape: Sequence[int]) -> None:
        super().__init__(config)
        self.image_shape = tuple(int(n) for n in image_shape)
        self.dim = math.prod(self.image_shape)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh())

    def _refresh(self) -> None:
        raise NotImplementedError

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        # Any layout of the prior's number of values per item: a (1, H, W) image for an (H, W) prior,
        # as the analysis passes (B, C, H, W) whatever shape the config recorded.
        if math.prod(x.shape[1:]) != self.dim:
            raise ValueError(f"expected input of shape (B, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim).to(torch.float64)

    def _noise_var(self, sigma: float | torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        return sigma_column(sigma, flat) ** 2  # (B, 1)

    def _draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        device = self.eigvecs.device
        return torch.randn((n, self.dim), generator=generator, dtype=torch.float64).to(device)


class GaussianPrior(_AnalyticPrior):
    """N(mean, cov) with ``D(x; s) = mean + cov (cov + s^2 I)^-1 (x - mean)``."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, image_shape: Sequence[int], name: str = "gaussian",
                 hu_offset: float = 0.0, hu_scale: float = 1000.0) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        d = math.prod(int(n) for n in image_shape)
        if mean.shape != (d,) or cov.shape != (d, d):
            raise KlviewerInputError(None, f"image_shape {tuple(image_shape)} needs mean ({d},) and cov ({d}, {d}), "
                                           f"got {tuple(mean.shape)} and {tuple(cov.shape)}")
        sigma_data = math.sqrt(float(torch.diagonal(cov).mean().clamp_min(0)))
        super().__init__(_config("gaussian", name, image_shape, sigma_data, hu_offset, hu_scale), image_shape)
        self.register_buffer("mean", mean)
        self.register_buffer("cov", cov)
        self.register_buffer("eigvals", torch.empty(d, dtype=torch.float64), persistent=False)
        self.register_buffer("eigvecs", torch.empty(d, d, dtype=torch.float64), persistent=False)
        self._refresh()

    @classmethod
    def state_shapes(cls, config: PriorConfig) -> dict[str, tuple[int, ...]]:
        d = _image_dim(config)[1]
        return {"mean": (d,), "cov": (d, d)}

    @classmethod
    def from_config(cls, config: PriorConfig) -> GaussianPrior:
        shape, d = _image_dim(config)
        prior = cls(torch.zeros(d), torch.eye(d), shape, config.name, config.hu_offset, config.hu_scale)
        prior.config = config
        return prior

    def _refresh(self) -> None:
        lam, vecs = _eigh(self.cov, "cov")
        self.eigvals, self.eigvecs = lam, vecs

    def _project(self, flat: torch.Tensor) -> torch.Tensor:
        return (flat - self.mean) @ self.eigvecs

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        flat = self._flat(x)
        shrink = self.eigvals / (self.eigvals + self._noise_var(sigma, flat))
        out = self.mean + (self._project(flat) * shrink) @ self.eigvecs.T
        return out.to(x.dtype).reshape(x.shape)

    def log_prob(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """log N(x; mean, cov + sigma^2 I), shape (B,)."""
        flat = self._flat(x)
        var = self.eigvals + self._noise_var(sigma, flat)
        out = -0.5 * (self.dim * _LOG_2PI + torch.log(var).sum(-1) + (self._project(flat) ** 2 / var).sum(-1))
        return out.to(x.dtype)

    def posterior_cov(self, sigma: float) -> torch.Tensor:
        """Cov[x0 | x0 + sigma n] = (cov^-1 + sigma^-2 I)^-1 (d, d), float64; defined for singular cov too."""
        s2 = float(sigma) ** 2
        return (self.eigvecs * (self.eigvals * s2 / (self.eigvals + s2))) @ self.eigvecs.T

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        z = self._draw(n, generator)
        out = self.mean + (z * self.eigvals.sqrt()) @ self.eigvecs.T
        return out.to(dtype).reshape(n, *self.image_shape)


class GaussianMixturePrior(_AnalyticPrior):
    """sum_k w_k N(mean_k, cov_k); the noisy marginal is sum_k w_k N(mean_k, cov_k + s^2 I)."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor, image_shape: Sequence[int],
                 name: str = "gmm", hu_offset: float = 0.0, hu_scale: float = 1000.0) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        k, d = weights.shape[0], math.prod(int(n) for n in image_shape)
        if means.shape != (k, d) or covs.shape != (k, d, d):
            raise KlviewerInputError(None, f"{k} components of dimension {d} need means ({k}, {d}) and covs "
                                           f"({k}, {d}, {d}), got {tuple(means.shape)} and {tuple(covs.shape)}")
        if (weights < 0).any() or not weights.sum() > 0:
            raise KlviewerInputError(None, "mixture weights must be non-negative with a positive sum")
        weights = weights / weights.sum()
        total_var = (weights[:, None] * (torch.diagonal(covs, dim1=1, dim2=2) + means**2)).sum(0) - (
            weights[:, None] * means).sum(0) ** 2
        super().__init__(_config("gmm", name, image_shape, math.sqrt(float(total_var.mean().clamp_min(0))),
                                 hu_offset, hu_scale, components=k), image_shape)
        self.register_buffer("weights", weights)
        self.register_buffer("means", means)
        self.register_buffer("covs", covs)
        self.register_buffer("eigvals", torch.empty(k, d, dtype=torch.float64), persistent=False)
        self.register_buffer("eigvecs", torch.empty(k, d, d, dtype=torch.float64), persistent=False)
        self._refresh()

    @classmethod
    def state_shapes(cls, config: PriorConfig) -> dict[str, tuple[int, ...]]:
        d, k = _image_dim(config)[1], _components(config)
        return {"weights": (k,), "means": (k, d), "covs": (k, d, d)}

    @classmethod
    def from_config(cls, config: PriorConfig) -> GaussianMixturePrior:
        (shape, d), k = _image_dim(config), _components(config)
        prior = cls(torch.ones(k), torch.zeros(k, d), torch.eye(d).expand(k, d, d).clone(), shape, config.name,
                    config.hu_offset, config.hu_scale)
        prior.config = config
        return prior

    def _refresh(self) -> None:
        lam, vecs = _eigh(self.covs, "covs")
        self.eigvals, self.eigvecs = lam, vecs

    def _components(self, flat: torch.Tensor, sigma: float | torch.Tensor):
        """Per component: coordinates in its eigenbasis (K, B, d), noisy variances, log weight + log N."""
        z = torch.einsum("kbd,kde->kbe", flat[None] - self.means[:, None], self.eigvecs)
        var = self.eigvals[:, None, :] + self._noise_var(sigma, flat)[None]
        log_n = -0.5 * (self.dim * _LOG_2PI + torch.log(var).sum(-1) + (z**2 / var).sum(-1))
        return z, var, torch.log(self.weights)[:, None] + log_n

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        flat = self._flat(x)
        z, var, logits = self._components(flat, sigma)
        resp = torch.softmax(logits, dim=0)  # (K, B), stable for far-apart components
        d_k = self.means[:, None] + torch.einsum("kbe,kde->kbd", z * (self.eigvals[:, None, :] / var), self.eigvecs)
        out = (resp[..., None] * d_k).sum(0)
        return out.to(x.dtype).reshape(x.shape)

    def log_prob(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """log p_sigma(x) = log sum_k w_k N(x; mean_k, cov_k + sigma^2 I), shape (B,)."""
        _, _, logits = self._components(self._flat(x), sigma)
        return torch.logsumexp(logits, dim=0).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        component = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        component = component.to(self.eigvecs.device)
        z = self._draw(n, generator) * self.eigvals[component].sqrt()
        out = self.means[component] + torch.einsum("nd,ned->ne", z, self.eigvecs[component])
        return out.to(dtype).reshape(n, *self.image_shape)


def matern_covariance(image_size: tuple[int, int], lengths: tuple[float, float], variance: float, nu: float = 1.5,
                      nugget: float = 1e-3) -> torch.Tensor:
    """Matérn covariance (d, d), d = H * W, of an anisotropic stationary field on the pixel grid.

    ``lengths`` are the correlation lengths in pixels along rows and columns; ``nu`` is 0.5
    (exponential), 1.5, 2.5 or ``inf`` (squared exponential). ``nugget`` adds white variance so
    the matrix is well conditioned. Float64. Used for Gaussian test problems.
    """
    h, w = int(image_size[0]), int(image_size[1])
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    points = torch.stack([rows.flatten() / float(lengths[0]), cols.flatten() / float(lengths[1])], 1)
    r = torch.cdist(points, points)
    if nu == 0.5:
        k = torch.exp(-r)
    elif nu == 1.5:
        k = (1 + math.sqrt(3) * r) * torch.exp(-math.sqrt(3) * r)
    elif nu == 2.5:
        k = (1 + math.sqrt(5) * r + 5 * r**2 / 3) * torch.exp(-math.sqrt(5) * r)
    elif math.isinf(nu):
        k = torch.exp(-0.5 * r**2)
    else:
        raise KlviewerInputError(None, f"Matérn nu must be 0.5, 1.5, 2.5 or inf, got {nu}")
    return variance * k + nugget * torch.eye(h * w, dtype=torch.float64)
