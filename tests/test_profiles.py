"""Profiles: named settings (`--profile`), each option given changing its profile, and calibration
entries that name a branched schedule without breaking the entries written before schedules existed."""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

from klviewer.cli import main
from klviewer.cli.options import add_measurement_options, add_sampler_options, settings_from_args
from klviewer.errors import KlviewerInputError
from klviewer.inference.calibration import PriorCalibration, calibration_key
from klviewer.inference.sampler import SamplerSettings
from klviewer.inference.settings import DEFAULT_PROFILE, PROFILES, AnalysisSettings, sampling_key
from klviewer.phantoms import make_phantom, save_phantom_npz
from klviewer.results.reader import checked_settings
from klviewer.results.slice_file import load_slice_result


def _parse(*options: str) -> AnalysisSettings:
    p = argparse.ArgumentParser()
    add_measurement_options(p)
    add_sampler_options(p, flag_help="")
    return settings_from_args(p.parse_args(list(options)))


BRANCHED = AnalysisSettings(steps=70, samples=4, patch=4, sigma_window=(0.01, 0.05), sigma_min=0.01, branch_sigma=0.1,
                            branch_steps=12, precision="bfloat16")
"""The branched settings measured in docs/screening.md (P2b)."""


def test_a_profile_is_changed_only_by_the_options_given() -> None:
    assert _parse() == replace(PROFILES[DEFAULT_PROFILE], device="auto")
    assert _parse("--profile", "fast") == replace(PROFILES["fast"], device="auto")
    assert PROFILES["fast"] == replace(AnalysisSettings(), precision="bfloat16")
    # the options its calibration entry was made with
    assert _parse("--profile", "screening") == _parse("--profile", "fast", "--samples", "2", "--patch", "4",
                                                      "--sigma-window", "0.01", "0.05", "--high-guidance", "dc",
                                                      "--high-sigma", "1", "--steps", "89", "--sigma-min", "0.01")
    six = _parse("--profile", "detection", "--samples", "6", "--sigma-window", "0.01", "0.04")
    assert six == replace(PROFILES["detection"], samples=6, sigma_window=(0.01, 0.04), device="auto")
    branched = _parse("--profile", "standard", "--samples", "4", "--patch", "4", "--sigma-window", "0.01", "0.05",
                      "--sigma-min", "0.01", "--branch-sigma", "0.1", "--branch-steps", "12", "--steps", "70",
                      "--precision", "bfloat16")
    assert branched == replace(BRANCHED, device="auto")
    assert _parse("--profile", "screening", "--cg-iters", "1") == replace(PROFILES["screening"], cg_iters=1, device="auto")
    assert _parse("--profile", "screening", "--samples", "4", "--trunks", "2", "--steps", "70", "--sigma-min", "0.01",
                  "--branch-sigma", "0.1", "--branch-steps", "16") == replace(BRANCHED, trunks=2, branch_steps=16, high_guidance="dc",
                                                                              high_sigma=1.0, device="auto")


def test_schedule_settings_enter_the_calibration_key_only_when_they_differ() -> None:
    standard = AnalysisSettings()
    assert set(calibration_key(standard)) == {"views", "dose_i0", "noise_sigma", "steps", "samples", "patch",
                                              "sigma_window", "guidance"}, "entries written before schedules match"
    key = calibration_key(BRANCHED)
    assert (key["branch_sigma"], key["sigma_min"], key["precision"], key["branch_steps"]) == (0.1, 0.01, "bfloat16", 12)
    assert "high_guidance" not in key and "high_sigma" not in key
    assert calibration_key(PROFILES["fast"]) == {**calibration_key(AnalysisSettings()), "precision": "bfloat16"}
    assert calibration_key(replace(PROFILES["fast"], cg_iters=1)) == {**calibration_key(PROFILES["fast"]), "cg_iters": 1}
    assert AnalysisSettings(cg_iters=1).sampler(0).cg_iters == 1
    assert "1 CG iteration(s) per step" in AnalysisSettings(cg_iters=1).describe_chains()
    assert "CG" not in AnalysisSettings().describe_chains()
    with pytest.raises(KlviewerInputError, match="cg_iters"):
        SamplerSettings(cg_iters=0).validate()
    assert sampling_key(BRANCHED) != sampling_key(replace(BRANCHED, branch_steps=9))
    two = replace(BRANCHED, trunks=2)
    assert calibration_key(two) == {**calibration_key(BRANCHED), "trunks": 2}
    assert two.sampler(0).trunks == 2 and two.step_count == 2 * 69 + 4 * 12
    assert two.describe_chains().startswith("2 chains x 70 steps to sigma 0.1, then 4 branches x 12 steps")


