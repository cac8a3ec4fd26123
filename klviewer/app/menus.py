"""The main window's menu bar: File, View, Analysis and Help, and the recent-items list."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QFileDialog, QMenu, QWidget

from klviewer.app.display import PRESETS
from klviewer.app.session_file import open_session_dialog, save_session_dialog

if TYPE_CHECKING:
    from klviewer.app.main_window import MainWindow


def action(parent: QWidget, text: str, slot: Callable, shortcut: QKeySequence | str | None = None) -> QAction:
    item = QAction(text, parent)
    if shortcut is not None:
        item.setShortcut(QKeySequence(shortcut))
    item.triggered.connect(slot)
    return item


def build_menus(w: MainWindow) -> QMenu:
    """Fill `w`'s menu bar; returns the "Open recent" menu, which `fill_recent` keeps current."""
    bar = w.menuBar()
    file_menu = bar.addMenu("&File")
    file_menu.addAction(action(w, "Open &file…", lambda: open_file_dialog(w), QKeySequence.StandardKey.Open))
    file_menu.addAction(action(w, "Open f&older (or DICOMDIR folder)…", lambda: open_folder_dialog(w), "Ctrl+Shift+O"))
    recent = file_menu.addMenu("Open &recent")
    file_menu.addAction(action(w, "Open &demo study", w.open_demo))
    file_menu.addSeparator()
    file_menu.addAction(action(w, "Save sessio&n…", lambda: save_session_dialog(w), QKeySequence.StandardKey.Save))
    file_menu.addAction(action(w, "Open sess&ion…", lambda: open_session_dialog(w)))
    file_menu.addSeparator()
    file_menu.addAction(action(w, "Save &screenshot…", lambda: screenshot_dialog(w)))
    file_menu.addAction(action(w, "&Export flagged…", w.open_export_dialog, "Ctrl+E"))
    file_menu.addSeparator()
    file_menu.addAction(action(w, "&Quit", w.close, QKeySequence.StandardKey.Quit))

    view_menu = bar.addMenu("&View")
    for n, preset in enumerate(PRESETS):
        view_menu.addAction(action(w, f"{preset.name} window\t{n + 1}", lambda _=False, n=n: w.viewer.apply_preset(n)))
    view_menu.addSeparator()
    view_menu.addAction(action(w, "KL overlay on/off\to",
                               lambda: w.viewer.set_overlay_visible(not w.viewer.overlay.visible)))
    view_menu.addAction(action(w, "Invert\ti", w.viewer.toggle_invert))
    view_menu.addAction(action(w, "Reset view\tr", w.viewer.reset_view))
    view_menu.addSeparator()
    w.tools_view.add_menu_actions(view_menu)
    view_menu.addSeparator()
    for dock in (w.browser_dock, w.cases_dock, w.analysis_dock, w.map_dock, w.prior_fit_dock):
        view_menu.addAction(dock.toggleViewAction())

    run_menu = bar.addMenu("&Analysis")
    run_menu.addAction(action(w, "Run &slice", w.run_current_slice, "Ctrl+R"))
    run_menu.addAction(action(w, "Run s&eries", w.run_series, "Ctrl+Shift+R"))
    run_menu.addAction(action(w, "&Cancel", w.cancel_run, "Esc"))
    run_menu.addSeparator()
    run_menu.addAction(action(w, "&Prior fit…", w.show_prior_fit))
    run_menu.addAction(action(w, "A&dapt prior to my studies…", w.open_adapt_dialog))
    run_menu.addAction(action(w, "&Align prior…", w.open_align_dialog))
    run_menu.addAction(action(w, "C&ompare priors…", w.open_compare_dialog))

    help_menu = bar.addMenu("&Help")
    help_menu.addAction(action(w, "&Keyboard shortcuts", w.show_shortcuts, QKeySequence.StandardKey.HelpContents))
    help_menu.addAction(action(w, "&About klviewer", w.show_about))
    return recent


def fill_recent(w: MainWindow) -> None:
    """The recent files and folders of `w.prefs`, newest first, and a way to clear them."""
    menu = w.recent_menu
    menu.clear()
    recent = w.prefs.recent()
    for path in recent:
        menu.addAction(action(w, path, lambda _=False, p=path: w.open_paths([Path(p)])))
    if recent:
        menu.addSeparator()

        def clear() -> None:
            w.prefs.clear_recent()
            fill_recent(w)

        menu.addAction(action(w, "Clear list", clear))
    menu.setEnabled(bool(recent))


OPEN_FILTERS = ";;".join((
    "CT images, any file name: DICOM (with or without .dcm), .npy, .npz, sinogram .json, NIfTI, .inv3 (*)",
    "DICOM files named .dcm, and DICOMDIR (*.dcm *.DCM DICOMDIR)",
    "Arrays, sinograms, NIfTI and InVesalius (*.npy *.npz *.json *.nii *.nii.gz *.inv3)",
))
"""The first filter shows every file: DICOM files often have no extension (IM0001, or a UID); the reader
tells what a file is from its content."""


def open_file_dialog(w: MainWindow) -> None:
    files, _ = QFileDialog.getOpenFileNames(w, "Open files", w.prefs.get("open/last_dir", ""), OPEN_FILTERS)
    if files:
        w.prefs.set("open/last_dir", str(Path(files[0]).parent))
        w.open_paths([Path(f) for f in files])


def open_folder_dialog(w: MainWindow) -> None:
    folder = QFileDialog.getExistingDirectory(w, "Open folder", w.prefs.get("open/last_dir", ""))
    if folder:
        w.prefs.set("open/last_dir", folder)
        w.open_paths([Path(folder)])


def screenshot_dialog(w: MainWindow) -> None:
    path, _ = QFileDialog.getSaveFileName(w, "Save screenshot", "klviewer.png", "PNG image (*.png)")
    if path:
        w.save_screenshot(Path(path))
