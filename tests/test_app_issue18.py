"""Issue 18, the app as a radiologist uses it: layout, overlay scale, calibration state, confusing states,
console noise, and the session, measurement, cine, tag and thumbnail features (offscreen Qt)."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QRect, Qt
from PySide6.QtGui import QKeyEvent
from test_app_support import isolated_settings, run_and_wait, window  # noqa: F401

from klviewer.app.display import LogScale, MapSettings, matching_preset, nearest_calibrated
from klviewer.app.layout_check import global_rect, layout_problems
from klviewer.app.map_controls import LogSlider
from klviewer.app.measurements import Measurement, distance_text, roi_mask, roi_stats
from klviewer.app.menus import OPEN_FILTERS
from klviewer.app.session_file import read_session, save_session, unsaved_handwork
from klviewer.app.thumbnails import thumbnail_pixels
from klviewer.app.window_state import fitted_geometry
from klviewer.inference.calibration import CALIBRATION_FILE
from klviewer.io.study import Series, Slice


def test_window_fits_small_and_large_screens() -> None:
    small = fitted_geometry(QRect(0, 0, 1366, 768))
    assert small.width() <= 1366 and small.bottom() <= 768 - 1 and small.top() >= 0
    assert QRect(0, 0, 1366, 768).contains(small)
    big = fitted_geometry(QRect(0, 0, 1920, 1040))
    assert (big.width(), big.height()) == (1560, 960) and QRect(0, 0, 1920, 1040).contains(big)


def test_fresh_window_layout_holds(window, qtbot) -> None:  # noqa: F811
    # (whether the window fits a real screen is checked under Xvfb: test_app_real_window.py)
    assert run_and_wait(qtbot, window) == [True]
    problems = [p for p in layout_problems(window) if "overlaps" in p or "squeezed" in p]
    assert problems == [], "no dock over the run buttons; spin boxes keep their height after a result"
    buttons = global_rect(window.panel.run_slice_button)
    assert not global_rect(window.map_dock).intersects(buttons)


def test_colour_bar_follows_the_overlay_and_marks_threshold_and_max(window, qtbot) -> None:  # noqa: F811
    run_and_wait(qtbot, window)
    overlay = window.viewer.overlay
    assert overlay.colorbar.isVisible()
    window.viewer.set_overlay_visible(False)
    assert not overlay.colorbar.isVisible(), "the colour bar goes with the overlay"
    window.viewer.set_overlay_visible(True)
    labels = [label for _, label in overlay.colorbar.axis._tickLevels[0]]
    assert any(label.startswith("max ") for label in labels)
    assert overlay.max_line.isVisible() and not overlay.threshold_line.isVisible(), "no rule: no threshold mark"


def test_sigma_sliders_snap_to_calibrated_ends() -> None:
    slider = LogSlider(LogScale(0.002, 10.0))
    slider.anchors = [0.5]
    slider.setValue(slider.scale.position(0.491))  # where a mouse drag lands
    assert slider.value_() == 0.5
    slider.setValue(slider.scale.position(0.45))
    assert slider.value_() == pytest.approx(0.45, rel=0.01), "far from an anchor: the value as dragged"
    maps = [(8, (0.01, 0.5)), (4, (0.01, 0.05))]
    moved = nearest_calibrated(MapSettings(patch=5, sigma_window=(0.011, 0.47)), maps)
    assert (moved.patch, moved.sigma_window) == (8, (0.01, 0.5))
    assert nearest_calibrated(MapSettings(patch=4, sigma_window=(0.02, 0.5)), maps).sigma_window == (0.01, 0.05)
    assert nearest_calibrated(MapSettings(), []) is None


def test_uncalibrated_state_is_said_and_reset_restores(window, qtbot, tiny_prior, tmp_path) -> None:  # noqa: F811
    run_and_wait(qtbot, window)
    controls = window.map_controls
    settings = window.current_result().result.settings
    prior = window.current_result().prior_path
    assert "Uncalibrated" in controls.calibration_label.text() and not controls.reset_button.isEnabled()
    # Calibrate the run's own sampler settings at patch 4, sigma 0.01-0.05 (a stand-in threshold).
    copy = tmp_path / "calibrated-prior"
    shutil.copytree(prior, copy)
    key = {"views": settings.views, "dose_i0": settings.dose_i0, "noise_sigma": settings.noise_sigma,
           "steps": settings.steps, "samples": settings.samples, "patch": 4, "sigma_window": [0.01, 0.5],
           "guidance": settings.guidance}
    (copy / CALIBRATION_FILE).write_text(json.dumps({"calibrations": [{"settings": key, "threshold": 1e-9}]}))
    cached = window.current_result()
    cached.prior_path = copy
    window.refresh_overlay()
    assert controls.reset_button.isEnabled() and "patch 4 px, σ 0.01–0.5" in controls.calibration_label.text()
    controls.reset_button.click()
    qtbot.waitUntil(lambda: window.viewer.overlay.frame.kl_map.patch == 4, timeout=3000)
    assert controls.settings().sigma_window == (0.01, 0.5)
    assert controls.calibration_label.text().startswith("Calibrated") and window.viewer.overlay.frame.flagged


def test_confusing_states_are_resolved(window, qtbot) -> None:  # noqa: F811
    assert "Preparing" not in window.statusBar().currentMessage(), "the status bar says the demo is open"
    viewer = window.viewer
    viewer.keyPressEvent(QKeyEvent(QKeyEvent.Type.KeyPress, Qt.Key.Key_2, Qt.KeyboardModifier.NoModifier))
    assert viewer.preset_combo.currentText().startswith("2  Lung") and matching_preset(viewer.window) == 1
    viewer.drag_window(30, 0)
    assert viewer.preset_combo.currentText() == "Custom W/L"
    run_and_wait(qtbot, window)
    viewer.set_comparing(True)
    assert viewer.compare_kind != viewer.base_kind and viewer.compare_image.image is not None
    assert viewer.compare_view.width() > 0.4 * viewer.view.width(), "two equal panes, not a sliver"
    width = viewer.view.width()
    viewer.set_comparing(False)
    qtbot.waitUntil(lambda: viewer.view.width() > 1.6 * width, timeout=2000)  # one pane again takes the room
    viewer.probe_text = "(3, 4)  HU 40"
    assert window.panel.summary.text()
    stack = np.stack([np.full((16, 16), 40.0, np.float32)] * 2)
    other = window.model  # opening a second study shows it, and drops what was about the first
    path = Path(window.prefs.store.fileName()).parent / "other.npy"
    np.save(path, stack)
    assert window.open_paths([path])
    assert other.current.series.n_slices == 2
    assert viewer.probe_text == "" and window.panel.summary.text() == "", "no stale readout or last-slice line"


def test_cli_says_when_nothing_can_be_flagged(tiny_prior: Path, tmp_path: Path, capsys) -> None:
    from klviewer.cli import main

    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "one.npy", np.full((32, 32), 40.0, np.float32))
    assert main(["analyze", str(tmp_path / "in" / "one.npy"), "--out", str(tmp_path / "out"), "--prior", str(tiny_prior),
                 "--steps", "3", "--views", "8", "--quiet"]) == 0
    out = capsys.readouterr()
    assert "nothing can be flagged" in out.out and "0 flagged" not in out.out and "klviewer calibrate" in out.out
    assert "0step" not in out.err, "no stray progress bar"


def test_progress_bar_appears_only_once_work_is_reported(capsys) -> None:
    from klviewer.cli.progress import progress_bar

    with progress_bar("analyze", "step"):
        pass  # a command refused before any work
    assert capsys.readouterr().err == ""


def test_dicom_objects_of_a_one_word_name_warn_nothing() -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    from klviewer.export.dicom_objects import parametric_map, secondary_capture, unambiguous_names

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "ANONYMOUS"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source = unambiguous_names(ds)
        sc = secondary_capture(source, np.zeros((8, 8, 3), np.uint8), series_uid="1.2.3", instance_number=1)
        pm = parametric_map([source], np.zeros((1, ds.Rows, ds.Columns), np.float32), levels=(0.0, 1.0),
                            description="KL")
    assert str(sc.PatientName) == str(pm.PatientName) == "ANONYMOUS^"
    with pytest.warns(UserWarning, match="single component"):  # what highdicom printed on stderr before
        ds.PatientName = "ANONYMOUS"
        secondary_capture(ds, np.zeros((8, 8, 3), np.uint8), series_uid="1.2.3", instance_number=1)


def test_measurement_numbers() -> None:
    hu = np.zeros((20, 20))
    hu[5:15, 5:15] = 100.0
    mask = roi_mask("rectangle", (5, 5, 10, 10), (20, 20), (20, 20))
    assert mask.sum() == 100
    stats = roi_stats(mask, hu, 0.5, pixel_kl=np.full((20, 20), 0.1), z_pixels=np.where(mask, 2.0, -np.inf))
    assert (stats.hu_mean, stats.hu_sd, stats.area_mm2) == (100.0, 0.0, 25.0)
    assert stats.kl_nats == pytest.approx(10.0) and stats.z_max == 2.0
    assert stats.text("rectangle") == "rectangle: HU 100 ± 0 · 25 mm² · KL 10 nats · KL z max 2"
    ellipse = roi_mask("ellipse", (0, 0, 20, 20), (20, 20), (20, 20))
    assert abs(ellipse.sum() - np.pi * 100) < 12, "a disc of radius 10 px"
    half = roi_mask("rectangle", (0, 0, 10, 20), (20, 20), (10, 10))
    assert half.sum() == 50, "a coarser image stretched over the same extent"
    assert distance_text((0, 0, 3, 4), 2.0) == "distance: 10.0 mm" and distance_text((0, 0, 3, 4), None).endswith("px")
    with pytest.raises(ValueError):
        Measurement.from_dict({"kind": "polygon", "series_uid": "s", "slice_index": 0, "geometry": [0, 0, 1, 1]})


def test_measure_tools_on_the_viewer(window, qtbot) -> None:  # noqa: F811
    run_and_wait(qtbot, window)
    tools = window.tools_view.measure
    roi = tools.add("ellipse")
    assert roi.text.startswith("ellipse: HU ") and "mm²" in roi.text and "KL" in roi.text
    line = tools.add("distance")
    assert line.text.startswith("distance: ") and line.text.endswith(" mm")
    window.set_slice(window.index + 1)
    assert not tools.drawn[0][1].isVisible(), "shapes show on their own slice only"
    window.set_slice(window.index - 1)
    lines = window.model.snapshot(window.map_controls.settings())[0].measurements
    assert lines == [roi.text, line.text], "the export (and its PDF) gets the measurements"
    tools.clear_slice()
    assert window.model.measurements == [] and tools.drawn == []


def test_session_is_saved_and_reopened(window, qtbot, tmp_path) -> None:  # noqa: F811
    run_and_wait(qtbot, window)
    row = window.cases.find(window.current_uid, window.index)
    window.cases.set_manual_flag(row, True)
    window.cases.set_note(row, "recheck")
    window.tools_view.measure.add("rectangle")
    window.map_controls.set_settings(replace(window.map_controls.settings(), patch=4))
    window.viewer.apply_preset(1)
    uid, index = window.current_uid, window.index
    assert unsaved_handwork(window), "closing now would lose the flag, the note and the measurement"
    folder = save_session(window, tmp_path / "reading")
    assert not unsaved_handwork(window)
    assert folder.name == "reading.klvsession" and (folder / "results" / "summary.json").is_file()
    doc = read_session(folder)
    assert doc["current"] == {"series_uid": uid, "slice_index": index} and doc["view"]["patch"] == 4
    assert not list(folder.rglob("*.pkl"))

    from klviewer.app.main_window import MainWindow
    from klviewer.app.session_file import open_session
    from klviewer.app.settings import Preferences, open_settings

    other = MainWindow(Preferences(open_settings()))
    other.notifier.show_dialogs = False
    qtbot.addWidget(other)
    assert open_session(other, folder), other.notifier.history
    assert (other.current_uid, other.index) == (uid, index)
    entry = other.cases[other.cases.find(uid, index)]
    assert entry.manual_flag is True and entry.note == "recheck"
    assert other.current_result() is not None and other.viewer.overlay.frame is not None
    assert other.map_controls.settings().patch == 4 and other.viewer.preset_combo.currentText().startswith("2  Lung")
    assert len(other.model.measurements) == 1 and other.tools_view.measure.drawn
    (folder / "session.json").write_text("{not json")
    assert not open_session(other, folder) and "not valid JSON" in other.notifier.history[-1].text


def test_cine_steps_and_loops(window, qtbot) -> None:  # noqa: F811
    tools = window.tools_view
    window.set_slice(window.current.series.n_slices - 1)
    tools._next_slice()
    assert window.index == 0, "cine loops to the first slice"
    tools.cine.set_fps(30)
    tools.cine_action.setChecked(True)
    qtbot.waitUntil(lambda: window.index >= 2, timeout=3000)
    tools.cine.toggle()
    assert not tools.cine.playing and not tools.cine_action.isChecked()


def test_tag_viewer_and_extensionless_dicom(window, tmp_path) -> None:  # noqa: F811
    from pydicom.data import get_testdata_file

    viewer = window.tools_view.show_tags()
    assert any(row[1] == "PatientID" and row[3] == "KLV-DEMO-001" for row in viewer.rows())
    viewer.filter.setText("modality")
    assert [row[1] for row in viewer.rows()] == ["Modality"]
    viewer.filter.clear()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "IM0001")
    assert OPEN_FILTERS.split(";;")[0].endswith("(*)"), "the Open dialog lists files without .dcm first"
    assert window.open_paths([tmp_path / "IM0001"])
    assert window.current.series.modality == "CT"
    viewer = window.tools_view.show_tags()
    assert any(row[1] == "Rows" and row[3] == "128" for row in viewer.rows())


def test_series_thumbnail_is_the_windowed_middle_slice() -> None:
    slices = [Slice(hu=np.full((64, 32), v, np.float32)) for v in (-1000.0, 40.0, 1000.0)]
    series = Series(uid="s", modality="CT", source_kind="array", slices=slices)
    pixels = thumbnail_pixels(series, size=16)
    assert pixels.shape == (16, 16) and pixels[8, 8] == 128, "soft tissue window: 40 HU is mid-grey"
    assert pixels[8, 3] == 0 and pixels[8, 4] == 128 and pixels[8, 12] == 0, "letterboxed to a square"
    assert thumbnail_pixels(Series(uid="e", modality="CT", source_kind="sinogram")) is None
