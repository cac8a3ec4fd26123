"""JSON sidecars of arrays and sinograms: read through the bounded JSON reader, checked field by field.

The limits are physical: no CT pixel is a metre wide, no detector has a million elements. A value
past them is refused with the file and the field named, before anything is sized by it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from klviewer.errors import KlviewerInputError, brief
from klviewer.io.json_input import Fields, read_json

MAX_SIDECAR_BYTES = 1 << 20  # a sidecar is a few hundred bytes; anything huge is not one of ours
MIN_SPACING_MM = 1e-3
"""A micrometre: finer pixels are no CT's, and the resampling's filter width (1 / scale) must stay finite."""
MAX_SPACING_MM = 1000.0
MAX_GRID_SIDE = 8192
MAX_COUNT = 1 << 20
"""Most angles, detector elements or slices a sidecar may declare."""
MAX_TEXT = 1024
"""Longest description or patient ID a sidecar may carry."""


def read_json_sidecar(path: Path) -> dict[str, Any]:
    return read_json(path, MAX_SIDECAR_BYTES, "sidecar")


def sidecar_fields(path: Path, doc: dict[str, Any]) -> Fields:
    return Fields(doc, path, what="sidecar field")


def spacing_pair(fields: Fields, key: str) -> tuple[float, float]:
    """A pixel spacing given as one number (square pixels) or [row, col], in mm."""
    value = fields.get(key)
    if isinstance(value, list):
        row, col = fields.numbers(key, length=2, positive=True, hi=MAX_SPACING_MM)
        return (row, col)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        s = fields.number(key, positive=True, hi=MAX_SPACING_MM)
        return (s, s)
    raise KlviewerInputError(fields.source, f"{fields.name(key)} must be a number or [row, col] in mm, found {brief(value)}")
