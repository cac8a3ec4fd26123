"""The one reader of JSON that comes from outside: sidecars, prior configs, calibration files,
results summaries, batch manifests, resume states, and JSON embedded in npz files.

Every document is bounded before it is parsed and checked after:
- size: each caller gives the largest file it can mean (a sidecar is a few hundred bytes);
- depth: at most MAX_DEPTH nested arrays and objects (deeper JSON makes the parser recurse until
  it fails);
- values: no NaN or Infinity, no number that is not finite as a float (1e999), no integer past
  2**63, no NUL character in a string or key, no duplicate keys.
Then the typed getters below check each field and name the file and the field in every refusal,
quoting the offending value cut short.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from klviewer.errors import KlviewerInputError, brief
from klviewer.io.input_files import read_input_bytes

MAX_DEPTH = 32
MAX_INTEGER = 2**63
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\Z)', re.DOTALL)
"""A JSON string, or an unterminated one up to the end: every quote starts a match, so the scan is linear."""


class _Refused(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _Refused(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        twice = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise _Refused(f"key {brief(twice)} appears twice in one object")
    return doc


def _depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects, counted outside strings (no recursion, linear time)."""
    code = np.frombuffer(_STRINGS.sub(b'""', raw), dtype=np.uint8)
    step = (np.isin(code, (ord("["), ord("{"))).astype(np.int64) - np.isin(code, (ord("]"), ord("}"))))
    return int(np.cumsum(step).max(initial=0))


def _check_values(doc: Any) -> None:
    """Finite numbers, bounded integers, no NUL characters: walked with a stack, never recursively."""
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    raise _Refused(f"key {brief(key)} holds a NUL character")
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            if "\x00" in value:
                raise _Refused(f"string {brief(value)} holds a NUL character")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if abs(value) > MAX_INTEGER:
                raise _Refused(f"integer {brief(value)} is too large")
        elif isinstance(value, float) and not math.isfinite(value):
            raise _Refused("a number is too large to be finite")


