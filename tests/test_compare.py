"""Before/after comparison: same measurements for both priors, per-case numbers, shift curves, outputs."""

from __future__ import annotations

import csv
import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PRIOR_SIZE

from klviewer.errors import KlviewerInputError
from klviewer.evaluation.compare import (
    CSV_COLUMNS,
    METRIC_KEYS,
    compare_priors,
    slice_metrics,
    write_comparison,
)
from klviewer.evaluation.metrics import psnr_hu, ssim_hu
from klviewer.inference.measurements import collect_measurements, ct_measurement_model
from klviewer.inference.pipeline import analyze_prepared
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.safe_write import OutputExistsError
from klviewer.phantoms import make_phantom
from klviewer.priors import EDMUNetPrior, PriorConfig, load_prior, save_prior
from klviewer.priors.checkpoint import prior_fingerprint
from klviewer.results.slice_file import load_slice_result

SETTINGS = AnalysisSettings(views=8, steps=4, device="cpu")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cmp-study")
    hu = np.stack([make_phantom("healthy", TINY_PRIOR_SIZE, seed).hu for seed in (5, 6)]).astype(np.float32)
    np.save(folder / "pair.npy", hu)
    return folder


@pytest.fixture(scope="module")
def other_prior(tiny_prior: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny prior with perturbed weights: same grid and mapping, another denoiser."""
    prior = load_prior(tiny_prior)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prior.config.name = "tiny-other"
    return save_prior(prior, tmp_path_factory.mktemp("other") / "tiny-other")


def mismatched_prior(folder: Path, **changes) -> Path:
    config = PriorConfig(name="mismatch", architecture="edm-unet", image_size=(TINY_PRIOR_SIZE, TINY_PRIOR_SIZE),
                         arch={"channels": [8, 16], "emb_dim": 16, "fourier_features": 8, "groups": 4})
    return save_prior(EDMUNetPrior(dataclasses.replace(config, **changes)), folder)


def test_identical_priors_give_identical_numbers(tiny_prior: Path, study: Path) -> None:
    comparison = compare_priors(tiny_prior, tiny_prior, [study], SETTINGS)
    assert [(c.case, c.index) for c in comparison.cases] == [("pair.npy", 0), ("pair.npy", 1)]
    for case in comparison.cases:
        # The same measurement and the same sampler seed on both sides: nothing differs but the prior.
        assert case.metrics["before"] == case.metrics["after"]
        assert np.array_equal(case.before.recon_hu, case.after.recon_hu)
    assert comparison.shift_before is None and comparison.shift_after is None


def test_case_metrics_are_the_analysis_numbers(tiny_prior: Path, other_prior: Path, study: Path) -> None:
    done: list[tuple[int, int]] = []
    comparison = compare_priors(tiny_prior, other_prior, [study], SETTINGS, slices="1",
                                progress=lambda d, t: done.append((d, t)))
    (case,) = comparison.cases
    assert case.index == 1 and comparison.before_prior == "tiny-test" and comparison.after_prior == "tiny-other"
    assert done[-1] == (2 * SETTINGS.steps, 2 * SETTINGS.steps)
    for side in ("before", "after"):
        result, metrics = getattr(case, side), case.metrics[side]
        assert set(metrics) == set(METRIC_KEYS)
        assert metrics["score"] == result.score and metrics["total_kl"] == result.total_kl
        assert metrics["psnr"] == pytest.approx(psnr_hu(result.original_hu, result.recon_hu))
        assert metrics["ssim"] == pytest.approx(ssim_hu(result.original_hu, result.recon_hu))
    assert case.metrics["before"]["psnr"] != case.metrics["after"]["psnr"]
    assert comparison.before_ref.sha256 == prior_fingerprint(tiny_prior)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # PSNR of the exact truth is infinite
def test_dc_residual_is_the_noise_for_the_truth_and_grows_with_the_misfit(tiny_prior: Path, study: Path) -> None:
    prior = load_prior(tiny_prior)
    settings = dataclasses.replace(SETTINGS, noise_sigma=0.01)
    (measured,) = collect_measurements([study], prior, settings, slices="0").slices
    result = analyze_prepared(measured.prepared, prior, settings, prior_name="tiny", flag_threshold=None)
    truth = np.maximum(measured.prepared.original_hu, -1000.0)  # what the simulation projected
    fits = slice_metrics(dataclasses.replace(result, recon_hu=truth), measured.prepared, prior)
    # y = A(truth) + noise of std 0.01, whitened by that std: the residual RMS is the noise, about 1.
    assert fits["dc_residual"] == pytest.approx(1.0, abs=0.05)
    off = slice_metrics(dataclasses.replace(result, recon_hu=truth + 50.0), measured.prepared, prior)
    # A uniform +50 HU adds 0.05 K(1) to every ray; the noise stays, so the squares add up.
    model = ct_measurement_model(measured.prepared.acquisition, prior)
    added = (0.05 * model.forward(torch.ones(1, 1, TINY_PRIOR_SIZE, TINY_PRIOR_SIZE)) / 0.01).pow(2).mean()
    assert off["dc_residual"] == pytest.approx(float(np.sqrt(fits["dc_residual"] ** 2 + float(added))), rel=0.05)
    assert off["dc_residual"] > 2.0


def test_sinogram_inputs_have_no_psnr(tiny_prior: Path, study: Path, tmp_path: Path) -> None:
    from klviewer.physics import simulate_measurement

    phantom = make_phantom("healthy", TINY_PRIOR_SIZE, 9)
    acq = simulate_measurement(phantom.hu, phantom.pixel_spacing_mm, n_views=8)
    np.save(tmp_path / "scan.npy", acq.y[:, 0].numpy())
    (tmp_path / "scan.json").write_text(json.dumps({
        "klviewer_sinogram": 1, "geometry": "parallel",
        "angles": {"unit": "rad", "values": acq.angles_rad.tolist()},
        "detector": {"count": acq.operator.n_detectors, "spacing_mm": acq.operator.detector_spacing_mm},
        "data": {"kind": "line_integrals", "file": "scan.npy"},
        "grid": {"size": [TINY_PRIOR_SIZE, TINY_PRIOR_SIZE], "pixel_spacing_mm": phantom.pixel_spacing_mm},
    }))
    (case,) = compare_priors(tiny_prior, tiny_prior, [tmp_path / "scan.json"], SETTINGS).cases
    assert case.metrics["before"]["psnr"] is None and case.metrics["before"]["ssim"] is None
    assert np.isfinite(case.metrics["before"]["dc_residual"])


def test_priors_on_other_grids_or_mappings_are_refused(tiny_prior: Path, study: Path, tmp_path: Path) -> None:
    small = mismatched_prior(tmp_path / "small", image_size=(16, 16))
    with pytest.raises(KlviewerInputError, match=r"config.json.*image size 1x32x32 vs 1x16x16"):
        compare_priors(tiny_prior, small, [study], SETTINGS)
    shifted = mismatched_prior(tmp_path / "shifted", hu_offset=-1000.0)
    with pytest.raises(KlviewerInputError, match="HU mapping"):
        compare_priors(tiny_prior, tiny_prior, [study], SETTINGS, reference=shifted)


def test_shift_curves_against_a_reference(tiny_prior: Path, other_prior: Path, study: Path) -> None:
    comparison = compare_priors(other_prior, tiny_prior, [study], SETTINGS, reference=tiny_prior)
    before, after = comparison.shift_before, comparison.shift_after
    assert before.domain == after.domain == "measurement" and before.n == after.n == 2
    # After is the reference itself: both denoisers agree everywhere, so the KL is exactly zero.
    assert after.total == 0.0
    assert before.total > 0.0 and np.all(np.diff(before.cumulative) >= 0)
    assert comparison.reference_ref.name == "tiny-test"


def test_write_comparison_layout_and_overwrite(tiny_prior: Path, other_prior: Path, study: Path, tmp_path: Path) -> None:
    comparison = compare_priors(tiny_prior, other_prior, [study], SETTINGS, reference=tiny_prior)
    out = write_comparison(comparison, tmp_path / "cmp")
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["before_prior"]["name"] == "tiny-test" and doc["after_prior"]["name"] == "tiny-other"
    assert doc["reference_prior"]["sha256"] == prior_fingerprint(tiny_prior)
    assert doc["settings"] == SETTINGS.to_dict()
    assert [(c["case"], c["slice_index"]) for c in doc["cases"]] == [("pair.npy", 0), ("pair.npy", 1)]
    assert doc["shift_kl"]["before"]["total"] == 0.0 and doc["shift_kl"]["after"]["total"] > 0
    for row, case in zip(doc["cases"], comparison.cases):
        for side in ("before", "after"):
            assert row[side]["psnr"] == pytest.approx(case.metrics[side]["psnr"], abs=1e-6)
            saved = load_slice_result(out / row["files"][side])
            assert np.array_equal(saved.recon_hu, getattr(case, side).recon_hu)
    means = comparison.means()
    assert doc["means"]["after"]["psnr"] == pytest.approx(np.mean([c.metrics["after"]["psnr"] for c in comparison.cases]))
    assert means["before"]["score"] == pytest.approx(np.mean([c.metrics["before"]["score"] for c in comparison.cases]))

    with open(out / "comparison.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == 2
    assert float(rows[1]["after_psnr"]) == pytest.approx(comparison.cases[1].metrics["after"]["psnr"], abs=1e-5)
    assert (out / "shift_kl.png").read_bytes().startswith(b"\x89PNG")

    with pytest.raises(OutputExistsError):
        write_comparison(comparison, out)
    write_comparison(comparison, out, overwrite=True)


def test_results_never_go_into_an_input_folder(tiny_prior: Path, study: Path) -> None:
    comparison = compare_priors(tiny_prior, tiny_prior, [study], SETTINGS, slices="0")
    with pytest.raises(KlviewerInputError, match="overlaps"):
        write_comparison(comparison, study / "results")
    assert not (study / "results").exists()


def test_cancel_stops_the_comparison_within_one_step(tiny_prior: Path, study: Path) -> None:
    from klviewer.inference.sampler import AnalysisCancelled

    cancel = threading.Event()
    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        cancel.set()

    with pytest.raises(AnalysisCancelled):
        compare_priors(tiny_prior, tiny_prior, [study], SETTINGS, progress=progress, cancel=cancel)
    assert calls == [2]  # one step of the two slices' chains, which share a batch
