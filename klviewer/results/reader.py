"""Reading a `klviewer analyze` results folder back, refusing anything missing or malformed.

Only `summary.json` is read up front (plus a check that every slice file it lists exists);
the per-slice `.npz` files are loaded one case at a time, so an archive of thousands of
slices does not have to fit in memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from klviewer.errors import KlviewerInputError, brief
from klviewer.inference.prior_fit import PriorFit
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.input_files import check_path, inside, real
from klviewer.io.json_input import Fields, read_json

SUMMARY_FILE = "summary.json"
MAX_SUMMARY_BYTES = 512 << 20
MAX_ROWS = 1_000_000
SOURCE_KINDS = ("dicom", "array", "sinogram")
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
    folder = check_path(results_dir)
    if not folder.exists():
        raise KlviewerInputError(folder, "results folder does not exist")
    if not folder.is_dir():
        raise KlviewerInputError(folder, "is not a folder; expected the results folder of `klviewer analyze`")
    summary_path = folder / SUMMARY_FILE
    if not (summary_path.exists() or summary_path.is_symlink()):
        found = sum(1 for _ in folder.glob("*/*.npz"))
        hint = (f"the analysis did not finish (found {found} slice file(s) but no summary)" if found
                else "not a results folder of `klviewer analyze`")
        raise KlviewerInputError(summary_path, f"missing: {hint}")
    if not inside(summary_path, folder):
        raise KlviewerInputError(summary_path, "a symbolic link out of the results folder; not followed")
    summary = read_summary(summary_path)
    cases: dict[str, CaseEntry] = {}
    for number, row in enumerate(summary["rows"]):
        entry = _slice_entry(folder, summary_path, number, row)
        cases.setdefault(entry.case, CaseEntry(entry.case)).slices.append(entry)
    missing = [s.file for c in cases.values() for s in c.slices if not s.file.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise KlviewerInputError(missing[0], f"listed in {summary_path} but missing{more}: the results folder is incomplete")
    return ResultsFolder(folder, summary, list(cases.values()))


def checked_settings(doc: Any, source: Path, prefix: str = "settings.") -> AnalysisSettings:
    """Analysis settings read back from a results file: every field of the right type and range."""
    record = Fields(doc, source, prefix, what="field")
    known = {f.name for f in fields(AnalysisSettings)}
    unknown = sorted(set(record.doc) - known)
    if unknown:
        raise KlviewerInputError(source, f"'{prefix.rstrip('.')}' has unknown field(s) {brief(unknown)}")
    values: dict[str, Any] = {}
    for key, lo, hi in (("views", 1, 100_000), ("steps", 1, 1_000_000), ("samples", 1, 100_000), ("patch", 1, 8192),
                        ("seed", -2**63, 2**63), ("branch_steps", 0, 1_000_000), ("trunks", 1, 100_000),
                        ("cg_iters", 1, 10_000)):
        if key in record:
            values[key] = record.integer(key, lo=lo, hi=hi)
    for key in ("dose_i0", "noise_sigma", "flag_threshold"):
        if key in record:
            values[key] = record.number(key, positive=key != "noise_sigma", lo=0, optional=True)
    if "dps_step" in record:
        values["dps_step"] = record.number("dps_step")
    for key in ("sigma_min", "sigma_max", "branch_sigma", "high_sigma"):
        if key in record:
            values[key] = record.number(key, positive=True, optional=key in ("branch_sigma", "high_sigma"))
    if "antithetic" in record:
        values["antithetic"] = record.boolean("antithetic")
    for key in ("device", "guidance", "high_guidance", "precision"):
        if key in record:
            values[key] = record.text(key, max_chars=64, optional=key == "high_guidance")
    if record.get("sigma_window", None) is not None:
        lo, hi = record.numbers("sigma_window", length=2, positive=True)
        if not lo <= hi:
            raise record.refuse("sigma_window", f"must be [low, high] with low <= high, found {brief([lo, hi])}")
        values["sigma_window"] = (lo, hi)
    elif "sigma_window" in record:
        values["sigma_window"] = None
    return AnalysisSettings(**values)


def read_summary(path: Path) -> dict[str, Any]:
    """A results folder's summary.json, checked field by field (its rows' slice files are not opened)."""
    summary = read_json(path, MAX_SUMMARY_BYTES, "results summary")
    for key in _REQUIRED_TOP:
        if key not in summary:
            raise KlviewerInputError(path, f"has no '{key}' field; not a summary written by `klviewer analyze`")
    doc = Fields(summary, path, what="field")
    rows = doc.items("rows", max_items=MAX_ROWS)
    checked_settings(summary["settings"], path)
    prior = doc.section("prior")
    for key in ("name", "sha256", "path"):
        prior.text(key, "", max_chars=4096)
    for key in ("flag_threshold", "z_threshold"):
        doc.number(key, None, optional=True)
    for key in ("flag_rule", "klviewer_version", "created"):
        doc.text(key, "", max_chars=256, optional=True)
    doc.number("prior_fit_threshold", None, optional=True)
    if summary.get("escalation") is not None:  # a two-stage run (inference.escalation.EscalationRule.to_dict)
        escalation = doc.section("escalation")
        escalation.integer("stage1_samples", lo=1, hi=escalation.integer("samples", lo=2, hi=100_000) - 1)
        for key in ("rate", "z_threshold", "stage2_z_threshold"):
            escalation.number(key)
        escalation.text("rule", max_chars=1000)
    if "cases" in summary:  # each case's prior-fit verdict (results.summary.case_prior_fits)
        cases = doc.section("cases")
        for name in cases.doc:
            PriorFit.from_dict(cases.section(name).doc, path)
    if not rows:
        raise KlviewerInputError(path, "lists no analysed slices")
    return summary


def _slice_entry(folder: Path, summary_path: Path, number: int, row: Any) -> SliceEntry:
    where = f"row {number}"
    if not isinstance(row, dict):
        raise KlviewerInputError(summary_path, f"{where} is not an object")
    absent = [k for k in _REQUIRED_ROW if k not in row]
    if absent:
        raise KlviewerInputError(summary_path, f"{where} lacks {', '.join(absent)}")
    fields_ = Fields(row, summary_path, f"rows[{number}].", what="field")
    case = fields_.text("case", max_chars=200)
    if not _SAFE_CASE.fullmatch(case) or case in (".", ".."):
        raise KlviewerInputError(summary_path, f"{where}: case name {brief(case)} is not a plain folder name")
    index = fields_.integer("slice_index", lo=0, hi=MAX_ROWS * 100)
    score, total = fields_.number("score"), fields_.number("total_kl")
    flagged = fields_.boolean("flagged")
    fields_.number("z_score", None, optional=True)
    fields_.number("z_threshold", None, optional=True)
    if row.get("escalated") is not None:
        fields_.boolean("escalated")
    fields_.integer("patch", None, lo=1, hi=8192, optional=True)
    source_kind = fields_.get("source_kind", None)
    if source_kind is not None and source_kind not in SOURCE_KINDS:
        raise fields_.refuse("source_kind", f"must be one of {SOURCE_KINDS} or null, found {brief(source_kind)}")
    texts = {k: fields_.text(k, None, optional=True) for k in ("series_uid", "source_file", "sop_instance_uid")}
    name = fields_.text("file", max_chars=4096)
    file = Path(real(folder / name))
    if not inside(file, folder):
        raise KlviewerInputError(summary_path, f"{where}: file {brief(name)} points outside the results folder")
    return SliceEntry(
        case=case, slice_index=index, score=score, total_kl=total, flagged=flagged, file=file,
        source_kind=source_kind, series_uid=texts["series_uid"], source_file=texts["source_file"],
        sop_instance_uid=texts["sop_instance_uid"], row=row,
    )
