"""`klviewer gui` scripted: open, analyse, set sliders, screenshot, quit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PySide6.QtCore import QSettings
from PySide6.QtGui import QImage
from test_app_support import FAST_STEPS, isolated_settings  # noqa: F401

from klviewer.app.launch import GuiOptions, run_gui
from klviewer.cli import main


def _pixels(path: Path) -> np.ndarray:
    image = QImage(str(path)).convertToFormat(QImage.Format.Format_Grayscale8)
    assert not image.isNull()
    data = np.frombuffer(image.constBits(), np.uint8, image.sizeInBytes())
    return data.reshape(image.height(), image.bytesPerLine())[:, : image.width()]


def test_gui_analyse_screenshot_quit(qapp, tmp_path: Path, tiny_prior: Path, isolated_settings: Path) -> None:  # noqa: F811
    store = QSettings(str(isolated_settings), QSettings.Format.IniFormat)
    store.setValue("priors/user", [str(tiny_prior)])
    store.setValue("priors/current", str(tiny_prior))
    store.setValue("analysis/steps", FAST_STEPS)
    store.setValue("analysis/device", "cpu")
    store.sync()
    shot = tmp_path / "shot.png"
    code = run_gui(GuiOptions(paths=[], analyze=True, slice_index=6, patch=4, sigma_window=(0.02, 2.0),
                              screenshot=shot, quit=True))
    assert code == 0
    pixels = _pixels(shot)
    assert pixels.shape[1] > 800 and pixels.std() > 10, "a real, non-blank screenshot"
    saved = QSettings(str(isolated_settings), QSettings.Format.IniFormat)
    assert int(saved.value("map/patch")) == 4 and float(saved.value("map/sigma_low")) == 0.02


def test_cli_gui_without_a_prior_still_opens_and_screenshots(qapp, tmp_path: Path) -> None:
    from klviewer.phantoms import make_phantom

    np.save(tmp_path / "slice.npy", make_phantom("lesion", 64, seed=5).hu)
    shot = tmp_path / "plain.png"
    assert main(["gui", str(tmp_path / "slice.npy"), "--screenshot", str(shot), "--quit"]) == 0
    assert _pixels(shot).std() > 10


def test_gui_reports_an_unopenable_path(qapp, tmp_path: Path, capsys) -> None:
    assert run_gui(GuiOptions(paths=[tmp_path / "missing"], quit=True)) == 2
    assert "does not exist" in capsys.readouterr().err
