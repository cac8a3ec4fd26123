"""KL z-scores against a healthy reference: the statistic, its calibration, and where it shows up."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PRIOR_SIZE

from klviewer.errors import KlviewerInputError
from klviewer.evaluation.calibrate import calibrate_prior
from klviewer.evaluation.detection import DetectionCase
from klviewer.inference.calibration import CALIBRATION_FILE, z_calibration_for
from klviewer.inference.energy import EnergyField, patch_sums
from klviewer.inference.healthy_reference import (
    KL_FLOOR,
    MIN_PATCHES_PER_BIN,
    NORMAL_SCORES,
    HealthyReference,
    HealthySlice,
    cross_fitted_scores,
    fit_reference,
    patch_statistics,
    pool_for,
    reference_of_patches,
)
from klviewer.inference.settings import AnalysisSettings
from klviewer.phantoms import make_phantom
from klviewer.results.analyze import run_analysis
from klviewer.results.slice_file import load_slice_result
from klviewer.results.summary import CSV_COLUMNS

SIZE = 64
PATCH = 4
EDGES = np.array([0.001, 1.0, 10.0])


def _anatomy(rng: np.random.Generator) -> np.ndarray:
    """A body disc of soft tissue with random sharp-edged gas pockets, in HU."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    hu = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 28 ** 2, 40.0, -1000.0)
    for _ in range(4):
        r, c = rng.integers(14, 50, 2)
        hu[r - 3:r + 3, c - 3:c + 3] = -1000.0
    return hu


def _slice(seed: int, lesion: bool = False) -> HealthySlice:
    """Energy that follows the edges of the reconstruction, as healthy anatomy's does, plus noise;
    a lesion adds energy in smooth tissue, far less than an edge carries."""
    rng = np.random.default_rng(seed)
    hu = _anatomy(rng)
    gy, gx = np.gradient(hu)
    energy = 1e-4 * (gy ** 2 + gx ** 2) * rng.lognormal(0, 0.3, hu.shape) + 0.01 * rng.lognormal(0, 0.3, hu.shape)
    if lesion:
        energy[40:44, 20:24] += 2.0
        hu[40:44, 20:24] = 40.0  # the reconstruction shows no edge there: the prior smoothed it away
    return HealthySlice(EnergyField(np.stack([energy, energy]).astype(np.float32), EDGES), hu.astype(np.float32))


def test_z_score_finds_a_lesion_that_raw_kl_ranks_below_healthy_edges() -> None:
    healthy = [_slice(s) for s in range(12)]
    ref = fit_reference(healthy, PATCH, None, pool=1)
    sick = _slice(100, lesion=True)
    raw = sick.energy.kl_map(PATCH)
    assert raw.values[10, 5] < raw.score, "the lesion's KL is below the largest edge patch"
    z = ref.z_map(sick.energy, sick.recon_hu)
    assert np.unravel_index(np.argmax(z.values), z.values.shape) == (10, 5)
    fresh = [_slice(s) for s in range(200, 220)]
    assert z.score > 2 * max(ref.z_map(h.energy, h.recon_hu).score for h in fresh)
    assert raw.score < max(h.energy.kl_map(PATCH).score for h in fresh), "by raw KL the lesion slice looks healthy"

    # Air patches have no z-score and never set the slice's.
    corner = z.values[0, 0]
    assert corner == -np.inf and np.isfinite(z.values[8, 8])


def test_pooled_windows_combine_their_patches_z_scores_and_lift_a_lesion_above_a_lone_outlier() -> None:
    assert (pool_for(2), pool_for(4), pool_for(8), pool_for(16)) == (4, 2, 1, 1), "windows of about POOL_PX"
    healthy = [_slice(s) for s in range(12)]
    single = fit_reference(healthy, PATCH, None, pool=1)
    pooled = fit_reference(healthy, PATCH, None)
    assert pooled.pool == 2 and np.array_equal(pooled.mean, single.mean)

    sick = _slice(100, lesion=True)
    z, windows = single.z_map(sick.energy, sick.recon_hu), pooled.z_map(sick.energy, sick.recon_hu)
    assert (windows.patch, windows.stride, windows.values.shape) == (2 * PATCH, PATCH, (15, 15))
    assert np.array_equal(windows.row_starts, np.arange(0, 57, PATCH))
    block = z.values[9:11, 4:6]
    assert windows.values[9, 4] == pytest.approx(block.sum() / 2), "Stouffer: sum over the square root of their number"
    rim = z.values[0:2, 6:8]  # a window with body and air patches counts only the body ones
    n_body = int(np.isfinite(rim).sum())
    assert 0 < n_body < 4 and windows.values[0, 6] == pytest.approx(rim[np.isfinite(rim)].sum() / np.sqrt(n_body))
    assert windows.values[0, 0] == -np.inf
    assert all(windows.patch_box(r, c)[0] <= 40 and windows.patch_box(r, c)[2] <= 20
               for r, c in zip(*np.nonzero(windows.values == windows.score)))

    # Two slices whose most unusual patch has the same z-score: a lesion over four patches
    # and a healthy outlier in one. Only pooling tells them apart.
    spread = _slice(101)
    lone = _slice(101)
    spread.energy.energy[:, 36:44, 16:24] *= 30
    lone.energy.energy[:, 36:40, 16:20] *= 30
    assert single.z_map(spread.energy, spread.recon_hu).score == pytest.approx(
        single.z_map(lone.energy, lone.recon_hu).score, rel=0.3)
    assert pooled.z_map(spread.energy, spread.recon_hu).score > 1.5 * pooled.z_map(lone.energy, lone.recon_hu).score