def test_where_the_chains_start_and_stop_is_a_setting_of_its_own(tmp_path: Path) -> None:
    screening = PROFILES["screening"]
    assert "89 steps to sigma 0.01" in screening.describe_chains() and "from sigma" not in screening.describe_chains()
    later = _parse("--profile", "screening", "--sigma-max", "2", "--steps", "60")
    assert later == replace(screening, sigma_max=2.0, steps=60, device="auto")
    assert later.sampler(0).sigma_max == 2.0 and "60 steps from sigma 2 to sigma 0.01" in later.describe_chains()
    assert calibration_key(later) == {**calibration_key(screening), "sigma_max": 2.0, "steps": 60}
    assert "sigma_max" not in calibration_key(screening), "entries written before --sigma-max match"
    assert checked_settings(later.to_dict(), tmp_path / "summary.json") == later
    with pytest.raises(KlviewerInputError, match="sigma_max"):
        checked_settings({**later.to_dict(), "sigma_max": -1.0}, tmp_path / "summary.json")
    with pytest.raises(KlviewerInputError, match="sigma_min < sigma_max"):
        _parse("--sigma-max", "0.001")


def test_calibration_entries_of_one_schedule_do_not_serve_another(tmp_path: Path) -> None:
    screening = BRANCHED
    unbranched = replace(screening, sigma_min=AnalysisSettings.sigma_min, branch_sigma=None, branch_steps=0)
    entries = [{"settings": calibration_key(screening), "threshold": 5.0},
               {"settings": calibration_key(unbranched), "threshold": 7.0}]
    (tmp_path / "calibration.json").write_text(json.dumps({"calibrations": entries}))
    calibration = PriorCalibration.read(tmp_path)
    assert calibration.nats_threshold(screening) == 5.0
    assert calibration.nats_threshold(unbranched) == 7.0
    assert calibration.nats_threshold(replace(screening, branch_steps=screening.branch_steps + 1)) is None
    assert calibration.nats_threshold(replace(screening, precision="float32")) is None


def test_results_read_back_their_schedule_and_refuse_a_bad_one(tmp_path: Path) -> None:
    doc = replace(BRANCHED, cg_iters=1, trunks=2).to_dict()
    assert checked_settings(doc, tmp_path / "summary.json") == replace(BRANCHED, cg_iters=1, trunks=2)

    for field, bad in (("branch_sigma", -1.0), ("branch_steps", "8"), ("high_guidance", 3), ("high_sigma", "x"), ("sigma_min", 0),
                       ("cg_iters", 0), ("trunks", 0), ("trunks", 2.5)):
        with pytest.raises(KlviewerInputError, match=field):
            checked_settings({**doc, field: bad}, tmp_path / "summary.json")


