"""What the main window remembers between sessions: the map sliders, its geometry and its docks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import QByteArray, QRect, QSize, QTimer
from PySide6.QtGui import QGuiApplication, QScreen

from klviewer.app.display import MapSettings
from klviewer.app.window_layout import size_docks

if TYPE_CHECKING:
    from klviewer.app.main_window import MainWindow

DEFAULT_SIZE = (1560, 960)
"""The window's size on a screen with room for it; smaller screens get their whole available area."""
FRAME_ALLOWANCE = (0, 32)
"""Room left for a window manager's frame (title bar) when the window fills a small screen."""


def fitted_geometry(available: QRect, size: tuple[int, int] = DEFAULT_SIZE) -> QRect:
    """The window's rectangle on a screen whose available area (without task bars) is `available`:
    the default size where it fits, else the available area less a title bar, centred."""
    width = min(size[0], available.width() - FRAME_ALLOWANCE[0])
    height = min(size[1], available.height() - FRAME_ALLOWANCE[1])
    rect = QRect(0, 0, width, height)
    rect.moveCenter(available.center())
    rect.moveTop(max(available.top(), rect.top()))
    return rect


def real_screen(w: MainWindow) -> QScreen | None:
    """The screen the window is on; None for Qt's offscreen platform, whose 800-pixel "screen" no one looks at
    (scripted screenshots keep the default size there)."""
    if QGuiApplication.platformName() == "offscreen":
        return None
    return w.screen() or QGuiApplication.primaryScreen()


def fit_to_screen(w: MainWindow) -> None:
    """Keep the window inside its screen's available area (a saved geometry may come from a larger screen)."""
    screen = real_screen(w)
    if screen is None:
        return
    available = screen.availableGeometry()
    frame = w.frameGeometry()
    if available.contains(frame) and frame.width() > 0:
        return
    extra = QSize(frame.width() - w.width(), frame.height() - w.height())
    target = fitted_geometry(available, (w.width(), w.height()))
    w.resize(target.width() - max(extra.width(), 0), target.height() - max(extra.height() - FRAME_ALLOWANCE[1], 0))
    w.move(target.topLeft())


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
        screen = real_screen(w)
        if screen is None:
            w.resize(*DEFAULT_SIZE)
        else:
            w.setGeometry(fitted_geometry(screen.availableGeometry()))
    fit_to_screen(w)
    if state is None or not w.restoreState(state):
        QTimer.singleShot(0, lambda: size_docks(w))  # once the window is laid out at its size


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
