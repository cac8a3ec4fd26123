"""`klviewer gui`: start the app, optionally scripted (analyse, set sliders, screenshot, quit)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from PySide6.QtCore import QEventLoop
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

from klviewer import __version__
from klviewer.app.main_window import MainWindow
from klviewer.app.settings import APPLICATION, ORGANIZATION, Preferences, open_settings


@dataclass
class GuiOptions:
    paths: list[Path] = field(default_factory=list)
    analyze: bool = False
    slice_index: int | None = None
    patch: int | None = None
    sigma_window: tuple | None = None
    screenshot: Path | None = None
    quit: bool = False


def dark_palette() -> QPalette:
    """A dark theme, as radiology reading rooms expect: bright UI chrome dazzles next to CT images."""
    p = QPalette()
    colors = {
        QPalette.ColorRole.Window: "#2b2b2b", QPalette.ColorRole.WindowText: "#e0e0e0",
        QPalette.ColorRole.Base: "#1e1e1e", QPalette.ColorRole.AlternateBase: "#262626",
        QPalette.ColorRole.ToolTipBase: "#3a3a3a", QPalette.ColorRole.ToolTipText: "#e0e0e0",
        QPalette.ColorRole.Text: "#e0e0e0", QPalette.ColorRole.Button: "#353535",
        QPalette.ColorRole.ButtonText: "#e0e0e0", QPalette.ColorRole.BrightText: "#ff5050",
        QPalette.ColorRole.Highlight: "#2f6fb0", QPalette.ColorRole.HighlightedText: "#ffffff",
        QPalette.ColorRole.Link: "#6aa8ff", QPalette.ColorRole.PlaceholderText: "#808080",
    }
    for role, color in colors.items():
        p.setColor(role, QColor(color))
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText, QPalette.ColorRole.WindowText):
        p.setColor(QPalette.ColorGroup.Disabled, role, QColor("#707070"))
    return p


INDICATOR_STYLE = """
QCheckBox::indicator, QTableView::indicator { width: 13px; height: 13px; border: 1px solid #8a8a8a;
                                              border-radius: 2px; background: #1e1e1e; }
QCheckBox::indicator:checked { background: #2f6fb0; border-color: #6aa8ff; }
QTableView::indicator:checked { background: #ff6a4d; border-color: #ffb09e; }
"""
"""Fusion's dark-palette check boxes are nearly invisible; a flagged case shows in the flag colour."""


def application() -> QApplication:
    """The running QApplication, or a new one styled for klviewer."""
    app = QApplication.instance()
    if app is None:
        app = QApplication(sys.argv[:1])
        app.setOrganizationName(ORGANIZATION)
        app.setApplicationName(APPLICATION)
        app.setApplicationVersion(__version__)
        app.setStyle("Fusion")
        app.setPalette(dark_palette())
        app.setStyleSheet(INDICATOR_STYLE)
    return app  # type: ignore[return-value]


def analyse_and_wait(window: MainWindow) -> bool:
    """Run the shown slice and wait for it in a local event loop (the GUI keeps painting)."""
    loop = QEventLoop()
    outcome: list[bool] = []

    def finished(ok: bool) -> None:
        outcome.append(ok)
        loop.quit()

    window.analysis_finished.connect(finished)
    try:
        if not window.run_current_slice():
            return False
        if not outcome:
            loop.exec()
    finally:
        window.analysis_finished.disconnect(finished)
    return bool(outcome and outcome[0])


def run_gui(options: GuiOptions) -> int:
    """Open the app; 0 on success, 1 when a scripted step failed, 2 when nothing could be opened."""
    app = application()
    window = MainWindow(Preferences(open_settings()))
    window.show()
    opened = window.open_paths(list(options.paths)) if options.paths else window.open_demo()
    code = 0 if opened else 2
    if opened:
        if options.slice_index is not None:
            count = window.current.series.n_slices
            if not 0 <= options.slice_index < count:
                window.notifier.warning("No such slice", f"--slice {options.slice_index}: the series has slices 0..{count - 1}")
            window.set_slice(options.slice_index)
        if options.patch is not None or options.sigma_window is not None:
            m = window.map_controls.settings()
            window.map_controls.set_settings(replace(
                m, patch=options.patch or m.patch,
                sigma_window=tuple(options.sigma_window) if options.sigma_window else m.sigma_window))
            window.refresh_overlay()
        if options.analyze and not analyse_and_wait(window):
            code = 1
        window.rescore_cases()
        window.refresh_overlay()
    app.processEvents()
    if options.screenshot is not None and not window.save_screenshot(options.screenshot):
        code = 1
    if not options.quit:
        return app.exec()
    for message in window.notifier.history:
        if message.level != "info":
            print(f"klviewer: {message.level}: {message.title}: {message.text}", file=sys.stderr)
    window.close()
    window.deleteLater()
    app.processEvents()
    return code