def test_analyze_runs_a_branched_profile_end_to_end(tiny_prior: Path, tmp_path: Path) -> None:
    from conftest import TINY_PRIOR_SIZE

    inputs = tmp_path / "in"
    inputs.mkdir()
    save_phantom_npz(make_phantom("lesion", TINY_PRIOR_SIZE, seed=2), inputs / "lesion.npz")
    out = tmp_path / "out"
    assert main(["analyze", str(inputs), "--out", str(out), "--prior", str(tiny_prior), "--samples", "3", "--patch", "4",
                 "--sigma-window", "0.01", "0.05", "--sigma-min", "0.01", "--branch-sigma", "0.05", "--branch-steps", "3",
                 "--steps", "6", "--precision", "bfloat16", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["branch_sigma"] == 0.05 and summary["settings"]["samples"] == 3
    result = load_slice_result(out / summary["rows"][0]["file"])
    assert result.settings == replace(BRANCHED, steps=6, branch_sigma=0.05, branch_steps=3, samples=3, device="auto")
    assert 0.05 in result.energy.sigma_edges and 0.01 in result.energy.sigma_edges
    assert any("branch from one chain" in note for note in result.notes)
    assert result.total_kl == pytest.approx(result.energy.total((0.01, 0.05)), rel=1e-6)


def test_bfloat16_runs_the_denoiser_only_in_bfloat16(tiny_prior: Path) -> None:
    """The denoiser's convolutions in bfloat16, the rest float32: the energy stays float32 and close to
    a float32 run's, and a bad precision is refused."""
    import numpy as np
    from conftest import TINY_PRIOR_SIZE

    from klviewer.errors import KlviewerInputError
    from klviewer.inference.measurements import ct_measurement_model
    from klviewer.inference.sampler import SamplerSettings, posterior_sample
    from klviewer.phantoms import FOV_MM
    from klviewer.physics.acquisition import simulate_measurement
    from klviewer.priors import load_prior

    prior = load_prior(tiny_prior)
    model = ct_measurement_model(simulate_measurement(make_phantom("lesion", TINY_PRIOR_SIZE, seed=0).hu,
                                                      FOV_MM / TINY_PRIOR_SIZE, 8, seed=0), prior)
    runs = {p: posterior_sample(prior, model, SamplerSettings(steps=8, samples=2, precision=p)) for p in ("float32", "bfloat16")}
    full, half = runs["float32"].energy.energy, runs["bfloat16"].energy.energy
    assert half.dtype == np.float32 and np.isfinite(half).all()
    assert not np.array_equal(full, half)
    assert half.sum() == pytest.approx(full.sum(), rel=0.1)
    with pytest.raises(KlviewerInputError, match="precision"):
        SamplerSettings(precision="float16").validate()


def test_the_shipped_prior_is_calibrated_for_every_profile() -> None:
    """`--profile` promises settings the shipped prior is calibrated for: a nats threshold, a healthy
    reference with its z threshold, and a prior-fit threshold for each, in bfloat16 and as they run in float32
    where the device lacks it, and for screening's second stage (4 chains) in both."""
    from klviewer.priors.checkpoint import DEFAULT_PRIOR, resolve_prior_path

    calibration = PriorCalibration.read(resolve_prior_path(DEFAULT_PRIOR))
    stage2 = replace(PROFILES["screening"], samples=4)
    for name, profile in {**PROFILES, "screening stage 2": stage2}.items():
        for settings in (profile, replace(profile, precision="float32")):
            assert calibration.nats_threshold(settings) is not None, (name, settings.precision)
            assert calibration.z_calibration(settings) is not None, (name, settings.precision)
            assert calibration.prior_fit_threshold(settings) is not None, (name, settings.precision)


def test_a_profile_runs_its_bfloat16_denoiser_in_float32_where_the_device_lacks_it(monkeypatch, capsys) -> None:
    """On a CPU without bfloat16 in hardware autocast falls back to a slow reference path (a `screening` slice
    13x its float32 time), so a profile's bfloat16 becomes float32 there, with a notice; --precision
    still asks for it, and settings already in float32 are left alone."""
    monkeypatch.setattr("klviewer.inference.precision.bfloat16_is_native", lambda device: device.type == "cuda")
    assert _parse("--profile", "screening", "--device", "cpu") == replace(PROFILES["screening"], precision="float32",
                                                                          device="cpu")
    assert "bfloat16 is not native on this CPU" in capsys.readouterr().err
    assert _parse("--profile", "fast", "--device", "cpu") == replace(PROFILES["standard"], device="cpu")
    assert "bfloat16 is not native" in capsys.readouterr().err
    assert _parse("--profile", "screening", "--device", "cpu", "--precision", "bfloat16") == \
        replace(PROFILES["screening"], device="cpu")
    assert _parse("--profile", "detection", "--device", "cpu") == replace(PROFILES["detection"], device="cpu")
    assert capsys.readouterr().err == "", "only the fallback says anything"
    monkeypatch.setattr("klviewer.inference.precision.bfloat16_is_native", lambda device: True)
    assert _parse("--profile", "screening", "--device", "cpu") == replace(PROFILES["screening"], device="cpu")


def test_sampler_options_are_checked_before_any_input_is_read(tmp_path, capsys) -> None:
    """More than MAX_SAMPLES chains would share one batch; that, and options that only go together, are
    refused when the options are parsed, before the input is read, with nothing written."""
    assert _parse("--samples", "64").samples == 64
    out = tmp_path / "out"
    for option in ("--samples", "--escalate"):
        with pytest.raises(SystemExit):
            main(["analyze", str(tmp_path / "missing.npy"), "--out", str(out), option, "65"])
        assert "must be 1 to 64 posterior samples, got 65" in capsys.readouterr().err
    for options in (("--high-sigma", "2"), ("--guidance", "pigdm", "--high-guidance", "none")):
        with pytest.raises(KlviewerInputError, match="high_guidance and high_sigma go together"):
            _parse(*options)
        assert main(["analyze", str(tmp_path / "missing.npy"), "--out", str(out), *options]) == 2
        assert "high_guidance and high_sigma go together" in capsys.readouterr().err
    assert not out.exists()
