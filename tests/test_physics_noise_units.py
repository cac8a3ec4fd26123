"""Noise models (statistics, seeds, variances), HU <-> attenuation, and the inpainting operator."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from klviewer.physics.inpainting import Inpainting, random_mask
from klviewer.physics.noise import ZERO_COUNT_FLOOR, GaussianNoise, PoissonNoise, from_counts
from klviewer.physics.units import MU_WATER_PER_MM, hu_to_mu, mu_to_hu


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_mu_water_is_nist_water_at_70_kev() -> None:
    assert MU_WATER_PER_MM == pytest.approx(0.1929 / 10)


def test_hu_mu_round_trip_numpy_and_torch() -> None:
    hu = np.array([-1000.0, 0.0, 1000.0, 40.0], dtype=np.float32)
    mu = hu_to_mu(hu)
    assert isinstance(mu, np.ndarray) and mu.dtype == np.float32
    np.testing.assert_allclose(mu[:3], [0.0, MU_WATER_PER_MM, 2 * MU_WATER_PER_MM], rtol=1e-6)
    np.testing.assert_allclose(mu_to_hu(mu), hu, atol=1e-3)
    t = torch.linspace(-1024, 3000, 50)
    mu_t = hu_to_mu(t, mu_water=0.02)
    assert isinstance(mu_t, torch.Tensor)
    torch.testing.assert_close(mu_t, 0.02 * (1 + t / 1000))
    torch.testing.assert_close(mu_to_hu(mu_t, mu_water=0.02), t, atol=1e-3, rtol=0)


def test_gaussian_noise_statistics_and_seeds() -> None:
    p = torch.full((4, 1, 50, 100), 2.0)
    model = GaussianNoise(0.05)
    y = model.sample(p, _gen(3))
    torch.testing.assert_close(y, model.sample(p, _gen(3)), rtol=0, atol=0)
    assert not torch.equal(y, model.sample(p, _gen(4)))
    residual = y - p
    assert float(residual.mean()) == pytest.approx(0.0, abs=2e-3)  # 6 standard errors
    assert float(residual.std()) == pytest.approx(0.05, rel=0.03)
    torch.testing.assert_close(model.variance(y), torch.full_like(y, 0.0025))
    free = GaussianNoise(0.0)
    torch.testing.assert_close(free.sample(p, _gen(0)), p, rtol=0, atol=0)
    with pytest.raises(ValueError):
        GaussianNoise(-1.0)


def test_poisson_counts_have_poisson_mean_and_variance() -> None:
    i0, p_value = 1e4, 1.5
    model = PoissonNoise(i0)
    p = torch.full((20000,), p_value)
    counts = model.sample_counts(p, _gen(0))
    expected = i0 * math.exp(-p_value)  # 2231 photons
    assert float(counts.mean()) == pytest.approx(expected, rel=1e-3)  # 6 standard errors
    assert float(counts.var()) == pytest.approx(expected, rel=0.05)
    assert torch.equal(counts, counts.round())


def test_poisson_line_integral_variance_matches_the_model() -> None:
    model = PoissonNoise(5e4)
    p = torch.tensor([0.5, 2.0, 4.0]).repeat(20000, 1)
    y = model.sample(p, _gen(1))
    torch.testing.assert_close(y, model.sample(p, _gen(1)), rtol=0, atol=0)
    empirical = y.var(dim=0)
    predicted = model.variance(p[0])
    np.testing.assert_allclose(predicted.numpy(), np.exp([0.5, 2.0, 4.0]) / 5e4, rtol=1e-6)
    # Delta method, 1 / expected counts; good to a few % for 900+ expected counts.
    np.testing.assert_allclose(empirical.numpy(), predicted.numpy(), rtol=0.05)
    np.testing.assert_allclose(y.mean(dim=0).numpy(), [0.5, 2.0, 4.0], atol=0.01)


def test_zero_counts_are_floored() -> None:
    i0 = 100.0
    y = PoissonNoise(i0).sample(torch.full((1000,), 30.0), _gen(0))  # expected counts ~ 1e-11
    torch.testing.assert_close(y, torch.full_like(y, math.log(i0 / ZERO_COUNT_FLOOR)))
    torch.testing.assert_close(from_counts(torch.tensor([0.0, 100.0, 10.0]), i0), torch.tensor([math.log(200.0), 0.0, math.log(10.0)]))
    assert float(PoissonNoise(i0).variance(y[:1])) == pytest.approx(1 / ZERO_COUNT_FLOOR)


def test_describe_is_json() -> None:
    assert json.loads(json.dumps(GaussianNoise(0.1).describe())) == {"model": "gaussian", "sigma": 0.1}
    assert json.loads(json.dumps(PoissonNoise(1e5).describe()))["i0"] == 1e5
    with pytest.raises(ValueError):
        PoissonNoise(0.0)


def test_inpainting_adjoint_and_pseudo_inverse() -> None:
    g = _gen(5)
    mask = random_mask((16, 12), keep_prob=0.3, generator=g)
    op = Inpainting(mask)
    x, y = torch.randn(2, 3, 16, 12, generator=g), torch.randn(2, 3, 16, 12, generator=g)
    assert float((op.A(x) * y).sum()) == pytest.approx(float((x * op.A_adjoint(y)).sum()), rel=1e-6)
    torch.testing.assert_close(op.A(op.A_dagger(op.A(x))), op.A(x))
    soft = Inpainting(torch.tensor([[0.0, 0.5], [1.0, 2.0]])[None, None].expand(2, 1, 2, 2))
    torch.testing.assert_close(soft.A_dagger(torch.ones(2, 1, 2, 2))[0, 0], torch.tensor([[0.0, 2.0], [1.0, 0.5]]))
    assert op.describe()["kept_fraction"] == pytest.approx(float(mask.float().mean()))


def test_random_mask_keep_fraction_and_seed() -> None:
    a = random_mask((2, 1, 200, 200), 0.25, _gen(9))
    assert a.dtype == torch.bool and a.shape == (2, 1, 200, 200)
    assert float(a.float().mean()) == pytest.approx(0.25, abs=0.005)
    assert torch.equal(a, random_mask((2, 1, 200, 200), 0.25, _gen(9)))
    with pytest.raises(ValueError):
        random_mask((4, 4), 1.5, _gen(0))
