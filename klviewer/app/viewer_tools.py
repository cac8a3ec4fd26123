"""The viewer's tools beside window/level and the overlay: measurements, cine and the DICOM tag viewer.

They live here, not in the main window: it creates one `ViewerTools`, whose toolbar buttons go on
the viewer's toolbar and whose actions go into the View menu.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QMenu, QSpinBox, QToolButton

from klviewer.app.cine import MAX_FPS, Cine
from klviewer.app.measure_tools import MeasureTools
from klviewer.app.tag_viewer import TagViewer, slice_file
from klviewer.inference.verdict_text import slice_label

if TYPE_CHECKING:
    from klviewer.app.main_window import MainWindow


class ViewerTools:
    def __init__(self, window: MainWindow) -> None:
        self.w = window
        self.measure = MeasureTools(window)
        self.cine = Cine(self._next_slice, window)
        self.tags: TagViewer | None = None
        window.viewer.overlay_set.connect(self.measure.refresh)

        bar = window.viewer.toolbar
        bar.addSeparator()
        measure = QToolButton(text="Measure")
        measure.setToolTip("Distance, or an ellipse or rectangle ROI with HU mean ± SD, area, and the KL and KL "
                           "z-score inside; drag the shape and its handles")
        measure.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        menu = QMenu(measure)
        for kind in ("distance", "ellipse", "rectangle"):
            menu.addAction(f"Add {kind}", lambda kind=kind: self.measure.add(kind))
        menu.addSeparator()
        menu.addAction("Clear this slice's measurements", self.measure.clear_slice)
        measure.setMenu(menu)
        bar.addWidget(measure)
        self.cine_action = QAction("▶ Cine", window, checkable=True)
        self.cine_action.setToolTip("Play the slices (c)")
        self.cine_action.toggled.connect(self.cine.set_playing)
        self.cine.playing_changed.connect(self.cine_action.setChecked)
        bar.addAction(self.cine_action)
        self.fps = QSpinBox()
        self.fps.setRange(1, MAX_FPS)
        self.fps.setValue(self.cine.fps)
        self.fps.setSuffix(" fps")
        self.fps.setToolTip("Cine rate, slices per second")
        self.fps.valueChanged.connect(self.cine.set_fps)
        bar.addWidget(self.fps)
        bar.addAction("Tags", self.show_tags).setToolTip("DICOM tags of the shown slice (t)")

    def add_menu_actions(self, menu: QMenu) -> None:
        cine = QAction("Cine play/pause", self.w)
        cine.setShortcut(QKeySequence("C"))
        cine.triggered.connect(self.cine.toggle)
        tags = QAction("DICOM tags of this slice…", self.w)
        tags.setShortcut(QKeySequence("T"))
        tags.triggered.connect(self.show_tags)
        menu.addAction(cine)
        menu.addAction(tags)

    def _next_slice(self) -> None:
        entry = self.w.current
        if entry is None or entry.series.n_slices < 2:
            self.cine.set_playing(False)
            return
        self.w.set_slice((self.w.index + 1) % entry.series.n_slices)

    def show_tags(self) -> TagViewer:
        if self.tags is None:
            self.tags = TagViewer(self.w)
        entry = self.w.current
        if entry is None:
            self.tags.show_file(None, "No study open")
        else:
            what = f"{entry.series.description or entry.series.uid}, {slice_label(self.w.index, entry.series.n_slices)}"
            self.tags.show_file(slice_file(entry.series, self.w.index), what)
        self.tags.show()
        self.tags.raise_()
        return self.tags
