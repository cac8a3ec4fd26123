"""The case list as plain data: every analysed slice, its score, flag and note.

No Qt here, so export and batch code can build, read and write the same list. Views listen
through `subscribe`; every change is announced before and after it happens, which is what
Qt's item models need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal


ChangeKind = Literal["inserting", "inserted", "changed", "resetting", "reset"]


@dataclass
class CaseEntry:
    series_uid: str
    slice_index: int
    patient: str
    series: str
    score: float
    auto_flagged: bool
    manual_flag: bool | None = None
    """None until someone sets the flag by hand; then it wins over the automatic one."""
    note: str = ""
    prior: str = ""
    z_score: float | None = None
    """KL z-score against the prior's healthy reference; None where it has none for the map settings."""
    verdict: str = ""
    """The automatic verdict (klviewer.inference.scoring.Verdict.status): flagged, not flagged, prior mismatch, cannot flag."""
    rule: str = ""
    """The rule that made the verdict, worded as every view words it (klviewer.inference.verdict_text)."""

    @property
    def key(self) -> tuple[str, int]:
        return self.series_uid, self.slice_index

    @property
    def flagged(self) -> bool:
        return self.auto_flagged if self.manual_flag is None else self.manual_flag

    @property
    def status(self) -> str:
        """What the row says: the automatic verdict's status, or the flag set by hand."""
        if self.manual_flag is not None:
            return "flagged (by hand)" if self.manual_flag else "not flagged (by hand)"
        return self.verdict or ("flagged" if self.auto_flagged else "not flagged")

    @property
    def flag_source(self) -> str:
        return "auto" if self.manual_flag is None else "manual"


@dataclass
class CaseChange:
    kind: ChangeKind
    row: int = -1


@dataclass
class CaseList:
    entries: list[CaseEntry] = field(default_factory=list)
    _listeners: list[Callable[[CaseChange], None]] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, row: int) -> CaseEntry:
        return self.entries[row]

    def subscribe(self, listener: Callable[[CaseChange], None]) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[CaseChange], None]) -> None:
        self._listeners.remove(listener)

    def _emit(self, kind: ChangeKind, row: int = -1) -> None:
        for listener in list(self._listeners):
            listener(CaseChange(kind, row))

    def find(self, series_uid: str, slice_index: int) -> int | None:
        return next((i for i, e in enumerate(self.entries) if e.key == (series_uid, slice_index)), None)

    def upsert(self, entry: CaseEntry) -> int:
        """Add a slice, or refresh its score; a hand-set flag and the note survive a re-run."""
        row = self.find(*entry.key)
        if row is None:
            row = len(self.entries)
            self._emit("inserting", row)
            self.entries.append(entry)
            self._emit("inserted", row)
            return row
        old = self.entries[row]
        entry.manual_flag, entry.note = old.manual_flag, old.note
        self.entries[row] = entry
        self._emit("changed", row)
        return row

    def set_manual_flag(self, row: int, flagged: bool | None) -> None:
        """Set the flag by hand (None hands it back to the automatic rule)."""
        self.entries[row].manual_flag = flagged
        self._emit("changed", row)

    def set_note(self, row: int, note: str) -> None:
        self.entries[row].note = note
        self._emit("changed", row)

    def set_score(self, row: int, score: float, auto_flagged: bool, z_score: float | None = None,
                  verdict: str = "", rule: str = "") -> None:
        entry = self.entries[row]
        new = (score, auto_flagged, z_score, verdict, rule)
        if (entry.score, entry.auto_flagged, entry.z_score, entry.verdict, entry.rule) != new:
            entry.score, entry.auto_flagged, entry.z_score, entry.verdict, entry.rule = new
            self._emit("changed", row)

    def clear(self) -> None:
        self._emit("resetting")
        self.entries.clear()
        self._emit("reset")

    def flagged(self) -> list[CaseEntry]:
        return [e for e in self.entries if e.flagged]
