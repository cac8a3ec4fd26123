"""The measurement model in prior units, and the likelihood scores that guide the sampler.

Every guidance returns the likelihood score  l = grad_x log p(y | x_sigma)  (exact or
approximated). The sampler turns it into the update dx_lik = (sigma_i^2 - sigma_{i+1}^2) * l and
books 1/2 * dx_lik^2 / (g^2 dt) as KL energy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def shares_batch(a: MeasurementModel, b: MeasurementModel) -> bool:
    """Whether chains of the two models can share one batch: the same gain, and one operator or two with
    the same geometry (`same_geometry`)."""
    same = getattr(a.operator, "same_geometry", None)
    return a.gain == b.gain and (a.operator is b.operator or (same is not None and bool(same(b.operator))))


def stack_models(models: Sequence[MeasurementModel], owners: Sequence[int]) -> MeasurementModel:
    """The model of a batch whose element i is a chain of the slice measured by models[owners[i]].

    One owner gives its model back unchanged (its y broadcasts over the batch). Several get
    their measurements and noise variances stacked along the batch, with the first's operator.
    """
    if len(set(owners)) == 1:
        return models[owners[0]]
    first = models[owners[0]]
    if not all(shares_batch(first, models[j]) and models[j].y.shape[0] == 1 for j in owners):
        raise ValueError("slices batched together need one measurement each, with one geometry and gain")
    return MeasurementModel(operator=first.operator, y=torch.cat([models[j].y for j in owners]),
                            gain=first.gain, variance=torch.cat([models[j].variance for j in owners]))


_PHI_ROUNDING = 1e-5
"""Rise of the CG model phi taken as rounding, not divergence: in float32, phi is known to about
1e-7 of itself, and near convergence its true steps fall below that."""


def _batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.dim() - 1)))


@dataclass
class CGResult:
    solution: torch.Tensor
    iterations: int
    """Operator applications made (the initial residual counts one)."""
    relative_residual: torch.Tensor
    """||rhs - A x|| / ||rhs|| per batch element at the end, shaped like ``rhs``'s batch dot products."""


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, x0: torch.Tensor,
                       iters: int, tol: float = 0.0,
                       floor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> CGResult:
    """Solve apply(x) = rhs per batch element by conjugate gradients from x0.

    Stops after ``iters`` iterations, or once every element's residual is below ``tol`` times its
    right-hand side. With ``floor``, a positive definite operator that ``apply`` should dominate
    (apply - floor positive semi-definite), the solve is safeguarded like truncated CG: an
    element stops where it is when its search direction p has curvature p^T apply(p) at or
    below p^T floor(p), or when a step would raise the quadratic model
    phi(x) = 1/2 x^T apply(x) - x^T rhs = -1/2 x^T (rhs + residual), and it starts from zero
    where x0 is no better than that (phi(x0) >= 0). None of this happens for a symmetric
    operator that dominates ``floor`` and a useful x0; an operator built from a network's
    Jacobian need be neither symmetric nor definite.
    """
    x = x0.clone()
    r = rhs - apply(x)
    applications = 1
    p = r.clone()
    rs = _batch_dot(r, r)
    rhs_norm2 = _batch_dot(rhs, rhs).clamp_min(1e-30)
    active = torch.ones_like(rs, dtype=torch.bool)
    if floor is not None:  # a start no better than x = 0 (phi = 0) under the model is dropped
        phi = -0.5 * _batch_dot(x, rhs + r)
        worse = phi >= 0
        x, r, phi = torch.where(worse, 0.0, x), torch.where(worse, rhs, r), torch.where(worse, 0.0, phi)
        p, rs = r.clone(), _batch_dot(r, r)
    for _ in range(iters):
        if tol > 0:
            active = active & (rs > tol**2 * rhs_norm2)
            if not bool(active.any()):
                break
        ap = apply(p)
        applications += 1
        pap = _batch_dot(p, ap)
        active = active & (pap > (0 if floor is None else _batch_dot(p, floor(p))))
        alpha = torch.where(active, rs / pap.clamp_min(1e-30), torch.zeros_like(pap))
        x_next = x + alpha * p
        r_next = r - alpha * ap
        if floor is not None:
            phi_next = -0.5 * _batch_dot(x_next, rhs + r_next)
            active = active & (phi_next <= phi + _PHI_ROUNDING * phi.abs())
            phi = torch.where(active, phi_next, phi)
            x_next, r_next = torch.where(active, x_next, x), torch.where(active, r_next, r)
        x, r = x_next, r_next
        rs_new = _batch_dot(r, r)
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    return CGResult(x, applications, (rs / rhs_norm2).sqrt())


