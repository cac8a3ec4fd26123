"""The case list view: a sortable table over the Qt-free `CaseList`.

The flag column is a checkbox (ticked automatically above the threshold, or by hand), the note
column is editable, and picking a row asks the main window to show that slice.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, QSortFilterProxyModel, Qt, Signal
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTableView, QVBoxLayout, QWidget

from klviewer.app.cases import CaseChange, CaseEntry, CaseList

COLUMNS = ("Slice", "Score (nats)", "KL z", "Flagged", "Note", "Series", "Patient")
SLICE_COLUMN = COLUMNS.index("Slice")
SCORE_COLUMN = COLUMNS.index("Score (nats)")
Z_COLUMN = COLUMNS.index("KL z")
FLAG_COLUMN = COLUMNS.index("Flagged")
NOTE_COLUMN = COLUMNS.index("Note")
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
            return (entry.slice_index, entry.score, float("-inf") if z is None else z, int(entry.flagged), entry.note,
                    entry.series, entry.patient)[col]
        if role == Qt.ItemDataRole.ToolTipRole and col == FLAG_COLUMN:
            return ("flag set by hand" if entry.manual_flag is not None
                    else f"automatic: {entry.verdict}: {entry.rule}" if entry.verdict
                    else "automatic: ticked when the KL z-score (or, without a healthy reference, the score) "
                         "is above the calibrated threshold")
        if role == Qt.ItemDataRole.ToolTipRole and col == Z_COLUMN:
            return "KL z-score against the prior's healthy reference (empty where it has none for these map settings)"
        if role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole):
            if col == FLAG_COLUMN:
                return entry.verdict if entry.manual_flag is None and entry.verdict else entry.flag_source
            return (entry.slice_index + 1, f"{entry.score:.4g}", "" if z is None else f"{z:.3g}", None, entry.note,
                    entry.series, entry.patient)[col]
        if role == Qt.ItemDataRole.TextAlignmentRole and col in (SLICE_COLUMN, SCORE_COLUMN, Z_COLUMN):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
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
        self.table.verticalHeader().setDefaultSectionSize(self.table.fontMetrics().height() + 8)
        self.table.setWordWrap(False)
        self.table.setAlternatingRowColors(True)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        for col, width in ((SLICE_COLUMN, 44), (SCORE_COLUMN, 90), (Z_COLUMN, 52), (FLAG_COLUMN, 76), (NOTE_COLUMN, 120)):
            header.resizeSection(col, width)
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
