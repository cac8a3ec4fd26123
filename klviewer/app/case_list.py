"""The case list view: a sortable table over the Qt-free `CaseList`.

Each row names its case (patient, slice, series) in one cell, so the verdict, its flag checkbox (ticked
by the flag rule, or by hand) and the KL z-score fit a narrow dock beside it; the note column is
editable, and picking a row asks the main window to show that slice.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, QSortFilterProxyModel, Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTableView, QVBoxLayout, QWidget

from klviewer.app.cases import CaseChange, CaseEntry, CaseList
from klviewer.inference.verdict_text import MISMATCH, slice_label

COLUMNS = ("Case", "Verdict", "KL z", "Score (nats)", "Note")
"""Slices are numbered from 0, as everywhere (klviewer.inference.verdict_text.slice_label)."""
CASE_COLUMN = COLUMNS.index("Case")
VERDICT_COLUMN = FLAG_COLUMN = COLUMNS.index("Verdict")
"""The verdict's text beside its flag checkbox."""
Z_COLUMN = COLUMNS.index("KL z")
SCORE_COLUMN = COLUMNS.index("Score (nats)")
NOTE_COLUMN = COLUMNS.index("Note")
COLUMN_WIDTHS = {CASE_COLUMN: 128, VERDICT_COLUMN: 104, Z_COLUMN: 46, SCORE_COLUMN: 84, NOTE_COLUMN: 120}
SORT_ROLE = Qt.ItemDataRole.UserRole

Index = QModelIndex | QPersistentModelIndex


class CaseTableModel(QAbstractTableModel):
    def __init__(self, cases: CaseList, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.cases = cases
        self._attached = True
        cases.subscribe(self._on_change)

    def detach(self) -> None:
        """Stop listening, so a case list that outlives this model never calls into a deleted one."""
        if self._attached:
            self.cases.unsubscribe(self._on_change)
            self._attached = False

    def _on_change(self, change: CaseChange) -> None:
        if change.kind == "inserting":
            self.beginInsertRows(QModelIndex(), change.row, change.row)
        elif change.kind == "inserted":
            self.endInsertRows()
        elif change.kind == "changed":
            self.dataChanged.emit(self.index(change.row, 0), self.index(change.row, len(COLUMNS) - 1))
        elif change.kind == "resetting":
            self.beginResetModel()
        elif change.kind == "reset":
            self.endResetModel()

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802 (Qt API)
        return 0 if parent.isValid() else len(self.cases)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:  # noqa: N802
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        return None

    def flags(self, index: Index) -> Qt.ItemFlag:
        base = Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable
        if index.column() == FLAG_COLUMN:
            return base | Qt.ItemFlag.ItemIsUserCheckable
        if index.column() == NOTE_COLUMN:
            return base | Qt.ItemFlag.ItemIsEditable
        return base

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        entry: CaseEntry = self.cases[index.row()]
        col = index.column()
        if role == Qt.ItemDataRole.CheckStateRole and col == FLAG_COLUMN:
            return Qt.CheckState.Checked if entry.flagged else Qt.CheckState.Unchecked
        z = entry.z_score
        if role == SORT_ROLE:
            # Qt sorts strings and numbers, not tuples: the case by patient, series, then slice number.
            case = f"{entry.patient}\x00{entry.series}\x00{entry.slice_index:09d}"
            return (case, f"{int(entry.flagged)}{entry.status}", float("-inf") if z is None else z, entry.score,
                    entry.note)[col]
        if role == Qt.ItemDataRole.ToolTipRole:
            return self._tooltip(entry, col)
        if role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole):
            case = f"{entry.patient} · {slice_label(entry.slice_index)}\n{entry.series}"
            return (case, entry.status, "" if z is None else f"{z:.3g}", f"{entry.score:.4g}", entry.note)[col]
        if role == Qt.ItemDataRole.ForegroundRole and col == VERDICT_COLUMN and (entry.flagged or entry.verdict == MISMATCH):
            return QColor("#ff6a4d")
        if role == Qt.ItemDataRole.TextAlignmentRole and col in (SCORE_COLUMN, Z_COLUMN):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    @staticmethod
    def _tooltip(entry: CaseEntry, col: int) -> str | None:
        rule = entry.rule
        if col == VERDICT_COLUMN:
            source = "flag set by hand" if entry.manual_flag is not None else "flag by the rule (tick to set it by hand)"
            return f"{source}; {rule}" if rule else source
        if col == Z_COLUMN:
            return "KL z-score against the prior's healthy reference (empty where it has none for these map settings)"
        if col == CASE_COLUMN:
            return f"patient {entry.patient}\nseries {entry.series}\n{slice_label(entry.slice_index)} (numbered from 0)"
        return None

    def setData(self, index: Index, value: Any, role: int = Qt.ItemDataRole.EditRole) -> bool:  # noqa: N802
        if not index.isValid():
            return False
        if index.column() == FLAG_COLUMN and role == Qt.ItemDataRole.CheckStateRole:
            checked = Qt.CheckState(value) == Qt.CheckState.Checked if not isinstance(value, bool) else value
            self.cases.set_manual_flag(index.row(), checked)
            return True
        if index.column() == NOTE_COLUMN and role == Qt.ItemDataRole.EditRole:
            self.cases.set_note(index.row(), str(value))
            return True
        return False


class CaseListView(QWidget):
    case_selected = Signal(str, int)
    """(series uid, slice index) of the row the user picked."""

    def __init__(self, cases: CaseList, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = CaseTableModel(cases, self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_ROLE)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(SCORE_COLUMN, Qt.SortOrder.DescendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.DoubleClicked
                                   | QAbstractItemView.EditTrigger.EditKeyPressed)
        self.table.verticalHeader().setVisible(False)
        # Long patient and series names wrap onto more lines instead of being cut.
        self.table.verticalHeader().setMinimumSectionSize(self.table.fontMetrics().height() + 8)
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setWordWrap(True)
        self.table.setTextElideMode(Qt.TextElideMode.ElideNone)
        self.table.setAlternatingRowColors(True)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        for col, width in COLUMN_WIDTHS.items():
            header.resizeSection(col, max(width, header.sectionSizeHint(col)))
        header.setStretchLastSection(True)
        # Moving through the rows (mouse or arrow keys) shows each slice; a click re-shows the current one.
        self.table.selectionModel().currentRowChanged.connect(lambda current, _previous: self._picked(current))
        self.table.clicked.connect(self._picked)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.table)

    def _picked(self, proxy_index: QModelIndex) -> None:
        if not proxy_index.isValid():
            return
        row = self.proxy.mapToSource(proxy_index).row()
        entry = self.model.cases[row]
        self.case_selected.emit(entry.series_uid, entry.slice_index)

    def select_row(self, source_row: int) -> None:
        """Pick a row as a user would (tests and keyboard navigation use this)."""
        self.table.setCurrentIndex(self.proxy.mapFromSource(self.model.index(source_row, 0)))
