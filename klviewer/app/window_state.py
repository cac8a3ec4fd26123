"""What the main window remembers between sessions: the map sliders, its geometry and its docks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import QByteArray

from klviewer.app.display import MapSettings

if TYPE_CHECKING:
    from klviewer.app.main_window import MainWindow

DEFAULT_SIZE = (1560, 960)


def restore_window(w: MainWindow) -> None:
    p = w.prefs
    d = MapSettings()
    w.map_controls.set_settings(MapSettings(
        patch=p.get("map/patch", d.patch),
        sigma_window=(p.get("map/sigma_low", d.sigma_window[0]), p.get("map/sigma_high", d.sigma_window[1])),
        threshold_fraction=p.get("map/threshold", d.threshold_fraction), opacity=p.get("map/opacity", d.opacity),
        show_z=p.get("map/show_z", d.show_z),
    ))
    w.viewer.overlay.set_opacity(w.map_controls.settings().opacity)
    geometry, state = p.get_bytes("window/geometry"), p.get_bytes("window/state")
    if geometry is None or not w.restoreGeometry(geometry):
        w.resize(*DEFAULT_SIZE)
    if state is not None:
        w.restoreState(state)


def save_window(w: MainWindow) -> None:
    p = w.prefs
    m = w.map_controls.settings()
    p.set("map/patch", m.patch)
    p.set("map/sigma_low", m.sigma_window[0])
    p.set("map/sigma_high", m.sigma_window[1])
    p.set("map/threshold", m.threshold_fraction)
    p.set("map/opacity", m.opacity)
    p.set("map/show_z", m.show_z)
    p.set("window/geometry", QByteArray(w.saveGeometry()))
    p.set("window/state", QByteArray(w.saveState()))
    w.panel.save()
    w.prior_fit.save()
    p.sync()
