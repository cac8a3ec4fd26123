"""The measurement model in prior units, and the likelihood scores that guide the sampler.

Every guidance returns the likelihood score  l = grad_x log p(y | x_sigma)  (exact or
approximated). The sampler turns it into the update dx_lik = (sigma_i^2 - sigma_{i+1}^2) * l and
books 1/2 * dx_lik^2 / (g^2 dt) as KL energy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from klviewer.errors import KlviewerInputError
from klviewer.physics.operator import LinearOperator


@dataclass
class MeasurementModel:
    """y = gain * A(x) + e,  e ~ N(0, variance), with x in the prior's units.

    For CT, `y` is the measured line integrals minus the projection of the constant part of the
    HU -> attenuation map, so the model is linear in x (see `ct_measurement_model`).
    """

    operator: LinearOperator
    y: torch.Tensor
    gain: float
    variance: torch.Tensor
    _data_term: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not torch.isfinite(self.y).all():
            raise KlviewerInputError(None, "the measurement holds NaN/inf values; refusing to reconstruct from it")
        if (self.variance <= 0).any():
            raise KlviewerInputError(None, "measurement noise variance must be positive")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * self.operator.A(x)

    def adjoint(self, r: torch.Tensor) -> torch.Tensor:
        return self.gain * self.operator.A_adjoint(r)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.y - self.forward(x)

    def data_term(self) -> torch.Tensor:
        """K^T W y, the same at every step, so it is computed once."""
        if self._data_term is None:
            self._data_term = self.adjoint(self.y / self.variance)
        return self._data_term

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """K^T W K x with W the noise precision: the Gauss-Newton curvature of the data term."""
        return self.adjoint(self.forward(x) / self.variance)


def _batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.dim() - 1)))


def data_consistent_estimate(model: MeasurementModel, x0_hat: torch.Tensor, r2: float, iters: int) -> torch.Tensor:
    """argmin_x 1/2 ||y - Kx||^2_W + 1/(2 r2) ||x - x0_hat||^2, by conjugate gradients from x0_hat.

    With x0 | x_sigma ~ N(x0_hat, r2 I) this is E[x0 | x_sigma, y]; it is exact for a Gaussian
    prior with isotropic covariance and an approximation otherwise.
    """
    rhs = model.data_term() + x0_hat / r2
    x = x0_hat.clone()
    r = rhs - (model.normal(x) + x / r2)
    p = r.clone()
    rs = _batch_dot(r, r)
    for _ in range(iters):
        ap = model.normal(p) + p / r2
        alpha = rs / _batch_dot(p, ap).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _batch_dot(r, r)
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    return x


def tweedie_dc_score(model: MeasurementModel, x0_hat: torch.Tensor, sigma: float, sigma_data: float, iters: int) -> torch.Tensor:
    """Likelihood score (E[x0 | x_sigma, y] - E[x0 | x_sigma]) / sigma^2, posterior of x0 taken as
    isotropic with the variance a N(0, sigma_data^2) prior would give at this noise level."""
    r2 = sigma**2 * sigma_data**2 / (sigma**2 + sigma_data**2)
    x0_post = data_consistent_estimate(model, x0_hat, r2, iters)
    return (x0_post - x0_hat) / sigma**2


def pigdm_score(model: MeasurementModel, x: torch.Tensor, x0_hat: torch.Tensor, sigma: float, sigma_data: float,
                iters: int) -> torch.Tensor:
    """PiGDM: grad_x log N(y; K D(x), r2 K K^T + variance), with the same isotropic r2 as `dc` but
    the denoiser's own Jacobian for dD/dx instead of the isotropic r2 / sigma^2.

    By Woodbury, K^T (r2 K K^T + variance)^-1 (y - K D(x)) = (x0_post - D(x)) / r2 with x0_post the
    `dc` estimate, so the score is one vector-Jacobian product through the denoiser. The Jacobian
    is local and structure-adaptive: it keeps what the prior can represent at this noise level and
    drops back-projection streaks in air and in flat tissue.

    `x0_hat` must have been computed from `x` with autograd enabled.
    """
    r2 = sigma**2 * sigma_data**2 / (sigma**2 + sigma_data**2)
    x0_post = data_consistent_estimate(model, x0_hat.detach(), r2, iters)
    (score,) = torch.autograd.grad(x0_hat, x, grad_outputs=(x0_post - x0_hat.detach()) / r2)
    return score


def dps_score(model: MeasurementModel, x: torch.Tensor, x0_hat: torch.Tensor, step_size: float, dsigma2: float) -> torch.Tensor:
    """DPS: the update is -step_size * grad_x ||y - K D(x)||_W (unsquared norm, per sample), taken
    through the denoiser; returned as the score it stands for, update / dsigma2.

    `x0_hat` must have been computed from `x` with autograd enabled.
    """
    residual = model.residual(x0_hat) / model.variance.sqrt()
    norms = residual.flatten(1).norm(dim=1)
    (grad,) = torch.autograd.grad(norms.sum(), x)
    return -step_size * grad / dsigma2


def dense_matrix(model: MeasurementModel, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """K as a dense (m, d) matrix, by applying it to the basis. For small problems (tests, GMMs)."""
    d = int(torch.tensor(shape).prod())
    basis = torch.eye(d, dtype=torch.float32).view(d, *shape)
    columns = model.forward(basis).flatten(1).to(dtype)
    return columns.T


@dataclass
class GaussianTerms:
    """A Gaussian prior N(mean, cov) and the dense K, factored once for exact guidance."""

    mean: torch.Tensor
    evals: torch.Tensor
    evecs: torch.Tensor
    k: torch.Tensor

    @classmethod
    def build(cls, mean: torch.Tensor, cov: torch.Tensor, k: torch.Tensor) -> "GaussianTerms":
        evals, evecs = torch.linalg.eigh(cov.to(torch.float64))
        return cls(mean.to(torch.float64).flatten(), evals, evecs, k.to(torch.float64))


def exact_gaussian_score(model: MeasurementModel, x: torch.Tensor, sigma: float, terms: GaussianTerms) -> torch.Tensor:
    """Exact grad_x log p(y | x_sigma) for a Gaussian prior and the linear model.

    p(x0 | x_sigma) = N(m, C) with C = (cov^-1 + I/sigma^2)^-1 and
    m = mean + cov (cov + sigma^2 I)^-1 (x_sigma - mean); so y | x_sigma ~ N(K m, K C K^T + diag(variance)),
    and the chain rule through m (dm/dx_sigma = C / sigma^2) gives the score.
    """
    v, lam = terms.evecs, terms.evals
    c = (v * (lam * sigma**2 / (lam + sigma**2))) @ v.T
    xs = x.flatten(1).to(torch.float64)
    m = terms.mean + ((xs - terms.mean) @ v) * (lam / (lam + sigma**2)) @ v.T
    k = terms.k
    s = k @ c @ k.T + torch.diag(model.variance.to(torch.float64).flatten().expand(k.shape[0]))
    resid = model.y.flatten(1).to(torch.float64) - m @ k.T
    score = (torch.linalg.solve(s, resid.T).T @ k) @ c / sigma**2
    return score.to(x.dtype).view_as(x)
