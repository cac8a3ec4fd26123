"""The viewer and main window without analysis: loading, window/level, keys, mouse, probe, browser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent, QWheelEvent
from PySide6.QtWidgets import QApplication, QMessageBox
from test_app_support import isolated_settings, window  # noqa: F401

from klviewer.app.browser import KIND_ROLE
from klviewer.app.display import PRESETS


def test_demo_study_loads_into_browser_and_viewer(window) -> None:
    series = window.current.series
    assert series.n_slices == 8 and window.index == 4
    item = window.browser.series_item(series.uid)
    assert item is not None and item.data(0, KIND_ROLE) == "series"
    assert item.text(1) == "CT" and item.text(2) == "8"
    assert item.parent().parent().text(0).startswith("PHANTOM")
    image = window.viewer.base.image
    assert image is not None and image.shape == (256, 256)
    assert np.array_equal(image, series.slices[4].hu)
    tl, tr = window.viewer.corners["tl"].text(), window.viewer.corners["tr"].text()
    assert "KLV-DEMO-001" in tl and "Slice 4 (of 0–7)" in tr
    assert "W 400" in window.viewer.corners["bl"].text()
    assert "not analysed" in window.viewer.corners["br"].text()
    assert window.viewer.overlay.frame is None, "no overlay before analysis"
    assert window.viewer.base_combo.model().item(window.viewer.base_combo.findData("mean")).isEnabled() is False


def test_presets_keys_and_drag_change_window_level(window, qtbot) -> None:
    viewer = window.viewer
    before = tuple(viewer.base.levels)
    qtbot.keyClick(viewer, Qt.Key.Key_2)
    assert tuple(viewer.base.levels) == pytest.approx(PRESETS[1].window.levels) != before
    for n, preset in enumerate(PRESETS):
        qtbot.keyClick(viewer, getattr(Qt.Key, f"Key_{n + 1}"))
        assert tuple(viewer.base.levels) == pytest.approx(preset.window.levels)
        assert f"W {preset.window.width:.0f}" in viewer.corners["bl"].text()
    viewer.drag_window(50, 0)
    assert viewer.window.width > PRESETS[4].window.width and viewer.window.level == PRESETS[4].window.level
    viewer.drag_window(0, 40)
    assert viewer.window.level > PRESETS[4].window.level


def test_slice_keys_wheel_invert_overlay_and_reset(window, qtbot) -> None:
    viewer = window.viewer
    qtbot.keyClick(viewer, Qt.Key.Key_Down)
    assert window.index == 5
    qtbot.keyClick(viewer, Qt.Key.Key_PageUp)
    qtbot.keyClick(viewer, Qt.Key.Key_Up)
    assert window.index == 3
    for _ in range(10):
        qtbot.keyClick(viewer, Qt.Key.Key_Up)
    assert window.index == 0, "slice stays in range"
    assert np.array_equal(viewer.base.image, window.current.series.slices[0].hu)

    view_widget = viewer.graphics
    centre = QPointF(view_widget.width() / 2, view_widget.height() / 2)
    wheel = QWheelEvent(centre, view_widget.mapToGlobal(centre), QPoint(0, 0), QPoint(0, -120),
                        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(view_widget.viewport(), wheel)
    assert window.index == 1, "wheel down = next slice"

    qtbot.keyClick(viewer, Qt.Key.Key_I)
    assert viewer.inverted and viewer.base.lut[0] == 255
    assert "inverted" in viewer.corners["bl"].text()

    viewer.view.scaleBy((0.25, 0.25))
    zoomed = viewer.view.viewRange()
    qtbot.keyClick(viewer, Qt.Key.Key_R)
    assert viewer.view.viewRange() != zoomed
    assert viewer.view.viewRange()[0][0] <= 0 and viewer.view.viewRange()[0][1] >= 256

    toggled: list[bool] = []
    viewer.overlay_toggled.connect(toggled.append)
    qtbot.keyClick(viewer, Qt.Key.Key_O)
    assert toggled == [False] and not viewer.overlay_check.isChecked()


def test_keys_reach_the_viewer_from_a_panel_button(window, qtbot) -> None:
    window.panel.run_slice_button.setFocus()
    qtbot.keyClick(window.panel.run_slice_button, Qt.Key.Key_3)
    assert tuple(window.viewer.base.levels) == pytest.approx(PRESETS[2].window.levels)


def test_probe_reports_hu_under_the_cursor(window) -> None:
    viewer = window.viewer
    scene_pos = viewer.base.mapToScene(QPointF(128.5, 100.5))
    text = viewer.probe_at(scene_pos)
    hu = window.current.series.slices[window.index].hu[100, 128]
    assert text.startswith("(128, 100)") and f"HU {hu:.0f}" in text and "KL" not in text
    assert viewer.probe_at(viewer.base.mapToScene(QPointF(-50, -50))) == ""


def test_drop_opens_files_and_recent_items_are_remembered(window, tmp_path: Path) -> None:
    from klviewer.phantoms import make_phantom

    np.save(tmp_path / "one.npy", make_phantom("healthy", 48, seed=3).hu)
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(tmp_path / "one.npy"))])
    event = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    window.dropEvent(event)
    assert window.current.series.image_shape == (48, 48)
    assert window.browser.topLevelItemCount() == 2
    assert window.prefs.recent()[0] == str((tmp_path / "one.npy").resolve())
    assert window.recent_menu.actions()[0].text() == str((tmp_path / "one.npy").resolve())
    window.browser.setCurrentItem(window.browser.series_item(next(iter(window.series))))
    assert window.current.series.n_slices == 8, "picking a series in the browser shows it"


def test_help_dialogs_are_non_modal(window, qtbot) -> None:
    window.show_shortcuts()
    window.show_about()
    boxes = [w for w in window.findChildren(QMessageBox) if w.isVisible()]
    texts = " ".join(b.text() for b in boxes)
    assert "Left drag" in texts and "torch" in texts and "PySide6" in texts and "tiny-test" in texts
    assert all(b.windowModality() == Qt.WindowModality.NonModal for b in boxes)


def test_window_state_and_settings_persist(qtbot, window, isolated_settings: Path) -> None:  # noqa: F811
    from klviewer.app.main_window import MainWindow
    from klviewer.app.settings import Preferences, open_settings

    window.cases_dock.hide()
    window.map_controls.patch.setValue(12)
    window.panel.views.setValue(60)
    window.close()
    again = MainWindow(Preferences(open_settings()))
    qtbot.addWidget(again)
    again.show()
    assert again.prefs.get_bytes("window/geometry") is not None
    assert again.cases_dock.isHidden() and not again.analysis_dock.isHidden(), "dock layout restored"
    assert again.map_controls.settings().patch == 12
    assert again.panel.views.value() == 60
    assert again.panel.prior_name() == "tiny-test"
    assert isolated_settings.is_file()


def _drag(qtbot, widget, button: Qt.MouseButton, offset: QPoint) -> None:
    start = QPoint(widget.width() // 2, widget.height() // 2)
    qtbot.mousePress(widget, button, pos=start)
    for k in range(1, 6):
        qtbot.mouseMove(widget, start + offset * k / 5)
        qtbot.wait(15)  # pyqtgraph rate-limits move handling; give each move its turn
    qtbot.mouseRelease(widget, button, pos=start + offset)


def test_mouse_left_drag_window_level_right_zoom_middle_pan(window, qtbot) -> None:
    viewer = window.viewer
    viewport = viewer.graphics.viewport()
    before = viewer.window
    _drag(qtbot, viewport, Qt.MouseButton.LeftButton, QPoint(60, 0))
    assert viewer.window.width > before.width and viewer.window.level == before.level
    _drag(qtbot, viewport, Qt.MouseButton.LeftButton, QPoint(0, 40))
    assert viewer.window.level > before.level
    full = viewer.view.viewRange()
    _drag(qtbot, viewport, Qt.MouseButton.RightButton, QPoint(0, -60))
    zoomed = viewer.view.viewRange()
    assert zoomed[0][1] - zoomed[0][0] < full[0][1] - full[0][0], "right drag up zooms in"
    _drag(qtbot, viewport, Qt.MouseButton.MiddleButton, QPoint(60, 0))
    panned = viewer.view.viewRange()
    assert panned[0][0] < zoomed[0][0] and panned[0][1] - panned[0][0] == pytest.approx(zoomed[0][1] - zoomed[0][0])
