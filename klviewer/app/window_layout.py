"""The main window's central area, docks and status bar."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDockWidget, QFrame, QLabel, QLayout, QScrollArea, QVBoxLayout, QWidget

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


def scrolled(widget: QWidget) -> QScrollArea:
    """`widget` in a vertical scroll area: a short dock scrolls instead of squeezing its rows (or letting
    the dock below draw over them)."""
    # The scroll area shrinks its widget down to the widget's minimum size only, and that must follow
    # the layout (a longer summary line raises it), or the rows are squeezed instead of scrolled.
    widget.layout().setSizeConstraint(QLayout.SizeConstraint.SetMinimumSize)
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(widget)
    area.setMinimumWidth(widget.minimumSizeHint().width() + area.verticalScrollBar().sizeHint().width())
    return area


def build_docks(w: MainWindow) -> None:
    """Studies and the case list on the left; on the right the analysis and the prior fit (tabbed: both
    want height), and under them the KL-map sliders, no taller than they need."""
    left, right = Qt.DockWidgetArea.LeftDockWidgetArea, Qt.DockWidgetArea.RightDockWidgetArea
    w.browser_dock = make_dock(w, "Studies", "studiesDock", w.browser, left)
    w.cases_dock = make_dock(w, "Case list", "casesDock", w.case_view, left)
    w.analysis_dock = make_dock(w, "Analysis", "analysisDock", scrolled(w.panel), right)
    w.prior_fit_dock = make_dock(w, "Prior fit", "priorFitDock", scrolled(w.prior_fit), right)
    w.tabifyDockWidget(w.analysis_dock, w.prior_fit_dock)
    map_area = scrolled(w.map_controls)
    map_area.setFixedHeight(w.map_controls.sizeHint().height() + 4)
    w.map_dock = make_dock(w, "KL map", "mapDock", map_area, right)
    w.analysis_dock.raise_()


SIDE_SHARE = 0.22
"""Each side's docks take this share of the window's width (within SIDE_LIMITS)."""
SIDE_LIMITS = (250, 380)


def size_docks(w: MainWindow) -> None:
    """First-run dock widths for the window's size, both sides in proportion; the studies get a third of
    the left side's height, the case list the rest."""
    side = int(min(max(w.width() * SIDE_SHARE, SIDE_LIMITS[0]), SIDE_LIMITS[1]))
    w.resizeDocks([w.browser_dock, w.analysis_dock], [side, side], Qt.Orientation.Horizontal)
    height = w.height()
    w.resizeDocks([w.browser_dock, w.cases_dock], [int(height * 0.35), int(height * 0.65)], Qt.Orientation.Vertical)


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
