"""The DICOM tag viewer: every element of the shown slice's file, sequences as branches, with a filter."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from PySide6.QtWidgets import QDialog, QLabel, QLineEdit, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget

MAX_VALUE_CHARS = 200


def tag_rows(ds: Dataset) -> list[tuple[str, str, str, str, list]]:
    """(tag, keyword, VR, value, children) for each element; a sequence's items are its children."""
    rows = []
    for element in ds:
        if element.tag == 0x7FE00010:  # pixel data: its size, not its bytes
            value = f"({len(element.value) if element.value is not None else 0} bytes)"
            children: list = []
        elif element.VR == "SQ":
            value = f"{len(element.value)} item(s)"
            children = [(f"item {n}", "", "", "", tag_rows(item)) for n, item in enumerate(element.value)]
        else:
            value = str(element.value)
            children = []
        if len(value) > MAX_VALUE_CHARS:
            value = value[:MAX_VALUE_CHARS] + "…"
        rows.append((f"({element.tag.group:04X},{element.tag.element:04X})", element.keyword or element.name,
                     str(element.VR), value, children))
    return rows


def read_tags(path: Path) -> Dataset:
    """The file's elements without its pixel data."""
    return pydicom.dcmread(path, stop_before_pixels=True)


class TagViewer(QDialog):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("DICOM tags")
        self.resize(720, 560)
        self.source = QLabel()
        self.source.setWordWrap(True)
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("Filter by tag, name or value")
        self.filter.textChanged.connect(self._filter)
        self.tree = QTreeWidget()
        self.tree.setHeaderLabels(["Tag", "Name", "VR", "Value"])
        self.tree.setColumnWidth(0, 100)
        self.tree.setColumnWidth(1, 200)
        self.tree.setColumnWidth(2, 36)
        layout = QVBoxLayout(self)
        layout.addWidget(self.source)
        layout.addWidget(self.filter)
        layout.addWidget(self.tree, 1)

    def show_file(self, path: Path | None, what: str) -> bool:
        """Show the tags of `path` (None: the slice is not from a DICOM file); False when it cannot be read."""
        self.tree.clear()
        if path is None:
            self.source.setText(f"{what}: not a DICOM slice (array or sinogram input), so it has no tags.")
            return False
        try:
            ds = read_tags(path)
        except (OSError, InvalidDicomError, ValueError) as exc:
            self.source.setText(f"{path}: cannot be read as DICOM ({exc}).")
            return False
        self.source.setText(f"{what}\n{path}")
        self._add(self.tree.invisibleRootItem(), tag_rows(ds))
        self._filter(self.filter.text())
        return True

    def _add(self, parent: QTreeWidgetItem, rows: list) -> None:
        for tag, name, vr, value, children in rows:
            item = QTreeWidgetItem([tag, name, vr, value])
            item.setToolTip(3, value)
            parent.addChild(item)
            self._add(item, children)

    def _filter(self, text: str) -> None:
        needle = text.strip().lower()
        for row in range(self.tree.topLevelItemCount()):
            item = self.tree.topLevelItem(row)
            hay = " ".join(item.text(c) for c in range(4)).lower()
            item.setHidden(bool(needle) and needle not in hay)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """The shown top-level rows (for tests)."""
        items = [self.tree.topLevelItem(r) for r in range(self.tree.topLevelItemCount())]
        return [tuple(i.text(c) for c in range(4)) for i in items if not i.isHidden()]


def slice_file(series, index: int) -> Path | None:
    """The DICOM file of a series' slice, or None for array and sinogram inputs."""
    if series.source_kind != "dicom" or not (0 <= index < len(series.slices)):
        return None
    source = series.slices[index].source
    return Path(source) if source is not None else None