def test_bins_hold_enough_patches_and_cross_fitting_scores_each_slice_out_of_sample() -> None:
    healthy = [_slice(s) for s in range(6)]
    ref = fit_reference(healthy, PATCH, None, bins=50)
    body = sum(int(np.isfinite(ref.z_map(h.energy, h.recon_hu).values).sum()) for h in healthy)
    assert ref.mean.size <= body // MIN_PATCHES_PER_BIN and ref.bin_edges.size == ref.mean.size - 1
    assert (np.diff(ref.bin_edges) > 0).all() and (ref.std > 0).all()
    with pytest.raises(KlviewerInputError, match="at least"):
        fit_reference(healthy[:1], 32, None)

    # A healthy-looking outlier: in-sample it shapes its own bins and looks more typical.
    odd = _slice(7)
    odd.energy.energy[:, 30:34, 30:34] *= 50
    pool = healthy + [odd]
    in_sample = fit_reference(pool, PATCH, None).z_map(odd.energy, odd.recon_hu).score
    assert cross_fitted_scores(pool, PATCH, None)[-1] > in_sample


def test_reference_round_trips_and_refuses_malformed_files() -> None:
    ref = fit_reference([_slice(s) for s in range(4)], PATCH, (0.01, 5.0))
    again = HealthyReference.from_dict(json.loads(json.dumps(ref.to_dict())), "x.json")
    assert again.sigma_window == (0.01, 5.0) and np.array_equal(again.mean, ref.mean) and again.pool == 2
    good = ref.to_dict()
    older = {k: v for k, v in good.items() if k != "pool"}
    assert HealthyReference.from_dict(older).pool == 1, "references from before pooling scored single patches"
    assert np.array_equal(again.quantiles, ref.quantiles) and np.array_equal(again.normal_scores, NORMAL_SCORES)
    sick = _slice(100, lesion=True)
    assert again.z_map(sick.energy, sick.recon_hu).score == ref.z_map(sick.energy, sick.recon_hu).score
    # references written before quantiles standardise by each bin's mean and spread
    gaussian = HealthyReference.from_dict({k: v for k, v in good.items() if k not in ("quantiles", "normal_scores")})
    assert gaussian.quantiles is None
    kl, log_edges, _inside = patch_statistics(sick.energy, sick.recon_hu, PATCH, (0.01, 5.0))
    k = np.digitize(log_edges[10, 5], gaussian.bin_edges, right=True)
    assert replace(gaussian, pool=1).z_map(sick.energy, sick.recon_hu).values[10, 5] == pytest.approx(
        (np.log(kl.values[10, 5] + KL_FLOOR) - gaussian.mean[k]) / gaussian.std[k])
    n_bins = len(good["mean"])
    for broken in ({**good, "std": [-1.0] * len(good["std"])}, {**good, "bin_edges": good["bin_edges"][::-1] + [0.0]},
                   {k: v for k, v in good.items() if k != "mean"}, {**good, "mean": "high"}, {**good, "pool": 0},
                   {**good, "quantiles": good["quantiles"][:-1]}, {**good, "normal_scores": good["normal_scores"][::-1]},
                   {**good, "quantiles": good["quantiles"][::-1]}, {k: v for k, v in good.items() if k != "normal_scores"},
                   {**good, "quantiles": [float("nan")] * (n_bins * len(NORMAL_SCORES))}):
        with pytest.raises(KlviewerInputError, match="x.json"):
            HealthyReference.from_dict(broken, "x.json")


