"""One verdict per slice, with its rule, in every view: the words, the outlines of exported pictures, the tables."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PRIOR_SIZE
from PIL import Image

from klviewer.evaluation.calibrate import calibrate_prior
from klviewer.export import export_results
from klviewer.export.images import OUTLINE_RGB
from klviewer.inference.calibration import CALIBRATION_FILE
from klviewer.inference.settings import AnalysisSettings
from klviewer.inference.verdict_text import CANNOT_FLAG, FLAGGED, MISMATCH, NOT_FLAGGED, describe, slice_label, table_verdict
from klviewer.io.dicom_write import write_ct_series
from klviewer.phantoms import make_phantom
from klviewer.results.analyze import run_analysis

SETTINGS = AnalysisSettings(views=8, steps=3, patch=4, sigma_window=(0.01, 0.5), device="cpu", seed=1)


def test_verdict_words_name_the_rule_and_its_unit() -> None:
    z = describe(False, "z", 132.0, 3.76, 338.0, 4.913)
    assert z.status == NOT_FLAGGED and z.value == "KL z 3.76" and "KL z-score > 4.91" in z.rule_text
    assert z.caption == "not flagged · KL z 3.76 (rule: KL z > 4.91)"
    nats = table_verdict(True, 412.0, None, 338.0, None)
    assert nats.status == FLAGGED and nats.value == "score 412 nats" and "> 338 nats (prior's calibration)" in nats.rule_text
    assert "set by the user" in table_verdict(True, 412.0, None, 300.0, 4.9, forced_nats=300.0).rule_text
    none = table_verdict(False, 412.0, None, None, None)
    assert none.status == CANNOT_FLAG and "nothing can be flagged" in none.rule_text and not none.flagged
    assert slice_label(4, 8) == "slice 4 (of 0–7)" and slice_label(0) == "slice 0"
    mismatch = table_verdict(True, 412.0, 9.0, 338.0, 4.9, mismatch="prior fit 0.9 > 0.2 nats per body pixel: ...")
    assert mismatch.status == MISMATCH and mismatch.rule_text.startswith("prior fit") and not mismatch.flagged


def _outline_pixels(path: Path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB"))
    return int((np.abs(rgb.astype(int) - np.round(np.array(OUTLINE_RGB) * 255)) <= 1).all(axis=2).sum())


@pytest.fixture(scope="module")
def z_rule_results(tiny_prior: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A results folder flagged by KL z-scores whose threshold no slice reaches, while its nats threshold
    is tiny: the head-CT situation of issue 18, where the nats threshold outlined patches of a slice
    that the z rule did not flag."""
    tmp = tmp_path_factory.mktemp("verdicts")
    prior = tmp / "prior"
    shutil.copytree(tiny_prior, prior)
    calibrate_prior(prior, SETTINGS, n=4, fpr=0.0)
    doc = json.loads((prior / CALIBRATION_FILE).read_text())
    doc["calibrations"][0]["threshold"] = 1e-9
    doc["calibrations"][0]["healthy_reference"]["z_threshold"] = 1e9
    (prior / CALIBRATION_FILE).write_text(json.dumps(doc))
    stack = np.stack([make_phantom("lesion", TINY_PRIOR_SIZE, seed=s).hu for s in (7, 8)])
    write_ct_series(stack, tmp / "src", pixel_spacing_mm=12.0, patient_id="P-1", patient_name="Z^Test",
                    series_description="z", series_number=2, slice_thickness_mm=5.0, study_description="z test")
    run = run_analysis([tmp / "src"], tmp / "results", SETTINGS, prior=prior)
    assert not any(r["flagged"] for r in run.rows)
    return run.out, tmp


def test_exported_pictures_outline_only_what_the_rule_flags(z_rule_results: tuple[Path, Path]) -> None:
    results, tmp = z_rule_results
    report = export_results(results, tmp / "export", flagged_only=False, formats=("png", "pdf", "csv"))
    overlays = sorted(report.out.rglob("*_overlay.png"))
    assert overlays, "the top slice is pictured even when nothing is flagged"
    for overlay in overlays:
        assert _outline_pixels(overlay) < 10, "no flag outline on a slice the rule does not flag (a few bar pixels at most)"
    with open(report.out / "cases.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["verdict"] == "not flagged" and row["flag_rule"] == "kl_z_score"
    assert float(row["z_threshold"]) == 1e9 and row["nats_threshold"] == "", "the z threshold is not filed beside nats"
    assert "score_nats" in row and "flag_threshold" not in row


def test_nats_rule_outlines_the_flagged_patches(z_rule_results: tuple[Path, Path]) -> None:
    results, tmp = z_rule_results
    report = export_results(results, tmp / "export-nats", flagged_only=False, formats=("png", "csv"),
                            flag_threshold=1e-6)
    overlays = sorted(report.out.rglob("*_overlay.png"))
    assert overlays and all(_outline_pixels(p) > 50 for p in overlays), "every patch is above 1e-6 nats: outlined"
    with open(report.out / "cases.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["verdict"] == "flagged" and row["flag_rule"] == "largest_patch_kl_nats"
    assert float(row["nats_threshold"]) == 1e-6 and row["z_threshold"] == ""
