"""The main window's central area, docks and status bar."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDockWidget, QLabel, QVBoxLayout, QWidget

from klviewer.devices import resolve_device
from klviewer.errors import KlviewerError

if TYPE_CHECKING:
    from klviewer.app.main_window import MainWindow


def build_central(w: MainWindow) -> None:
    """The viewer, with the study banner (prior mismatch, geometry) above it."""
    w.viewer.graphics.setAcceptDrops(False)  # drops go to the window, which opens them
    central = QWidget()
    column = QVBoxLayout(central)
    column.setContentsMargins(0, 0, 0, 0)
    column.setSpacing(0)
    column.addWidget(w.banner)
    column.addWidget(w.viewer, 1)
    w.setCentralWidget(central)


def make_dock(w: MainWindow, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
    dock = QDockWidget(title, w)
    dock.setObjectName(name)  # saveState() needs names
    dock.setWidget(widget)
    dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable | QDockWidget.DockWidgetFeature.DockWidgetFloatable
                     | QDockWidget.DockWidgetFeature.DockWidgetClosable)
    w.addDockWidget(area, dock)
    return dock


def build_docks(w: MainWindow) -> None:
    """Studies and the case list on the left; analysis, KL map and prior fit (tabbed with the map) on the right."""
    left, right = Qt.DockWidgetArea.LeftDockWidgetArea, Qt.DockWidgetArea.RightDockWidgetArea
    w.browser_dock = make_dock(w, "Studies", "studiesDock", w.browser, left)
    w.cases_dock = make_dock(w, "Case list", "casesDock", w.case_view, left)
    w.analysis_dock = make_dock(w, "Analysis", "analysisDock", w.panel, right)
    w.map_dock = make_dock(w, "KL map", "mapDock", w.map_controls, right)
    w.prior_fit_dock = make_dock(w, "Prior fit", "priorFitDock", w.prior_fit, right)
    w.tabifyDockWidget(w.map_dock, w.prior_fit_dock)
    w.map_dock.raise_()
    w.resizeDocks([w.browser_dock, w.analysis_dock], [340, 340], Qt.Orientation.Horizontal)
    w.resizeDocks([w.browser_dock, w.cases_dock], [300, 480], Qt.Orientation.Vertical)
    w.resizeDocks([w.analysis_dock, w.map_dock], [w.panel.sizeHint().height(), 400], Qt.Orientation.Vertical)


def build_status(w: MainWindow) -> None:
    """The prior and the compute device, always shown at the right of the status bar."""
    w.device_label = QLabel()
    w.prior_label = QLabel()
    w.statusBar().addPermanentWidget(w.prior_label)
    w.statusBar().addPermanentWidget(w.device_label)
    try:
        w.device_label.setText(f"Device: {resolve_device('auto').type.upper()}")
    except KlviewerError:
        w.device_label.setText("Device: CPU")