def test_a_patch_scores_its_rank_among_healthy_patches_with_the_same_edges() -> None:
    """A skewed bin (log KL exponential, as the bins of strong edges are): a value at the healthy 99th
    percentile scores the normal's 99th percentile, 2.33, where standardising by mean and spread gives
    3.6. Past every healthy value the score keeps rising, no faster than standardising would."""
    rng = np.random.default_rng(5)
    y = rng.exponential(1.0, 20_000)
    ref = reference_of_patches(y, np.zeros_like(y), 1, None, n_slices=1, pool=1)
    template = patch_sums(np.zeros((1, 4)), 1)

    def z(values: list[float]) -> np.ndarray:
        return ref.z_of(template, np.array([values]), np.zeros((1, 4)), np.ones((1, 4), bool)).values[0]

    q99 = np.quantile(y, 0.99)
    assert z([q99, 0, 0, 0])[0] == pytest.approx(2.326, abs=0.03)
    assert (q99 - y.mean()) / y.std() == pytest.approx(3.6, abs=0.1)
    top = ref.quantiles[0, -1]
    far = z([top, top + 1.0, top + 2.0, top + 10.0])
    assert far[0] == pytest.approx(3.5) and (np.diff(far) > 0).all()
    assert far[3] - far[0] <= 10.0 / ref.std[0] + 1e-9


