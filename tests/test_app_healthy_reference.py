"""The app with a prior that has a healthy reference: KL z-scores flag, outline and can be shown."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from test_app_support import FAST_STEPS, isolated_settings, run_and_wait, window  # noqa: F401

from klviewer.evaluation.calibrate import calibrate_prior
from klviewer.inference.settings import AnalysisSettings


def test_z_scores_flag_and_show_only_at_the_calibrated_map_settings(window, qtbot, tiny_prior: Path,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    prior = tmp_path / "calibrated"
    shutil.copytree(tiny_prior, prior)
    cal = calibrate_prior(prior, AnalysisSettings(steps=FAST_STEPS, device="cpu"), n=4, fpr=0.0)
    assert window.panel.add_prior_folder(prior)
    assert run_and_wait(qtbot, window) == [True]
    controls, overlay = window.map_controls, window.viewer.overlay
    frame = overlay.frame
    assert controls.show_z.isEnabled() and frame.z_threshold == cal.z_threshold and not frame.shows_z
    assert frame.flagged == (frame.z_score > cal.z_threshold)
    assert window.cases[0].auto_flagged == frame.flagged, "the case list flags by the same rule"
    assert window.cases[0].z_score == frame.z_score is not None
    above = np.argwhere(frame.z_map.values > cal.z_threshold)
    assert len(frame.boxes) == len(above), "outlines are the patches above the z threshold"
    assert " z " in window.viewer.corners["br"].text()

    controls.show_z.setChecked(True)
    qtbot.waitUntil(lambda: overlay.frame.shows_z, timeout=2000)
    shown = overlay.frame
    finite = np.isfinite(shown.raw_pixels)
    grid = window.current_result().result.grid_transform
    on_source = grid.resample_to_source(shown.z_map.to_pixels(), nearest=True)
    assert shown.raw_pixels.shape == grid.source_shape, "shown on the source grid"
    assert np.allclose(shown.raw_pixels[finite], on_source[finite])
    assert np.nanmin(shown.pixels) > 0 and "z-score" in overlay.colorbar.axis.labelText
    assert " z " in controls.threshold_label.text()
    centre = window.viewer.view.mapViewToScene(window.viewer.view.viewRect().center())
    assert "KL z" in window.viewer.probe_at(centre)

    controls.patch.setValue(4)  # no reference at patch 4: back to KL, and the choice waits
    qtbot.waitUntil(lambda: overlay.frame.kl_map.patch == 4, timeout=2000)
    assert not overlay.frame.shows_z and overlay.frame.z_map is None and not controls.show_z.isEnabled()
    assert controls.show_z.isChecked() and "nats" in overlay.colorbar.axis.labelText
    qtbot.waitUntil(lambda: window.cases[0].z_score is None, timeout=2000)