def data_consistent_estimate(model: MeasurementModel, x0_hat: torch.Tensor, r2: float, iters: int) -> torch.Tensor:
    """argmin_x 1/2 ||y - Kx||^2_W + 1/(2 r2) ||x - x0_hat||^2, by conjugate gradients from x0_hat.

    With x0 | x_sigma ~ N(x0_hat, r2 I) this is E[x0 | x_sigma, y]; it is exact for a Gaussian
    prior with isotropic covariance and an approximation otherwise.
    """
    rhs = model.data_term() + x0_hat / r2
    return conjugate_gradient(lambda v: model.normal(v) + v / r2, rhs, x0_hat, iters).solution


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


def tmpd_score(model: MeasurementModel, x: torch.Tensor, x0_hat: torch.Tensor, sigma: float, iters: int, tol: float,
               start: torch.Tensor | None = None) -> tuple[torch.Tensor, CGResult]:
    """grad_x log N(y; K D(x), sigma^2 K J K^T + variance), J = dD/dx: the Tweedie covariance
    Cov[x0 | x_sigma] = sigma^2 J in place of the isotropic r2 of `dc` and `pigdm` (TMPD,
    Boys et al. 2023, with the full covariance instead of its diagonal).

    The score is J^T K^T v with v = (sigma^2 K J K^T + variance)^-1 (y - K D(x)), solved by
    conjugate gradients in measurement space; each iteration is one vector-Jacobian product
    through the denoiser's retained graph (J^T for J: the Jacobian of an exact denoiser is
    symmetric, a Hessian of log p_sigma). For a Gaussian prior D is linear, the covariance
    does not depend on x, and the score is exact, so the summed KL energy converges to
    KL(p(x|y) || p(x)). `start` warm-starts the solve (the previous step's v).

    A network's Jacobian is neither symmetric nor positive semi-definite (with the shipped prior
    at sigma = 10, plain CG on this operator grew its residual 10^7-fold in 11 iterations). The
    solve is therefore safeguarded (`conjugate_gradient` with the noise covariance as floor): it
    stops where sigma^2 K J K^T has no positive curvature or a step would raise the CG model, and
    drops a warm start that is worse than zero. None of this triggers on a Gaussian prior.

    `x0_hat` must have been computed from `x` with autograd enabled. Returns the score and the
    solve (its `solution` is v, for the next warm start).
    """
    def jacobian_t(u: torch.Tensor, keep: bool = True) -> torch.Tensor:
        (g,) = torch.autograd.grad(x0_hat, x, grad_outputs=u, retain_graph=keep)
        return g

    def covariance(w: torch.Tensor) -> torch.Tensor:
        return sigma**2 * model.forward(jacobian_t(model.adjoint(w))) + model.variance * w

    residual = model.residual(x0_hat.detach())
    solve = conjugate_gradient(covariance, residual, torch.zeros_like(residual) if start is None else start, iters, tol,
                               floor=lambda w: model.variance * w)
    return jacobian_t(model.adjoint(solve.solution), keep=False), solve


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


class MatrixOperator:
    """A linear operator given by a dense (m, d) matrix on (B, *shape) inputs: small problems only
    (tests and benchmarks apply a CT or inpainting operator's matrix this way, far faster than the
    operator itself at 12x12)."""

    def __init__(self, matrix: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.matrix = matrix.to(torch.float32)
        self.shape = tuple(shape)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.matrix.to(x.dtype).T

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return (y.flatten(1) @ self.matrix.to(y.dtype)).view(y.shape[0], *self.shape)


def gaussian_posterior_kl(mean: torch.Tensor, cov: torch.Tensor, model: MeasurementModel, shape: tuple[int, ...]) -> float:
    """KL(p(x | y) || p(x)) in nats for the prior N(mean, cov) on images of ``shape`` and the linear
    Gaussian model: the value the summed KL energy converges to with the exact likelihood score."""
    k = dense_matrix(model, shape)
    precision_y = 1.0 / model.variance.to(torch.float64).flatten().expand(k.shape[0])
    mean, cov = mean.to(torch.float64).flatten(), cov.to(torch.float64)
    post_cov = torch.linalg.inv(torch.linalg.inv(cov) + k.T @ (precision_y[:, None] * k))
    y = model.y.to(torch.float64).flatten()
    post_mean = mean + post_cov @ (k.T @ (precision_y * (y - k @ mean)))
    diff = post_mean - mean
    return float(0.5 * (torch.trace(torch.linalg.solve(cov, post_cov)) + diff @ torch.linalg.solve(cov, diff)
                        - mean.numel() + torch.logdet(cov) - torch.logdet(post_cov)))


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
