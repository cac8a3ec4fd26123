"""One exception family for everything klviewer refuses, so callers catch a single type."""

from __future__ import annotations

from pathlib import Path

MAX_SHOWN_CHARS = 80
"""How much of an offending value a message quotes: enough to recognise it, never a whole file."""
MAX_PROBLEM_CHARS = 1500
MAX_PATH_CHARS = 300
OVERWRITE_HINT = "pass overwrite=True (--overwrite on the command line) to replace it"
"""The one wording for refusals that an overwrite would lift, true for the library and the CLI alike."""


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, keeping its start and end, saying how much was cut."""
    if len(text) <= limit:
        return text
    keep = max(limit - 40, 10)
    return f"{text[:keep * 3 // 4]} ...[{len(text) - keep} characters cut]... {text[-(keep // 4):]}"


def brief(value: object) -> str:
    """repr(value) for a message, cut short: refusals quote what they refuse, not all of it."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile object's repr must not hide the refusal
        text = f"<{type(value).__name__}>"
    return shorten(text, MAX_SHOWN_CHARS)


class KlviewerError(Exception):
    """Base of every error klviewer raises on purpose."""


class KlviewerInputError(KlviewerError, ValueError):
    """Input that cannot be used. The message always names the file (when there is one) and the problem."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        # Messages are shown in terminals and dialogs: a hostile value or path must not fill them.
        self.problem = shorten(str(problem), MAX_PROBLEM_CHARS)
        shown = None if path is None else shorten(str(path), MAX_PATH_CHARS)
        super().__init__(self.problem if shown is None else f"{shown}: {self.problem}")


class SidecarMismatchError(KlviewerInputError):
    """A JSON sidecar contradicts the data it describes."""

    def __init__(self, path: str | Path, field: str, sidecar_value: object, data_value: object) -> None:
        self.field = field
        self.sidecar_value = sidecar_value
        self.data_value = data_value
        super().__init__(path, f"sidecar field '{field}' says {brief(sidecar_value)} but the data has {brief(data_value)}")


class NotAnalyzableError(KlviewerInputError):
    """Data that loads for viewing but cannot go into the KL analysis (e.g. an MR series)."""
