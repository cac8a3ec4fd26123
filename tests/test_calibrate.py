"""Flag thresholds from held-out healthy phantoms: the rule, the file, and its use by analyze."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from klviewer.cli import main
from klviewer.errors import KlviewerError
from klviewer.evaluation.calibrate import calibrate_prior, threshold_at_fpr
from klviewer.evaluation.detection import CALIBRATION_SEED_BASE
from klviewer.inference.calibration import CALIBRATION_FILE, flag_threshold_for
from klviewer.inference.settings import AnalysisSettings


def test_threshold_allows_at_most_fpr_of_healthy_scores_above() -> None:
    scores = np.arange(1.0, 21.0)  # 20 healthy scores 1..20
    assert threshold_at_fpr(scores, 0.0) == 20.0
    assert threshold_at_fpr(scores, 0.05) == 19.0  # one of 20 may exceed
    assert threshold_at_fpr(scores, 0.10) == 18.0
    for fpr in (0.0, 0.05, 0.1, 0.3):
        t = threshold_at_fpr(scores, fpr)
        assert (scores > t).mean() <= fpr
    with pytest.raises(KlviewerError):
        threshold_at_fpr(scores, 1.0)
    with pytest.raises(KlviewerError):
        threshold_at_fpr(np.array([1.0, np.nan]), 0.05)


def test_calibrate_writes_threshold_used_by_analysis(tiny_prior: Path, tmp_path: Path) -> None:
    prior = tmp_path / "prior"
    shutil.copytree(tiny_prior, prior)
    settings = AnalysisSettings(views=12, steps=4, patch=4)
    cal = calibrate_prior(prior, settings, n=5, fpr=0.2)
    assert cal.path == prior / CALIBRATION_FILE
    assert cal.scores.shape == (5,) and np.all(cal.scores > 0)
    assert cal.threshold == np.sort(cal.scores)[-2]  # 1 of 5 may exceed at fpr 0.2
    assert cal.entry["healthy_exceeding"] == 1
    assert all(CALIBRATION_SEED_BASE <= s < CALIBRATION_SEED_BASE + 10_000 for s in cal.entry["phantom_seeds"])
    assert flag_threshold_for(prior, settings) == pytest.approx(cal.threshold)
    assert flag_threshold_for(prior, AnalysisSettings(views=12, steps=4, patch=8)) is None

    # Same settings again: refused without overwrite; another setting is added beside it.
    with pytest.raises(KlviewerError, match="already holds a threshold"):
        calibrate_prior(prior, settings, n=2, fpr=0.0)
    calibrate_prior(prior, AnalysisSettings(views=12, steps=4, patch=8), n=2, fpr=0.0)
    doc = json.loads((prior / CALIBRATION_FILE).read_text())
    assert len(doc["calibrations"]) == 2

    # Retrained weights make the stored thresholds stale.
    weights = prior / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    assert flag_threshold_for(prior, settings) is None


def test_calibrate_cli_dry_run_writes_nothing(tiny_prior: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prior = tmp_path / "prior"
    shutil.copytree(tiny_prior, prior)
    rc = main(["calibrate", "--prior", str(prior), "-n", "2", "--steps", "3", "--views", "8", "--dry-run"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "threshold" in out and "not written" in out
    assert not (prior / CALIBRATION_FILE).exists()
