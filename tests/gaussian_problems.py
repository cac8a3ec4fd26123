"""Gaussian inverse problems whose KL(p(x|y) || p(x)) is known in closed form.

A Matérn Gaussian prior on a small image, a linear operator (inpainting or parallel-beam CT),
and one measurement y of an image drawn from the prior, optionally with a bright blob added
(an atypical y). The operator is applied as its dense matrix: the same linear map as the
operator, far faster at 12x12. Used by the guidance tests and `benchmarks/bench_guidance_bias.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from klviewer.inference.likelihood import MatrixOperator, MeasurementModel, dense_matrix, gaussian_posterior_kl
from klviewer.physics.inpainting import Inpainting, random_mask
from klviewer.physics.radon import ParallelBeamCT, sparse_view_angles
from klviewer.priors.gaussian import GaussianPrior, matern_covariance


@dataclass
class GaussianProblem:
    prior: GaussianPrior
    model: MeasurementModel
    kl: float
    """Closed-form KL(p(x|y) || p(x)), nats."""


def matern_prior(n: int, lengths: tuple[float, float], variance: float, nu: float, mean: float, seed: int,
                 nugget: float = 1e-3) -> GaussianPrior:
    """n x n Matérn prior whose mean is `mean` plus a small random pattern (std 0.1)."""
    g = torch.Generator().manual_seed(seed)
    pattern = mean + 0.1 * torch.randn(n * n, generator=g, dtype=torch.float64)
    return GaussianPrior(pattern, matern_covariance((n, n), lengths, variance, nu, nugget), (1, n, n))


def inpainting(n: int, keep: float, seed: int) -> Inpainting:
    return Inpainting(random_mask((1, 1, n, n), keep, torch.Generator().manual_seed(seed)))


def ct(n: int, views: int) -> ParallelBeamCT:
    return ParallelBeamCT(n, sparse_view_angles(views))


def gaussian_problem(prior: GaussianPrior, operator, relative_noise: float, seed: int,
                     blob: float = 0.0) -> GaussianProblem:
    """Measure an image drawn from `prior` (plus a disc of radius n/6 and height `blob` off centre)
    with noise std `relative_noise` times the RMS of the noise-free measurement."""
    shape = (1, *prior.config.image_size)
    g = torch.Generator().manual_seed(seed)
    x = prior.sample(1, g)
    if blob:
        n = shape[-1]
        rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        x = x + blob * (((rows - 0.3 * n) ** 2 + (cols - 0.65 * n) ** 2) <= (n / 6) ** 2).float()
    k = dense_matrix(MeasurementModel(operator, operator.A(x), 1.0, torch.tensor(1.0)), shape)
    observed = k.abs().sum(1) > 0  # inpainting's matrix has a zero row per unobserved pixel
    dense = MatrixOperator(k[observed], shape)
    clean = dense.A(x)
    variance = float((relative_noise * clean.pow(2).mean().sqrt()) ** 2)
    y = clean + variance**0.5 * torch.randn(clean.shape, generator=g)
    model = MeasurementModel(dense, y, 1.0, torch.tensor(variance))
    return GaussianProblem(prior, model, gaussian_posterior_kl(prior.mean, prior.cov, model, shape))


def sparse_ct_problem() -> GaussianProblem:
    """A 10 x 10 Matérn prior measured by 6-view CT at 3 % noise (seeds 35, 36): the problem the sampler's
    chain-structure tests (branches, trunks, antithetic pairs) share; no screening setting was chosen on it."""
    prior = matern_prior(10, (2.0, 3.5), 0.15, 2.5, 0.2, seed=35, nugget=2e-3)
    return gaussian_problem(prior, ct(10, 6), 0.03, seed=36)