def test_calibrate_stores_the_reference_and_analyze_writes_z_scores(tiny_prior: Path, tmp_path: Path) -> None:
    prior = tmp_path / "prior"
    shutil.copytree(tiny_prior, prior)
    settings = AnalysisSettings(views=12, steps=4, patch=4, device="cpu")
    cal = calibrate_prior(prior, settings, n=6, fpr=0.2)
    entry = cal.entry["healthy_reference"]
    assert cal.z_scores is not None and cal.z_scores.shape == (6,)
    assert cal.z_threshold == entry["z_threshold"] == np.sort(cal.z_scores)[-2]
    loaded = z_calibration_for(prior, settings)
    assert loaded is not None and loaded.threshold == cal.z_threshold and loaded.reference.patch == 4
    assert z_calibration_for(prior, AnalysisSettings(views=12, steps=4, patch=8)) is None
    assert "healthy_reference" not in calibrate_prior(prior, AnalysisSettings(views=12, steps=4, patch=8), n=2).entry

    (tmp_path / "inputs").mkdir()
    np.save(tmp_path / "inputs" / "in.npy", make_phantom("lesion", TINY_PRIOR_SIZE, seed=3).hu)
    run = run_analysis([tmp_path / "inputs" / "in.npy"], tmp_path / "out", settings, prior=prior)
    row = run.rows[0]
    result = load_slice_result(run.out / row["file"])
    expected = loaded.reference.z_map(result.energy, result.recon_hu)
    np.testing.assert_allclose(result.z_map.values, expected.values, rtol=1e-5)
    assert (result.z_map.patch, result.z_map.stride) == (8, 4) and np.array_equal(result.z_map.col_starts, expected.col_starts)
    assert row["z_score"] == pytest.approx(expected.score, rel=1e-5)
    assert result.flag_rule == "z" and row["flagged"] == (expected.score > cal.z_threshold) == result.flagged
    with open(run.out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == CSV_COLUMNS and float(table[0]["z_score"]) == pytest.approx(row["z_score"])
    assert json.loads((run.out / "summary.json").read_text())["z_threshold"] == cal.z_threshold

    # The file anyone may edit: a broken reference is refused with the file named.
    doc = json.loads((prior / CALIBRATION_FILE).read_text())
    doc["calibrations"][0]["healthy_reference"]["mean"] = []
    (prior / CALIBRATION_FILE).write_text(json.dumps(doc))
    with pytest.raises(KlviewerInputError, match=CALIBRATION_FILE):
        z_calibration_for(prior, settings)


def test_detection_report_scores_klip_z_against_reference_cases() -> None:
    from klviewer.evaluation.report import SWEEP_PATCHES, SWEEP_WINDOWS, evaluate, markdown
    from klviewer.inference.result import SliceResult

    def case(kind: str, s: HealthySlice, seed: int) -> DetectionCase:
        ood = np.zeros((SIZE, SIZE), bool)
        if kind == "lesion":
            ood[40:44, 20:24] = True
        zero = np.zeros((SIZE, SIZE), np.float32)
        result = SliceResult(recon_hu=s.recon_hu, posterior_std_hu=zero, fbp_hu=zero, residual_backprojection=zero,
                             energy=s.energy, kl_map=s.energy.kl_map(PATCH), score=0.0, total_kl=0.0,
                             total_kl_all_sigma=0.0, flagged=False, flag_threshold=None, pixel_spacing_mm=1.0,
                             settings=AnalysisSettings(), prior_name="x", seconds=0.0)
        return DetectionCase(kind, seed, s.recon_hu > -500, ood, s.recon_hu + 10.0, result)

    cases = [case("healthy", _slice(s), s) for s in range(20, 24)] + [case("lesion", _slice(s, True), s) for s in range(30, 34)]
    reference = [case("healthy", _slice(s), s) for s in range(12)]
    settings = AnalysisSettings(patch=PATCH, sigma_window=None)
    report = evaluate(cases, settings, reference)
    assert list(report.scores)[:2] == ["klip", "klip_z"]
    assert report.scores["klip_z"].dataset_auroc == 1.0 > report.scores["klip"].dataset_auroc
    assert len(report.sweep) == len(SWEEP_PATCHES) * len(SWEEP_WINDOWS) and "z_dataset_auroc" in report.sweep[0]
    meta = {"command": "t", "prior": "x", "n_id": 4, "n_ood": 4, "n_reference": 12, "ood_kind": "lesion",
            "size": SIZE, "device": "cpu"}
    text = markdown(report, settings, meta)
    assert "| klip_z |" in text and "12 other healthy" in text and "klip_z localisation AUROC" in text
    assert "klip_z" not in evaluate(cases, settings).scores


def test_the_app_flags_and_outlines_by_z_only_at_the_reference_settings(tmp_path: Path) -> None:
    from dataclasses import replace

    from klviewer.app.display import MapSettings, overlay_frame, with_result_z
    from klviewer.app.session import FlagThresholds
    from klviewer.app.session_results import as_shown
    from klviewer.inference.calibration import calibration_key
    from klviewer.inference.result import SliceResult

    settings = AnalysisSettings(patch=PATCH, sigma_window=(0.01, 5.0))
    ref = fit_reference([_slice(s) for s in range(12)], PATCH, (0.01, 5.0))
    sick = _slice(100, lesion=True)
    raw_score = sick.energy.kl_map(PATCH, (0.01, 5.0)).score
    entry = {"settings": calibration_key(settings), "threshold": 10 * raw_score,
             "healthy_reference": {**ref.to_dict(), "z_threshold": 6.0}}
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"calibrations": [entry]}))
    thresholds = FlagThresholds()
    z = thresholds.z_calibration(tmp_path, settings, PATCH, (0.01, 5.0))
    assert z is not None and z.threshold == 6.0
    assert thresholds.z_calibration(tmp_path, settings, 8, (0.01, 5.0)) is None
    assert thresholds.z_calibration(tmp_path, replace(settings, flag_threshold=1.0), PATCH, (0.01, 5.0)) is None

    map_settings = MapSettings(patch=PATCH, sigma_window=(0.01, 5.0))
    by_nats = overlay_frame(sick.energy, map_settings, entry["threshold"])
    assert not by_nats.flagged and not by_nats.boxes
    by_z = overlay_frame(sick.energy, map_settings, entry["threshold"], (z, sick.recon_hu))
    assert by_z.flagged and by_z.boxes, "the lesion is outlined"
    assert all(r0 <= 40 and r1 >= 44 and c0 <= 20 and c1 >= 24 for r0, r1, c0, c1 in by_z.boxes), \
        "every outlined window holds the lesion"

    zero = np.zeros((SIZE, SIZE), np.float32)
    result = SliceResult(recon_hu=sick.recon_hu, posterior_std_hu=zero, fbp_hu=zero, residual_backprojection=zero,
                         energy=sick.energy, kl_map=sick.energy.kl_map(PATCH, (0.01, 5.0)), score=raw_score, total_kl=0.0,
                         total_kl_all_sigma=0.0, flagged=True, flag_threshold=None, pixel_spacing_mm=1.0,
                         settings=settings, prior_name="x", seconds=0.0, z_map=by_z.z_map, z_threshold=6.0)
    assert as_shown(result, map_settings, True, None).z_map is by_z.z_map
    compared = with_result_z(by_nats, result)  # a comparison side: its own z-scores, no reference at hand
    assert compared.flagged and compared.boxes == by_z.boxes
    assert with_result_z(overlay_frame(sick.energy, replace(map_settings, patch=8), None), result).z_map is None
    moved = as_shown(result, replace(map_settings, patch=8), True, None)
    assert moved.z_map is None and moved.z_threshold is None, "z-scores only hold at the reference's patch and window"


