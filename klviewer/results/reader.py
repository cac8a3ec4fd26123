"""Reading a `klviewer analyze` results folder back, refusing anything missing or malformed.

Only `summary.json` is read up front (plus a check that every slice file it lists exists);
the per-slice `.npz` files are loaded one case at a time, so an archive of thousands of
slices does not have to fit in memory.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klviewer.errors import KlviewerInputError

SUMMARY_FILE = "summary.json"
_REQUIRED_TOP = ("prior", "settings", "rows")
_REQUIRED_ROW = ("case", "slice_index", "score", "total_kl", "flagged", "file")
_SAFE_CASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class SliceEntry:
    """One row of summary.json: an analysed slice and where it came from."""

    case: str
    slice_index: int
    score: float
    total_kl: float
    flagged: bool
    file: Path
    """Absolute path of the slice's .npz."""
    source_kind: str | None
    series_uid: str | None
    source_file: str | None
    sop_instance_uid: str | None
    row: dict[str, Any]


@dataclass
class CaseEntry:
    """All analysed slices of one case (one series), in summary order."""

    name: str
    slices: list[SliceEntry] = field(default_factory=list)

    @property
    def top(self) -> SliceEntry:
        """The slice with the largest score: the one that decides the case."""
        return max(self.slices, key=lambda s: s.score)

    @property
    def score(self) -> float:
        return self.top.score

    @property
    def source_kind(self) -> str | None:
        kinds = {s.source_kind for s in self.slices}
        return kinds.pop() if len(kinds) == 1 else None

    def flagged_slices(self, threshold: float | None) -> list[SliceEntry]:
        """Slices over `threshold`, or those the analysis flagged when no threshold is given."""
        if threshold is None:
            return [s for s in self.slices if s.flagged]
        return [s for s in self.slices if s.score > threshold]


@dataclass
class ResultsFolder:
    path: Path
    summary: dict[str, Any]
    cases: list[CaseEntry]

    @property
    def prior(self) -> dict[str, Any]:
        return self.summary["prior"]

    @property
    def settings(self) -> dict[str, Any]:
        return self.summary["settings"]

    @property
    def analysis_threshold(self) -> tuple[float | None, str]:
        """The threshold the analysis flagged with, and where it came from."""
        explicit = self.settings.get("flag_threshold")
        if explicit is not None:
            return float(explicit), "analysis --flag-threshold"
        calibrated = self.summary.get("flag_threshold")
        if calibrated is not None:
            return float(calibrated), "prior calibration"
        return None, "none (no calibrated threshold for these settings)"

    @property
    def z_threshold(self) -> float | None:
        """The KL z-score threshold the analysis flagged with; None when it flagged by nats."""
        if self.summary.get("flag_rule") != "z" or self.summary.get("z_threshold") is None:
            return None
        try:
            return float(self.summary["z_threshold"])
        except (TypeError, ValueError) as exc:
            raise KlviewerInputError(self.path / SUMMARY_FILE, f"z_threshold is not a number ({exc})") from exc

    def case(self, name: str) -> CaseEntry:
        for case in self.cases:
            if case.name == name:
                return case
        raise KlviewerInputError(self.path / SUMMARY_FILE, f"has no case named {name!r}")


def read_results(results_dir: str | Path) -> ResultsFolder:
    """Read and check a results folder; every refusal names the file at fault."""
    folder = Path(results_dir)
    if not folder.exists():
        raise KlviewerInputError(folder, "results folder does not exist")
    if not folder.is_dir():
        raise KlviewerInputError(folder, "is not a folder; expected the results folder of `klviewer analyze`")
    summary_path = folder / SUMMARY_FILE
    if not summary_path.is_file():
        found = sum(1 for _ in folder.glob("*/*.npz"))
        hint = (f"the analysis did not finish (found {found} slice file(s) but no summary)" if found
                else "not a results folder of `klviewer analyze`")
        raise KlviewerInputError(summary_path, f"missing: {hint}")
    summary = _load_summary(summary_path)
    cases: dict[str, CaseEntry] = {}
    for number, row in enumerate(summary["rows"]):
        entry = _slice_entry(folder, summary_path, number, row)
        cases.setdefault(entry.case, CaseEntry(entry.case)).slices.append(entry)
    missing = [s.file for c in cases.values() for s in c.slices if not s.file.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise KlviewerInputError(missing[0], f"listed in {summary_path} but missing{more}: the results folder is incomplete")
    return ResultsFolder(folder, summary, list(cases.values()))


def _load_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise KlviewerInputError(path, f"is not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise KlviewerInputError(path, f"is not valid JSON (line {exc.lineno}: {exc.msg}); the file may be truncated") from exc
    if not isinstance(summary, dict):
        raise KlviewerInputError(path, "must hold a JSON object")
    for key in _REQUIRED_TOP:
        if key not in summary:
            raise KlviewerInputError(path, f"has no '{key}' field; not a summary written by `klviewer analyze`")
    if not isinstance(summary["rows"], list):
        raise KlviewerInputError(path, "'rows' must be a list")
    if not isinstance(summary["settings"], dict) or not isinstance(summary["prior"], dict):
        raise KlviewerInputError(path, "'settings' and 'prior' must be objects")
    if not summary["rows"]:
        raise KlviewerInputError(path, "lists no analysed slices")
    return summary


def _slice_entry(folder: Path, summary_path: Path, number: int, row: Any) -> SliceEntry:
    where = f"row {number}"
    if not isinstance(row, dict):
        raise KlviewerInputError(summary_path, f"{where} is not an object")
    absent = [k for k in _REQUIRED_ROW if k not in row]
    if absent:
        raise KlviewerInputError(summary_path, f"{where} lacks {', '.join(absent)}")
    case = row["case"]
    if not isinstance(case, str) or not _SAFE_CASE.fullmatch(case) or case in (".", ".."):
        raise KlviewerInputError(summary_path, f"{where}: case name {case!r} is not a plain folder name")
    try:
        index, score, total = int(row["slice_index"]), float(row["score"]), float(row["total_kl"])
    except (TypeError, ValueError) as exc:
        raise KlviewerInputError(summary_path, f"{where}: slice_index, score and total_kl must be numbers ({exc})") from exc
    if not (math.isfinite(score) and math.isfinite(total)):
        raise KlviewerInputError(summary_path, f"{where}: score and total_kl must be finite")
    file = (folder / str(row["file"])).resolve()
    if not file.is_relative_to(folder.resolve()):
        raise KlviewerInputError(summary_path, f"{where}: file {row['file']!r} points outside the results folder")
    return SliceEntry(
        case=case, slice_index=index, score=score, total_kl=total, flagged=bool(row["flagged"]), file=file,
        source_kind=row.get("source_kind"), series_uid=row.get("series_uid"), source_file=row.get("source_file"),
        sop_instance_uid=row.get("sop_instance_uid"), row=row,
    )
