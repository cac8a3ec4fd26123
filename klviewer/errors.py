"""One exception family for everything klviewer refuses, so callers catch a single type."""

from __future__ import annotations

from pathlib import Path


class KlviewerError(Exception):
    """Base of every error klviewer raises on purpose."""


class KlviewerInputError(KlviewerError, ValueError):
    """Input that cannot be used. The message always names the file (when there is one) and the problem."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class SidecarMismatchError(KlviewerInputError):
    """A JSON sidecar contradicts the data it describes."""

    def __init__(self, path: str | Path, field: str, sidecar_value: object, data_value: object) -> None:
        self.field = field
        self.sidecar_value = sidecar_value
        self.data_value = data_value
        super().__init__(path, f"sidecar field '{field}' says {sidecar_value!r} but the data has {data_value!r}")


class NotAnalyzableError(KlviewerInputError):
    """Data that loads for viewing but cannot go into the KL analysis (e.g. an MR series)."""