def test_export_follows_the_z_rule_when_the_analysis_flagged_by_it(tiny_prior: Path, tmp_path: Path) -> None:
    import highdicom as hd
    from export_fixtures import SETTINGS, phantom_stack

    from klviewer.export import export_results
    from klviewer.export.geometry import to_source_grid
    from klviewer.io.dicom_write import write_ct_series

    prior = tmp_path / "prior"
    shutil.copytree(tiny_prior, prior)
    calibrate_prior(prior, SETTINGS, n=4, fpr=0.0)
    write_ct_series(phantom_stack(2, TINY_PRIOR_SIZE, 50), tmp_path / "src", pixel_spacing_mm=12.0, patient_id="P-1",
                    patient_name="Z^Test", series_description="z", series_number=2, slice_thickness_mm=5.0,
                    study_description="z test")
    first = run_analysis([tmp_path / "src"], tmp_path / "first", SETTINGS, prior=prior)
    z_scores = sorted(r["z_score"] for r in first.rows)
    # Put the z threshold between the two slices' z-scores, so that exactly one is flagged.
    doc = json.loads((prior / CALIBRATION_FILE).read_text())
    doc["calibrations"][0]["healthy_reference"]["z_threshold"] = sum(z_scores) / 2
    (prior / CALIBRATION_FILE).write_text(json.dumps(doc))
    run = run_analysis([tmp_path / "src"], tmp_path / "results", SETTINGS, prior=prior)
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["flag_rule"] == "z" and [r["flagged"] for r in run.rows].count(True) == 1

    report = export_results(run.out, tmp_path / "export", formats=("dicom", "pdf", "csv"))
    table = json.loads((report.out / "cases.json").read_text())
    assert table["z_threshold"] == summary["z_threshold"] and "z-score" in table["flag_threshold_source"]
    assert table["flag_rule"] == "kl_z_score" and table["nats_threshold"] is None, "a z threshold is never filed as nats"
    case = run.rows[0]["case"]
    seg = hd.seg.segread(report.out / case / "dicom" / "segmentation.dcm")
    assert "z-score" in seg.ContentDescription
    masks = seg.get_pixels_by_source_instance([r["sop_instance_uid"] for r in run.rows],
                                              assert_missing_frames_are_empty=True)[..., 0]
    for mask, row in zip(masks, run.rows):
        result = load_slice_result(run.out / row["file"])
        expected = to_source_grid(result.z_map.to_pixels() > summary["z_threshold"], result.grid_for(mask.shape)) > 0
        np.testing.assert_array_equal(mask.astype(bool), expected)
        assert expected.any() == row["flagged"]


def test_calibrate_on_healthy_studies_instead_of_phantoms(tiny_prior: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from klviewer.cli import main

    prior = tmp_path / "prior"
    shutil.copytree(tiny_prior, prior)
    (tmp_path / "healthy").mkdir()
    stack = np.stack([make_phantom("healthy", TINY_PRIOR_SIZE, seed=s).hu for s in range(5)])
    np.save(tmp_path / "healthy" / "stack.npy", stack)
    options = ["--prior", str(prior), "--steps", "3", "--views", "8", "--patch", "4"]
    assert main(["calibrate", *options, "--healthy", str(tmp_path / "healthy"), "--slices", "0-3"]) == 0
    assert "KL z-score threshold" in capsys.readouterr().out
    entry = json.loads((prior / CALIBRATION_FILE).read_text())["calibrations"][0]
    assert entry["n_healthy"] == 4 and entry["healthy_slices"] == "0-3" and "phantom_seeds" not in entry
    assert entry["healthy_inputs"] == [str((tmp_path / "healthy").resolve())]
    assert entry["healthy_reference"]["n_slices"] == 4
    assert z_calibration_for(prior, AnalysisSettings(steps=4, views=8, patch=4)) is None, "steps are part of the key"
    assert z_calibration_for(prior, AnalysisSettings(steps=3, views=8, patch=4)) is not None

    assert main(["calibrate", *options, "--healthy", str(tmp_path / "healthy"), "--dry-run", "-n", "5"]) == 2
    cached = ["calibrate", *options, "--healthy", str(tmp_path / "healthy"), "--slices", "0-3", "--dry-run",
              "--cache", str(tmp_path / "c")]
    assert main(cached) == 0 and len(list((tmp_path / "c").glob("*/*.npz"))) == 4, "one result per slice, per prior"
    first = capsys.readouterr().out
    assert main(cached) == 0 and capsys.readouterr().out == first, "a re-run reads the cache and says the same"
    assert main(["calibrate", *options, "--slices", "0", "--dry-run"]) == 2
    assert "--slices picks slices" in capsys.readouterr().err
