"""The study-level prior-fit verdict, the one verdict per slice, and physical geometry on real-CT-like inputs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PRIOR_SIZE

from klviewer.app.study_banner import banner_html
from klviewer.errors import KlviewerInputError
from klviewer.evaluation.calibrate import PRIOR_FIT_MARGIN, calibrate_prior
from klviewer.inference.calibration import PriorCalibration
from klviewer.inference.energy import EnergyField, KLMap, log_sigma_edges
from klviewer.inference.measurements import prepare_slice
from klviewer.inference.prior_fit import FITS, MISMATCH, PriorFit, judge, prior_fit_score, study_prior_fit
from klviewer.inference.scoring import CANNOT_FLAG, FLAGGED, NOT_FLAGGED, SliceScore, verdict_of
from klviewer.inference.scoring import MISMATCH as MISMATCH_STATUS
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.study import Series, Slice
from klviewer.phantoms import make_phantom
from klviewer.priors import load_prior
from klviewer.results.analyze import run_analysis
from klviewer.results.slice_file import load_slice_result

SETTINGS = AnalysisSettings(views=8, steps=3, device="cpu")
SPACING = 400 / TINY_PRIOR_SIZE


def test_the_score_is_kl_per_body_pixel_in_the_window() -> None:
    edges = log_sigma_edges(0.002, 10.0, 4)
    energy = np.zeros((4, 8, 8), np.float32)
    energy[1] = 2.0  # one bin, everywhere
    field = EnergyField(energy, edges, samples=1)
    recon = np.full((8, 8), -1000.0, np.float32)
    recon[2:6, 2:6] = 40.0  # 16 body pixels
    inside = float(field.windowed((edges[1], edges[2]))[3, 3])
    assert prior_fit_score(field, recon, (edges[1], edges[2])) == pytest.approx(inside)
    assert prior_fit_score(field, recon, None) == pytest.approx(2.0), "air carries no KL into the score"


def test_a_study_is_judged_by_its_median_slice() -> None:
    fits = [judge(s, 1.0) for s in (0.2, 0.4, 5.0)]
    assert [f.verdict for f in fits] == [FITS, FITS, MISMATCH]
    study = study_prior_fit(fits)
    assert study.verdict == FITS and study.score == 0.4
    assert PriorFit.from_dict(study.to_dict()) == study
    with pytest.raises(KlviewerInputError, match="fits or mismatch"):
        PriorFit.from_dict({**study.to_dict(), "verdict": "maybe"})


def _score(values: np.ndarray, nats: float | None, z: float | None = None, forced: float | None = None) -> SliceScore:
    kl = KLMap(values=values, row_starts=np.array([0]), col_starts=np.array([0]), patch=8, stride=8,
               image_shape=(8, 8), sigma_window=(0.01, 0.5))
    z_map = None if z is None else KLMap(values=np.array([[6.0]]), row_starts=np.array([0]), col_starts=np.array([0]),
                                         patch=8, stride=8, image_shape=(8, 8), sigma_window=(0.01, 0.5))
    return SliceScore(kl, nats, z_map, z, forced)


def test_one_verdict_with_its_rule() -> None:
    high = np.array([[50.0]])
    assert verdict_of(_score(high, 10.0), None).status == FLAGGED
    assert "50 > 10 nats (calibrated threshold)" in verdict_of(_score(high, 10.0), None).rule
    assert verdict_of(_score(high, 100.0), None).status == NOT_FLAGGED
    z = verdict_of(_score(high, 100.0, z=5.0), None)
    assert z.status == FLAGGED and "KL z-score 6 > 5" in z.rule, "the z rule wins over the nats threshold"
    assert verdict_of(_score(high, 100.0, z=5.0, forced=10.0), None).rule.endswith("(set by the user threshold)")
    nothing = verdict_of(_score(high, None), None)
    assert nothing.status == CANNOT_FLAG and "nothing can be flagged" in nothing.rule
    mismatch = verdict_of(_score(high, 10.0), judge(3.0, 0.5))
    assert mismatch.status == MISMATCH_STATUS and "does not describe" in mismatch.rule, "never 'not flagged'"
    assert verdict_of(_score(np.array([[1.0]]), 10.0), judge(3.0, 0.5)).needs_review


def test_calibration_adds_a_prior_fit_threshold_and_analyses_use_it(tiny_prior: Path, tmp_path: Path) -> None:
    prior = tmp_path / "prior"
    shutil.copytree(tiny_prior, prior)
    cal = calibrate_prior(prior, SETTINGS, n=5, fpr=0.2)
    fit = cal.entry["prior_fit"]
    healthy = fit["healthy_scores"]
    assert healthy["median"] <= fit["threshold"] / PRIOR_FIT_MARGIN <= healthy["max"], "the margin over the 80 % point"
    assert fit["healthy_exceeding"] == 0 and fit["statistic"] == "kl_per_body_pixel"
    assert PriorCalibration.read(prior).prior_fit_threshold(SETTINGS) == pytest.approx(fit["threshold"])
    assert PriorCalibration.read(prior).prior_fit_threshold(AnalysisSettings(views=9, steps=3)) is None

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    np.save(inputs / "pair.npy", np.stack([make_phantom("healthy", TINY_PRIOR_SIZE, 7).hu,
                                           make_phantom("shift", TINY_PRIOR_SIZE, 8).hu]))
    (inputs / "pair.json").write_text(json.dumps({"pixel_spacing_mm": SPACING}))
    run = run_analysis([inputs], tmp_path / "out", SETTINGS, prior=prior)
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["prior_fit_threshold"] == pytest.approx(fit["threshold"])
    for row in run.rows:
        result = load_slice_result(run.out / row["file"])
        assert result.prior_fit is not None and row["prior_fit"] == result.prior_fit.verdict
        assert row["prior_fit_score"] == pytest.approx(result.prior_fit_score, rel=1e-5)
        assert row["verdict"] == result.verdict().status
        if result.prior_fit.verdict == MISMATCH:
            assert row["verdict"] == MISMATCH_STATUS and not row["flagged"]
    case = run.rows[0]["case"]
    assert summary["cases"][case]["verdict"] in (FITS, MISMATCH)
    with (run.out / "summary.csv").open() as f:
        header = next(csv.reader(f))
    assert {"verdict", "prior_fit", "prior_fit_score", "geometry_warnings"} <= set(header)


def _series(hu: np.ndarray, spacing: tuple[float, float] | None) -> Series:
    return Series(uid="s", modality="CT", source_kind="array", slices=[Slice(hu=hu)], pixel_spacing_mm=spacing)


def test_physical_geometry_and_its_warnings(tiny_prior: Path) -> None:
    prior = load_prior(tiny_prior)
    device = torch.device("cpu")
    body = np.full((40, 40), 40.0, np.float32)  # tissue to every edge: a crop through the body
    cut = prepare_slice(_series(body, (2.5, 2.5)), 0, prior, SETTINGS, device)
    assert cut.grid.scale == (0.2, 0.2) and cut.grid.source_fov_mm == (100.0, 100.0)
    assert any("much smaller than the prior's" in w for w in cut.geometry_warnings)
    assert any("cuts through the body" in w for w in cut.geometry_warnings)
    assert cut.original_hu[0, 0] == -1000.0 and cut.original_hu[16, 16] == pytest.approx(40.0), "air around, centred"

    coarse = prepare_slice(_series(np.full((8, 8), 40.0, np.float32), (50.0, 50.0)), 0, prior, SETTINGS, device)
    assert any("4.0x the prior's" in w for w in coarse.geometry_warnings)
    big = np.full((64, 64), 40.0, np.float32)
    cropped = prepare_slice(_series(big, (12.5, 12.5)), 0, prior, SETTINGS, device)
    assert any("leaves out tissue" in w for w in cropped.geometry_warnings)

    assumed = prepare_slice(_series(np.zeros((64, 64), np.float32), None), 0, prior, SETTINGS, device)
    assert assumed.grid.spacing_assumed and assumed.grid.source_fov_mm == pytest.approx((400.0, 400.0))
    assert any("no pixel spacing known: assuming" in n for n in assumed.notes)
    with pytest.raises(KlviewerInputError, match="not a positive size"):
        prepare_slice(_series(body, (0.0, 1.0)), 0, prior, SETTINGS, device)
    padding = np.full((32, 32), -3024.0, np.float32)
    assert prepare_slice(_series(padding, (SPACING, SPACING)), 0, prior, SETTINGS, device).original_hu.min() == -1000.0


def test_the_banner_says_mismatch_and_geometry(tiny_prior: Path) -> None:
    class Shown:
        prior_name = "abdomen"
        geometry_warnings = ["field of view 150 x 150 mm is much smaller than the prior's 400 mm"]
        prior_fit = judge(4.0, 0.5)

    html, style = banner_html(Shown())
    assert "Prior mismatch: abdomen does not describe this study" in html and "150 x 150" in html
    Shown.prior_fit = judge(0.1, 0.5)
    assert banner_html(Shown())[0].startswith("Geometry far from the prior's")
    Shown.geometry_warnings = []
    assert banner_html(Shown()) is None and banner_html(None) is None


def test_the_pdf_reports_a_mismatch_study_as_a_mismatch() -> None:
    from types import SimpleNamespace

    from klviewer.export.pdf_report import _prior_mismatch

    def case(*verdicts: str) -> SimpleNamespace:
        rows = [{"prior_fit": v, "prior_fit_score": 3.0 if v == "mismatch" else 0.1} for v in verdicts]
        return SimpleNamespace(slices=[SimpleNamespace(row=r) for r in rows])

    line = _prior_mismatch(case("mismatch", "mismatch", "fits"))
    assert line.startswith("Verdict: PRIOR MISMATCH") and "2 of 3 slices" in line
    assert _prior_mismatch(case("mismatch", "fits")) is None, "half is not a majority"
    assert _prior_mismatch(case("uncalibrated")) is None
