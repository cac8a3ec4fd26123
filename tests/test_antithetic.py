"""Antithetic chains: sample 2i + 1 draws sample 2i's noise negated, at the start and at every step.

Each chain is still a posterior chain, so the mean energy keeps its expectation (the closed-form KL
with the exact Gaussian score). On a Gaussian problem the chain is affine in its noise, so a pair's
mean state is the noise-free path whatever the seed, and the pair's energy loses the part of its
spread that is linear in the noise. The problem (10 x 10 Matérn prior, seed 35) is the branched
schedule's; no screening setting was chosen on it.
"""

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gaussian_problems import sparse_ct_problem  # noqa: E402

from klviewer.errors import KlviewerInputError  # noqa: E402
from klviewer.inference.sampler import SamplerSettings, merge_runs, posterior_sample  # noqa: E402
from klviewer.inference.settings import AnalysisSettings  # noqa: E402

EXACT = dict(steps=100, guidance="exact")


@pytest.fixture(scope="module")
def problem():
    return sparse_ct_problem()


def test_a_pairs_mean_is_the_noise_free_path_on_a_gaussian_problem(problem) -> None:
    """The pair's two chains are reflections of each other about the noise-free path: their mean is
    the same for every seed (float32 rounding only), and they differ from each other."""
    means = [posterior_sample(problem.prior, problem.model, SamplerSettings(samples=2, seed=s, antithetic=True, **EXACT)).mean
             for s in (1, 2)]
    independent = [posterior_sample(problem.prior, problem.model, SamplerSettings(samples=2, seed=s, **EXACT)).mean
                   for s in (1, 2)]
    scale = np.abs(means[0]).max()
    assert np.abs(means[0] - means[1]).max() < 1e-4 * scale
    assert np.abs(independent[0] - independent[1]).max() > 1e-2 * scale


def test_antithetic_energy_keeps_its_expectation_and_cancels_the_part_linear_in_the_noise(problem) -> None:
    """64 runs of one pair each against 64 runs of two independent chains. The mean energy is the same
    (both carry the 100-step schedule's bias, +4 % here). Above sigma 1 a step's energy is nearly linear
    in the noise, and the pair's varies about half as much (measured: variance ratio 0.50); in the
    detection window it is quadratic, the pair's two energies are positively correlated and vary more
    (measured: 1.40), which is why antithetic pairs are no free lunch (docs/screening.md)."""
    runs = {a: [posterior_sample(problem.prior, problem.model, SamplerSettings(samples=2, seed=s, antithetic=a, **EXACT))
                for s in range(64)] for a in (False, True)}

    def energies(window):
        return {a: np.array([r.energy.total(window) for r in rs]) for a, rs in runs.items()}

    total, high, window = energies(None), energies((1.0, 10.0)), energies((0.01, 0.05))
    assert total[True].mean() == pytest.approx(total[False].mean(), rel=0.03)
    assert total[True].mean() == pytest.approx(problem.kl, rel=0.06)
    assert high[True].var() / high[False].var() < 0.75
    assert window[True].var() / window[False].var() > 1.0


def test_pairs_added_later_are_the_pairs_of_one_run(problem) -> None:
    """Two more samples (stream 2 and its reflection) continue a run of two, as escalation adds them."""
    settings = SamplerSettings(samples=2, seed=4, antithetic=True, **EXACT)
    merged = merge_runs(posterior_sample(problem.prior, problem.model, settings),
                        posterior_sample(problem.prior, problem.model, replace(settings, first_sample=2)))
    whole = posterior_sample(problem.prior, problem.model, replace(settings, samples=4))
    np.testing.assert_allclose(merged.energy.energy, whole.energy.energy, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-4, atol=1e-6)


def test_antithetic_chains_are_independent_chains_and_are_named() -> None:
    with pytest.raises(KlviewerInputError, match="antithetic"):
        SamplerSettings(samples=2, antithetic=True, branch_sigma=0.05, branch_steps=4).validate()
    settings = AnalysisSettings(samples=2, antithetic=True)
    assert "2 antithetic sample(s)" in settings.describe_chains()
    assert settings.changed_extras() == {"antithetic": True}
    assert AnalysisSettings.from_dict(settings.to_dict()) == settings
