"""The app with a prior that does not describe the study: a banner, and the same verdict in the case list."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from test_app_support import FAST_STEPS, isolated_settings, run_and_wait, window  # noqa: F401

from klviewer.evaluation.calibrate import calibrate_prior
from klviewer.inference.calibration import CALIBRATION_FILE
from klviewer.inference.settings import AnalysisSettings


def test_a_mismatch_shows_a_banner_and_is_never_not_flagged(window, qtbot, tiny_prior: Path,  # noqa: F811
                                                            tmp_path: Path) -> None:
    prior = tmp_path / "strict"
    shutil.copytree(tiny_prior, prior)
    calibrate_prior(prior, AnalysisSettings(steps=FAST_STEPS, device="cpu"), n=4, fpr=0.0)
    doc = json.loads((prior / CALIBRATION_FILE).read_text())
    doc["calibrations"][0]["prior_fit"]["threshold"] = 1e-9  # nothing fits this prior
    (prior / CALIBRATION_FILE).write_text(json.dumps(doc))
    assert window.panel.add_prior_folder(prior)
    assert not window.banner.isVisible()
    assert run_and_wait(qtbot, window) == [True]
    assert window.banner.isVisible() and "Prior mismatch" in window.banner.text()
    entry = window.cases[0]
    assert entry.verdict == "prior mismatch" and not entry.flagged and "does not describe" in entry.rule
    assert "PRIOR MISMATCH" in window.viewer.corners["br"].text()
    assert "not flagged" not in window.viewer.corners["br"].text()
    window.set_slice(window.index + 1)
    assert not window.banner.isVisible(), "an unanalysed slice has no verdict yet"
