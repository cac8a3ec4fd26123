"""Reading JSON sidecars safely: size-capped, strict JSON, errors that name the file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from klviewer.errors import KlviewerInputError

MAX_SIDECAR_BYTES = 1 << 20  # a sidecar is a few hundred bytes; anything huge is not one of ours


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in a sidecar")


def read_json_sidecar(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise KlviewerInputError(path, f"cannot read sidecar ({exc.strerror or exc})") from exc
    if size > MAX_SIDECAR_BYTES:
        raise KlviewerInputError(path, f"sidecar is {size} bytes, more than the {MAX_SIDECAR_BYTES} allowed")
    try:
        text = path.read_text(encoding="utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise KlviewerInputError(path, f"sidecar is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise KlviewerInputError(path, f"sidecar must be a JSON object, found {type(value).__name__}")
    return value


def number(path: Path, doc: dict[str, Any], key: str, *, positive: bool = True) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KlviewerInputError(path, f"sidecar field '{key}' must be a finite number, found {value!r}")
    if positive and value <= 0:
        raise KlviewerInputError(path, f"sidecar field '{key}' must be positive, found {value!r}")
    return float(value)


def spacing_pair(path: Path, doc: dict[str, Any], key: str) -> tuple[float, float]:
    """A pixel spacing given as one number (square pixels) or [row, col], in mm."""
    value = doc.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        s = number(path, doc, key)
        return (s, s)
    if isinstance(value, list) and len(value) == 2:
        pair = tuple(number(path, {key: v}, key) for v in value)
        return (pair[0], pair[1])
    raise KlviewerInputError(path, f"sidecar field '{key}' must be a number or [row, col] in mm, found {value!r}")
