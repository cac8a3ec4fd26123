"""Slices of one series share forward passes: every slice's numbers are its numbers alone, to rounding."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PRIOR_SIZE

from klviewer.errors import KlviewerInputError
from klviewer.inference.likelihood import MeasurementModel, stack_models
from klviewer.inference.measurements import collect_measurements, ct_measurement_model
from klviewer.inference.pipeline import (
    LoadedPrior,
    analyze_measurements,
    analyze_prepared,
    auto_slice_batch,
    can_share_batch,
)
from klviewer.inference.sampler import PosteriorRun, SamplerSettings, posterior_sample, posterior_sample_slices
from klviewer.inference.settings import AnalysisSettings
from klviewer.phantoms import make_phantom
from klviewer.physics.radon import ParallelBeamCT, sparse_view_angles

SETTINGS = AnalysisSettings(views=12, steps=8, samples=1, patch=8, noise_sigma=0.02, device="cpu")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("batch-study")
    kinds = [("healthy", 5), ("lesion", 6), ("healthy", 7), ("lesion", 8), ("healthy", 9)]
    hu = np.stack([make_phantom(kind, TINY_PRIOR_SIZE, seed).hu for kind, seed in kinds]).astype(np.float32)
    np.save(folder / "five.npy", hu)
    return folder


def _assert_same_run(batched: PosteriorRun, alone: PosteriorRun) -> None:
    assert batched.settings == alone.settings
    np.testing.assert_allclose(batched.energy.energy, alone.energy.energy, rtol=1e-3, atol=1e-4 * alone.energy.energy.max())
    np.testing.assert_allclose(batched.mean, alone.mean, atol=1e-4)
    np.testing.assert_allclose(batched.std, alone.std, atol=1e-4)
    assert batched.evaluations == alone.evaluations


@pytest.mark.parametrize("extra", [{}, {"samples": 3, "max_batch": 4},
                                   {"samples": 2, "branch_sigma": 0.5, "branch_steps": 3, "sigma_min": 0.05},
                                   {"guidance": "tmpd", "tmpd_iters": 3}])
def test_each_batched_slice_is_its_run_alone(tiny_prior: Path, study: Path, extra: dict) -> None:
    loaded = LoadedPrior.load(tiny_prior, "cpu")
    measured = collect_measurements([study], loaded.prior, SETTINGS, slices="0-2").slices
    models = [ct_measurement_model(m.prepared.acquisition, loaded.prior) for m in measured]
    seeds = [m.prepared.slice_seed for m in measured]
    settings = SamplerSettings(steps=8, **extra)
    batched = posterior_sample_slices(loaded.prior, models, settings, seeds)
    for run, model, seed in zip(batched, models, seeds):
        _assert_same_run(run, posterior_sample(loaded.prior, model, dataclasses.replace(settings, seed=seed)))
    # the slices differ, so a mix-up of whose chains are whose would show
    assert not np.allclose(batched[0].energy.energy, batched[1].energy.energy, rtol=0.05)


def test_progress_counts_every_chain_of_every_slice(tiny_prior: Path, study: Path) -> None:
    loaded = LoadedPrior.load(tiny_prior, "cpu")
    measured = collect_measurements([study], loaded.prior, SETTINGS, slices="0-1").slices
    models = [ct_measurement_model(m.prepared.acquisition, loaded.prior) for m in measured]
    seen: list[tuple[int, int]] = []
    posterior_sample_slices(loaded.prior, models, SamplerSettings(steps=5, samples=2, max_batch=3), [1, 2],
                            progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (2 * 2 * 5, 20) and all(t == 20 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_the_pipeline_batches_a_series_and_keeps_each_slices_numbers(tiny_prior: Path, study: Path) -> None:
    loaded = LoadedPrior.load(tiny_prior, "cpu")
    measurements = collect_measurements([study], loaded.prior, SETTINGS)
    steps: list[int] = []
    batched = [r for _m, r in analyze_measurements(measurements, loaded, SETTINGS, slice_batch=2,
                                                   progress=lambda d, t: steps.append(d))]
    assert len(batched) == 5 and steps[-1] == 5 * SETTINGS.step_count
    for measured, result in zip(measurements.slices, batched):
        alone = analyze_prepared(measured.prepared, loaded.prior, SETTINGS, prior_name=loaded.name, flag_threshold=None)
        assert result.score == pytest.approx(alone.score, rel=1e-3)
        assert result.total_kl == pytest.approx(alone.total_kl, rel=1e-3)
        np.testing.assert_allclose(result.recon_hu, alone.recon_hu, atol=0.05)
        assert result.seconds > 0


def test_slices_of_other_geometries_do_not_share_a_batch(tiny_prior: Path, study: Path) -> None:
    loaded = LoadedPrior.load(tiny_prior, "cpu")
    (a, b) = collect_measurements([study], loaded.prior, SETTINGS, slices="0-1").slices
    (c,) = collect_measurements([study], loaded.prior, dataclasses.replace(SETTINGS, views=16), slices="0").slices
    assert can_share_batch(a.prepared, b.prepared)
    assert not can_share_batch(a.prepared, c.prepared)
    models = [ct_measurement_model(m.prepared.acquisition, loaded.prior) for m in (a, c)]
    with pytest.raises(ValueError, match="one geometry"):
        stack_models(models, [0, 1])
    with pytest.raises(ValueError, match="one seed per model"):
        posterior_sample_slices(loaded.prior, models, SamplerSettings(steps=3), [1])


def test_same_geometry_compares_the_angles() -> None:
    op = ParallelBeamCT(16, sparse_view_angles(6))
    assert op.same_geometry(ParallelBeamCT(16, sparse_view_angles(6)))
    assert not op.same_geometry(ParallelBeamCT(16, sparse_view_angles(6) + 1e-3))
    assert not op.same_geometry(ParallelBeamCT(16, sparse_view_angles(6), pixel_spacing_mm=2.0))
    assert not op.same_geometry("not an operator")


def test_stacked_model_measures_each_chain_by_its_slice() -> None:
    op = ParallelBeamCT(16, sparse_view_angles(6))
    ys = [torch.full((1, 1, *op.sinogram_shape), float(v)) for v in (1, 2)]
    models = [MeasurementModel(op, y, 0.5, torch.ones_like(y)) for y in ys]
    stacked = stack_models(models, [1, 0, 1])
    assert stacked.y[:, 0, 0, 0].tolist() == [2.0, 1.0, 2.0]
    assert stack_models(models, [1, 1]) is models[1]


def test_auto_slice_batch_fills_the_chains_per_batch() -> None:
    cpu = torch.device("cpu")
    assert auto_slice_batch(AnalysisSettings(samples=1), cpu) == 4
    assert auto_slice_batch(AnalysisSettings(samples=4), cpu) == 1
    assert auto_slice_batch(AnalysisSettings(samples=8), cpu) == 1
    assert auto_slice_batch(AnalysisSettings(samples=1), torch.device("cuda")) == 16


def test_a_slice_batch_below_one_is_refused(tiny_prior: Path, study: Path) -> None:
    loaded = LoadedPrior.load(tiny_prior, "cpu")
    measurements = collect_measurements([study], loaded.prior, SETTINGS, slices="0")
    with pytest.raises(KlviewerInputError, match="slice batch"):
        list(analyze_measurements(measurements, loaded, SETTINGS, slice_batch=0))
