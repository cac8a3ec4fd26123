"""Layout facts Qt can tell about the main window, as readable problems (an empty list: the layout holds).

Used by the tests (offscreen) and by `klviewer.app.screen_check` (a real X window at 1366×768 and
1920×1080): the window fits the screen's available area, no dock is drawn over the run buttons,
the run buttons and the map sliders can be reached, spin boxes keep their height, and column
headers are not cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import QPoint, QRect
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QAbstractSpinBox, QDockWidget, QHeaderView, QWidget

if TYPE_CHECKING:
    from klviewer.app.main_window import MainWindow


def global_rect(widget: QWidget) -> QRect:
    return QRect(widget.mapToGlobal(QPoint(0, 0)), widget.size())


def layout_problems(w: MainWindow) -> list[str]:
    problems: list[str] = []
    screen = w.screen() or QGuiApplication.primaryScreen()
    available = screen.availableGeometry()
    if not available.contains(w.frameGeometry()):
        problems.append(f"window {_r(w.frameGeometry())} is not inside the screen's available area {_r(available)}")
    buttons = [w.panel.run_slice_button, w.panel.run_series_button, w.panel.cancel_button]
    for button in buttons:
        rect = global_rect(button)
        if not button.isVisible() or button.visibleRegion().isEmpty():
            problems.append(f"'{button.text()}' cannot be seen (scroll the Analysis panel or enlarge the window)")
        elif not available.contains(rect):
            problems.append(f"'{button.text()}' at {_r(rect)} is off the screen")
        for dock in w.findChildren(QDockWidget):
            if dock is w.analysis_dock or not dock.isVisible() or dock.isFloating():
                continue
            if global_rect(dock).intersects(rect):
                problems.append(f"dock '{dock.windowTitle()}' overlaps '{button.text()}'")
    for slider in (w.map_controls.sigma_low, w.map_controls.patch, w.map_controls.opacity):
        if w.map_dock.isVisible() and not w.map_dock.visibleRegion().isEmpty() and not available.contains(global_rect(slider)):
            problems.append(f"a KL-map slider at {_r(global_rect(slider))} is off the screen")
    for spin in w.panel.findChildren(QAbstractSpinBox):
        if spin.isVisible() and spin.height() < spin.minimumSizeHint().height():
            problems.append(f"spin box '{spin.toolTip()[:30]}' squeezed to {spin.height()} px "
                            f"(needs {spin.minimumSizeHint().height()})")
    for header, where in ((w.browser.header(), "Studies"), (w.case_view.table.horizontalHeader(), "Case list")):
        problems += _cut_headers(header, where)
    return problems


def _cut_headers(header: QHeaderView, where: str) -> list[str]:
    """Header sections narrower than Qt's own size for their title."""
    model = header.model()
    cut = []
    for section in range(header.count()):
        if header.isSectionHidden(section):
            continue
        title = str(model.headerData(section, header.orientation()) or "")
        needed = header.sectionSizeHint(section)
        if header.sectionSize(section) < needed:
            cut.append(f"{where} column '{title}' is {header.sectionSize(section)} px wide, its title needs {needed}")
    return cut


def _r(rect: QRect) -> str:
    return f"{rect.width()}×{rect.height()}+{rect.x()}+{rect.y()}"
