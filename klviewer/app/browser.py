"""The study browser: patient -> study -> series, with description, modality and image count."""

from __future__ import annotations

import textwrap

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtWidgets import QHeaderView, QTreeWidget, QTreeWidgetItem, QWidget

from klviewer.app.display import patient_label, series_label, study_label
from klviewer.app.thumbnails import THUMBNAIL_PX, thumbnail_icon
from klviewer.io.study import Patient

KIND_ROLE = Qt.ItemDataRole.UserRole
UID_ROLE = Qt.ItemDataRole.UserRole + 1


WRAP_CHARS = 12
"""Names longer than this go onto more lines, so a narrow Studies dock shows them whole."""


def wrapped(text: str) -> str:
    return textwrap.fill(text, WRAP_CHARS, break_on_hyphens=False)  # a long UID is broken too


def _tag(item: QTreeWidgetItem, kind: str, uid: str) -> None:
    item.setData(0, KIND_ROLE, kind)
    item.setData(0, UID_ROLE, uid)


class StudyBrowser(QTreeWidget):
    series_selected = Signal(str)
    """Series uid the user picked."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setColumnCount(3)
        self.setHeaderLabels(["Patient / study / series", "Modality", "Images"])
        header = self.header()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(False)
        self.setTextElideMode(Qt.TextElideMode.ElideNone)  # long names are wrapped (see `wrapped`), not cut
        self.setIconSize(QSize(THUMBNAIL_PX, THUMBNAIL_PX))
        self.itemSelectionChanged.connect(self._selection_changed)

    def add_patients(self, patients: list[Patient]) -> None:
        """Add what was opened, merging into patients and studies already listed."""
        for patient in patients:
            p_item = self._child(self.invisibleRootItem(), patient.patient_id)
            if p_item is None:
                p_item = QTreeWidgetItem([wrapped(patient_label(patient)), "", ""])
                _tag(p_item, "patient", patient.patient_id)
                self.addTopLevelItem(p_item)
            for study in patient.studies:
                s_item = self._child(p_item, study.uid)
                if s_item is None:
                    s_item = QTreeWidgetItem([wrapped(study_label(study)), "", ""])
                    _tag(s_item, "study", study.uid)
                    p_item.addChild(s_item)
                for series in study.series:
                    if self._child(s_item, series.uid) is not None:
                        continue
                    item = QTreeWidgetItem([wrapped(series_label(series)), series.modality, str(series.n_slices)])
                    _tag(item, "series", series.uid)
                    item.setTextAlignment(2, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                    icon = thumbnail_icon(series)
                    if icon is not None:
                        item.setIcon(0, icon)
                    tip = [series.description or series.uid, f"{series.n_slices} image(s), {series.source_kind}"]
                    tip += series.warnings
                    refusal = series.analysis_refusal()
                    if refusal:
                        tip.append(f"view only: {refusal}")
                    item.setToolTip(0, "\n".join(tip))
                    s_item.addChild(item)
                p_item.setExpanded(True)
                s_item.setExpanded(True)

    @staticmethod
    def _child(parent: QTreeWidgetItem, uid: str) -> QTreeWidgetItem | None:
        for i in range(parent.childCount()):
            if parent.child(i).data(0, UID_ROLE) == uid:
                return parent.child(i)
        return None

    def series_item(self, uid: str) -> QTreeWidgetItem | None:
        for item in self.findItems("*", Qt.MatchFlag.MatchWildcard | Qt.MatchFlag.MatchRecursive):
            if item.data(0, KIND_ROLE) == "series" and item.data(0, UID_ROLE) == uid:
                return item
        return None

    def select_series(self, uid: str) -> None:
        item = self.series_item(uid)
        if item is not None and self.currentItem() is not item:
            self.blockSignals(True)
            self.setCurrentItem(item)
            self.blockSignals(False)

    def _selection_changed(self) -> None:
        item = self.currentItem()
        if item is not None and item.data(0, KIND_ROLE) == "series":
            self.series_selected.emit(item.data(0, UID_ROLE))
