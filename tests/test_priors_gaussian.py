"""Analytic priors: exact denoisers against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from klviewer.errors import KlviewerInputError
from klviewer.priors import GaussianMixturePrior, GaussianPrior
from klviewer.priors.report import denoising_mse

F64 = torch.float64


def random_cov(d: int, seed: int, jitter: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
    return a @ a.T + jitter * torch.eye(d, dtype=F64)


def brute_force_posterior_mean(log_prior, y: torch.Tensor, sigma: float, half_width: float = 8.0,
                               n: int = 801) -> torch.Tensor:
    """E[x0 | y] in 2-D by summing over a grid: p(x0 | y) ~ p(x0) N(y; x0, sigma^2 I)."""
    axis = torch.linspace(-half_width, half_width, n, dtype=F64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    logw = log_prior(grid) - ((grid - y) ** 2).sum(-1) / (2 * sigma**2)
    w = torch.softmax(logw, dim=0)
    return (w[:, None] * grid).sum(0)


def test_gaussian_denoiser_matches_brute_force_in_2d() -> None:
    mean = torch.tensor([0.5, -1.0], dtype=F64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64)
    prior = GaussianPrior(mean, cov, (2,))
    dist = torch.distributions.MultivariateNormal(mean, cov)
    y = torch.tensor([[1.3, 0.4]], dtype=F64)
    for sigma in (0.3, 1.0):
        expected = brute_force_posterior_mean(dist.log_prob, y[0], sigma)
        assert torch.allclose(prior.denoise(y, sigma)[0], expected, atol=1e-6)


def test_gaussian_denoiser_and_posterior_cov_closed_form_256d() -> None:
    d = 256
    cov = random_cov(d, 0)
    mean = torch.randn(d, dtype=F64, generator=torch.Generator().manual_seed(1))
    prior = GaussianPrior(mean, cov, (1, 16, 16))
    x = torch.randn(3, 1, 16, 16, dtype=F64, generator=torch.Generator().manual_seed(2))
    eye = torch.eye(d, dtype=F64)
    for sigma in (0.01, 0.5, 20.0):
        flat = x.reshape(3, d)
        expected = mean + (cov @ torch.linalg.solve(cov + sigma**2 * eye, (flat - mean).T)).T
        assert torch.allclose(prior.denoise(x, sigma).reshape(3, d), expected, atol=1e-9)
        post = torch.linalg.inv(torch.linalg.inv(cov) + eye / sigma**2)
        assert torch.allclose(prior.posterior_cov(sigma), post, atol=1e-9)
    # float32 images in, float32 out.
    assert prior.denoise(x.float(), 0.1).dtype == torch.float32


def test_gaussian_log_prob_and_score() -> None:
    cov = random_cov(5, 3)
    mean = torch.arange(5, dtype=F64)
    prior = GaussianPrior(mean, cov, (5,))
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    sigma = 0.4
    expected = torch.distributions.MultivariateNormal(mean, cov + sigma**2 * torch.eye(5, dtype=F64)).log_prob(x)
    assert torch.allclose(prior.log_prob(x, sigma), expected, atol=1e-10)
    (grad,) = torch.autograd.grad(prior.log_prob(x, sigma).sum(), x)
    assert torch.allclose(prior.score(x.detach(), sigma), grad, atol=1e-9)


def test_gaussian_samples_have_the_right_moments() -> None:
    cov = random_cov(3, 4)
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    prior = GaussianPrior(mean, cov, (3,))
    s = prior.sample(40_000, torch.Generator().manual_seed(0), dtype=F64)
    assert torch.allclose(s.mean(0), mean, atol=0.03)
    assert torch.allclose(torch.cov(s.T), cov, atol=0.03)
    again = prior.sample(5, torch.Generator().manual_seed(0))
    assert torch.equal(again, prior.sample(5, torch.Generator().manual_seed(0)))


def test_gaussian_rejects_bad_parameters() -> None:
    with pytest.raises(KlviewerInputError, match="mean"):
        GaussianPrior(torch.zeros(3), torch.eye(4), (4,))
    with pytest.raises(KlviewerInputError, match="positive semi-definite"):
        GaussianPrior(torch.zeros(2), torch.diag(torch.tensor([1.0, -1.0])), (2,))
    with pytest.raises(KlviewerInputError, match="symmetric"):
        GaussianPrior(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]), (2,))


def gmm(d: int = 10, k: int = 3, seed: int = 0, spread: float = 3.0) -> GaussianMixturePrior:
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(k, d, generator=g, dtype=F64)
    covs = torch.stack([random_cov(d, seed + 10 + i, jitter=0.1) for i in range(k)])
    weights = torch.rand(k, generator=g, dtype=F64) + 0.2
    return GaussianMixturePrior(weights, means, covs, (d,))


@pytest.mark.parametrize("d", [2, 10])
def test_gmm_denoiser_is_tweedie_of_its_log_prob(d: int) -> None:
    prior = gmm(d)
    x = 3 * torch.randn(6, d, dtype=F64, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.01, 0.1, 0.3, 1.0, 3.0, 30.0], dtype=F64)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(prior.log_prob(xg, sigma).sum(), xg)
    tweedie = x + sigma[:, None] ** 2 * grad
    assert torch.allclose(prior.denoise(x, sigma), tweedie, atol=1e-8, rtol=1e-8)


def test_gmm_denoiser_matches_brute_force_in_2d() -> None:
    prior = gmm(2, k=3, seed=1, spread=2.0)
    y = torch.tensor([[0.7, -0.2]], dtype=F64)
    for sigma in (0.2, 1.5):
        expected = brute_force_posterior_mean(lambda g: prior.log_prob(g, 0.0), y[0], sigma, half_width=12.0)
        assert torch.allclose(prior.denoise(y, sigma)[0], expected, atol=1e-5)


def test_one_component_mixture_is_the_gaussian() -> None:
    cov = random_cov(4, 7)
    mean = torch.randn(4, dtype=F64)
    single = GaussianPrior(mean, cov, (4,))
    mixture = GaussianMixturePrior(torch.ones(1), mean[None], cov[None], (4,))
    x = torch.randn(5, 4, dtype=F64)
    assert torch.allclose(single.denoise(x, 0.7), mixture.denoise(x, 0.7), atol=1e-12)
    assert torch.allclose(single.log_prob(x, 0.7), mixture.log_prob(x, 0.7), atol=1e-10)


def test_gmm_is_stable_far_from_every_component() -> None:
    prior = gmm(10, spread=1.0)
    x = torch.full((2, 10), 1e4, dtype=F64)
    out = prior.denoise(x, 0.01)
    assert torch.isfinite(out).all() and torch.isfinite(prior.log_prob(x, 0.01)).all()


def test_gmm_samples_follow_the_weights() -> None:
    weights = torch.tensor([0.2, 0.8], dtype=F64)
    means = torch.tensor([[-10.0, 0.0], [10.0, 0.0]], dtype=F64)
    covs = torch.eye(2, dtype=F64).expand(2, 2, 2).clone()
    prior = GaussianMixturePrior(weights, means, covs, (2,))
    s = prior.sample(20_000, torch.Generator().manual_seed(0), dtype=F64)
    assert float((s[:, 0] > 0).double().mean()) == pytest.approx(0.8, abs=0.015)


def test_image_shaped_mixture_works_on_batches_of_images() -> None:
    d = 16 * 16
    prior = GaussianMixturePrior(torch.ones(2), torch.randn(2, d, dtype=F64),
                                 torch.stack([random_cov(d, 1), random_cov(d, 2)]), (1, 16, 16))
    x = torch.randn(3, 1, 16, 16)
    out = prior.denoise(x, torch.tensor([0.1, 0.2, 0.3]))
    assert out.shape == x.shape and out.dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        prior.denoise(torch.randn(3, 1, 8, 8), 0.1)


def test_denoising_mse_of_an_exact_prior_is_the_posterior_variance() -> None:
    d = 64
    cov = random_cov(d, 9)
    prior = GaussianPrior(torch.zeros(d, dtype=F64), cov, (1, 8, 8))
    images = prior.sample(2000, torch.Generator().manual_seed(1))
    for row in denoising_mse(prior, images, sigmas=(0.1, 1.0), batch=500):
        expected = float(torch.trace(prior.posterior_cov(row.sigma))) / d
        assert row.mse == pytest.approx(expected, rel=0.05)