def parse_json(raw: bytes | str, source: str | Path | None, what: str = "document",
               expect: type | tuple[type, ...] = dict) -> Any:
    """Parse bounded JSON text; refusals name `source` and say what was wrong."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    try:
        depth = _depth(data)
        if depth > MAX_DEPTH:
            raise _Refused(f"nested {depth} levels deep, more than the {MAX_DEPTH} allowed")
        text = data.decode("utf-8")
        doc = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        _check_values(doc)
    except UnicodeDecodeError as exc:
        raise KlviewerInputError(source, f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise KlviewerInputError(source, f"{what} is not valid JSON (line {exc.lineno}: {exc.msg}); "
                                         "the file may be truncated") from exc
    except (ValueError, RecursionError) as exc:
        raise KlviewerInputError(source, f"{what} is not acceptable JSON ({exc})") from exc
    if not isinstance(doc, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise KlviewerInputError(source, f"{what} must hold a JSON {_json_name(names)}, found {_json_type(doc)}")
    return doc


def read_json(path: str | Path, max_bytes: int, what: str = "JSON file",
              expect: type | tuple[type, ...] = dict) -> Any:
    """Read and parse a JSON file of at most `max_bytes` (only regular files are opened)."""
    return parse_json(read_input_bytes(path, max_bytes, what), path, what, expect)


def _json_name(python_names: str) -> str:
    return python_names.replace("dict", "object").replace("list", "array").replace("str", "string")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# --- typed fields -------------------------------------------------------------------------------

_MISSING: Any = object()


class Fields:
    """One JSON object read from `source`, with getters that check a field's type and range.

    `prefix` names where the object sits in the file ("data." for the sidecar's data section), so a
    refusal names the whole field: `scan.json: field 'data.shape' must ...`.
    """

    def __init__(self, doc: Any, source: str | Path | None, prefix: str = "", what: str = "field") -> None:
        if not isinstance(doc, dict):
            where = f"'{prefix.rstrip('.')}'" if prefix else "the document"
            raise KlviewerInputError(source, f"{where} must be a JSON object, found {_json_type(doc)}")
        self.doc = doc
        self.source = source
        self.prefix = prefix
        self.what = what

    def name(self, key: str) -> str:
        return f"{self.what} '{self.prefix}{key}'"

    def refuse(self, key: str, problem: str) -> KlviewerInputError:
        return KlviewerInputError(self.source, f"{self.name(key)} {problem}")

    def __contains__(self, key: str) -> bool:
        return key in self.doc

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.doc:
            return self.doc[key]
        if default is _MISSING:
            raise self.refuse(key, "is missing")
        return default

    def number(self, key: str, default: Any = _MISSING, *, lo: float = -math.inf, hi: float = math.inf,
               positive: bool = False, optional: bool = False) -> Any:
        """A finite number in [lo, hi] (> 0 with `positive`); None passes with `optional`."""
        value = self.get(key, default)
        if value is None and optional:
            return None
        return checked_number(value, self.source, self.name(key), lo=lo, hi=hi, positive=positive)

    def integer(self, key: str, default: Any = _MISSING, *, lo: int = -MAX_INTEGER, hi: int = MAX_INTEGER,
                optional: bool = False) -> Any:
        value = self.get(key, default)
        if value is None and optional:
            return None
        return checked_integer(value, self.source, self.name(key), lo=lo, hi=hi)

    def text(self, key: str, default: Any = _MISSING, *, max_chars: int = 4096, optional: bool = False) -> Any:
        value = self.get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.refuse(key, f"must be a string, found {_json_type(value)} {brief(value)}")
        if len(value) > max_chars:
            raise self.refuse(key, f"is {len(value)} characters long, more than the {max_chars} allowed")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.refuse(key, f"must be true or false, found {brief(value)}")
        return value

    def section(self, key: str, default: Any = _MISSING) -> Fields:
        return Fields(self.get(key, default), self.source, f"{self.prefix}{key}.", self.what)

    def items(self, key: str, default: Any = _MISSING, *, max_items: int = 1_000_000) -> list[Any]:
        value = self.get(key, default)
        if not isinstance(value, list):
            raise self.refuse(key, f"must be a JSON array, found {_json_type(value)} {brief(value)}")
        if len(value) > max_items:
            raise self.refuse(key, f"lists {len(value)} items, more than the {max_items} allowed")
        return value

    def numbers(self, key: str, default: Any = _MISSING, *, length: int | Sequence[int] | None = None,
                lo: float = -math.inf, hi: float = math.inf, integer: bool = False, positive: bool = False,
                max_items: int = 1_000_000) -> list[Any]:
        """An array of finite numbers (integers with `integer`, > 0 with `positive`), of `length` items when given."""
        values = self.items(key, default, max_items=max_items)
        lengths = (length,) if isinstance(length, int) else length
        if lengths is not None and len(values) not in lengths:
            raise self.refuse(key, f"must list {' or '.join(map(str, lengths))} numbers, found {brief(values)}")
        if integer:
            low, high = int(max(lo, 1 if positive else -MAX_INTEGER)), int(min(hi, MAX_INTEGER))
            return [checked_integer(v, self.source, f"{self.name(key)}[{i}]", lo=low, hi=high)
                    for i, v in enumerate(values)]
        return [checked_number(v, self.source, f"{self.name(key)}[{i}]", lo=lo, hi=hi, positive=positive)
                for i, v in enumerate(values)]


def checked_number(value: Any, source: str | Path | None, name: str, *, lo: float = -math.inf,
                   hi: float = math.inf, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KlviewerInputError(source, f"{name} must be a number, found {_json_type(value)} {brief(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise KlviewerInputError(source, f"{name} must be finite, found {brief(value)}")
    if positive and not number > 0:
        raise KlviewerInputError(source, f"{name} must be positive, found {brief(value)}")
    if not lo <= number <= hi:
        low = "(0" if positive and lo <= 0 else f"[{lo:g}"
        raise KlviewerInputError(source, f"{name} must lie in {low}, {hi:g}], found {brief(value)}")
    return number


def checked_integer(value: Any, source: str | Path | None, name: str, *, lo: int = -MAX_INTEGER,
                    hi: int = MAX_INTEGER) -> int:
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_INTEGER:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise KlviewerInputError(source, f"{name} must be an integer, found {_json_type(value)} {brief(value)}")
    if not lo <= value <= hi:
        raise KlviewerInputError(source, f"{name} must lie in [{lo}, {hi}], found {brief(value)}")
    return value
