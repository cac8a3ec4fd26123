"""The combined batch summary (JSON + CSV over every study) and the report printed at the end."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klviewer import __version__
from klviewer.batch.export_step import EXPORT_DIR
from klviewer.batch.manifest import DONE, FAILED, MANIFEST_FILE, Manifest, StudyRecord, now_iso
from klviewer.inference.scoring import CANNOT_FLAG, FLAGGED, MISMATCH, NOT_FLAGGED
from klviewer.io.safe_write import atomic_write_text
from klviewer.results.reader import read_summary
from klviewer.results.summary import CSV_COLUMNS

SUMMARY_JSON = "batch_summary.json"
SUMMARY_CSV = "batch_summary.csv"
STUDY_COLUMNS = ["study", "patient_id", "study_uid"]
REPORT_LINES = 20


def study_rows(out: Path, record: StudyRecord) -> list[dict[str, Any]]:
    """A finished study's summary rows, with file paths relative to the batch folder."""
    rows = read_summary(out / record.results / "summary.json")["rows"]
    return [{"study": record.id, "patient_id": record.patient_id, "study_uid": record.study_uid, **row,
             "file": f"{record.results}/{row['file']}"} for row in rows]


def counts(records: Sequence[StudyRecord], rows: Sequence[dict[str, Any]], skipped: Sequence[dict[str, str]]) -> dict[str, int]:
    return {
        "studies": len(records),
        "done": sum(r.status == DONE for r in records),
        "failed": sum(r.status == FAILED for r in records),
        "pending": sum(r.status not in (DONE, FAILED) for r in records),
        "slices": len(rows),
        "flagged": sum(1 for r in rows if r["flagged"]),
        "skipped_files": len(skipped),
    }


def write_batch_summary(out: Path, manifest: Manifest, rows: list[dict[str, Any]], skipped: list[dict[str, str]]) -> None:
    records = manifest.records()
    doc = {
        "klviewer_version": __version__,
        "created": now_iso(),
        **manifest.config,
        "counts": counts(records, rows, skipped),
        "studies": [{k: v for k, v in dataclasses.asdict(r).items() if k != "traceback"} for r in records],
        "rows": rows,
        "skipped": skipped,
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=STUDY_COLUMNS + CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / SUMMARY_CSV, buffer.getvalue(), overwrite=True)
    atomic_write_text(out / SUMMARY_JSON, json.dumps(doc, indent=2), overwrite=True)


def _verdict_counts(rows: Sequence[dict[str, Any]]) -> str:
    """", 3 flagged, 40 not flagged, 2 cannot flag (no calibrated rule)": every verdict that occurs, so a
    batch without a calibrated rule does not read "0 flagged" (rows from before verdicts count by their flag)."""
    tally: dict[str, int] = {}
    for r in rows:
        verdict = r.get("verdict") or (FLAGGED if r["flagged"] else NOT_FLAGGED)
        tally[verdict] = tally.get(verdict, 0) + 1
    why = {CANNOT_FLAG: " (no calibrated rule for these settings)", MISMATCH: " (the prior does not fit the study)"}
    order = [FLAGGED, NOT_FLAGGED, MISMATCH, CANNOT_FLAG, *sorted(set(tally) - {FLAGGED, NOT_FLAGGED, MISMATCH, CANNOT_FLAG})]
    return "".join(f", {tally[v]} {v}{why.get(v, '')}" for v in order if v in tally)


@dataclass
class BatchResult:
    out: Path
    backend: str
    studies: list[StudyRecord]
    """Every study the batch folder knows, from this run and earlier ones."""
    rows: list[dict[str, Any]]
    """One row per analysed slice of every finished study (the batch_summary.csv rows)."""
    ran: list[str] = field(default_factory=list)
    """Studies analysed (finished or failed) in this run."""
    already_done: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cancelled: bool = False

    @property
    def failed(self) -> list[StudyRecord]:
        return [r for r in self.studies if r.status == FAILED]

    @property
    def flagged(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["flagged"]]

    def report(self) -> str:
        """What `klviewer batch` prints at the end: counts, flagged cases, failures."""
        c = counts(self.studies, self.rows, self.skipped)
        lines = [
            f"batch {self.out}: {c['studies']} studies, {c['done']} done, {c['failed']} failed, {c['pending']} pending "
            f"(this run: {len(self.ran)} analysed on {self.backend}, {len(self.already_done)} already done"
            + (", cancelled" if self.cancelled else "") + ")",
            f"slices: {c['slices']} analysed" + _verdict_counts(self.rows),
        ]
        if self.flagged:
            lines.append("flagged:")
            lines += _capped([f"  {r['file']}  score {r['score']:.4g} nats  ({r.get('source_file') or r['input']})"
                              for r in self.flagged])
        if self.failed:
            lines.append("failed:")
            lines += _capped([f"  {r.id}: {r.reason}" for r in self.failed])
        exports = [r.export for r in self.studies if r.export]
        if exports:
            cases = sum(e.get("cases", 0) for e in exports)
            bad = [f"  {r.id}: {r.export['reason']}" for r in self.studies if r.export and r.export.get("reason")]
            lines.append(f"exported {cases} case(s) under {self.out / EXPORT_DIR}" + (f"; {len(bad)} export(s) failed:" if bad else ""))
            lines += bad
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s) that belong to no study (reasons in {self.out / SUMMARY_JSON})")
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append(f"summary: {self.out / SUMMARY_CSV}")
        return "\n".join(lines)


def _capped(lines: list[str], most: int = REPORT_LINES) -> list[str]:
    """A terminal cannot show ten thousand flagged slices; the summary files list them all."""
    if len(lines) <= most:
        return lines
    return lines[:most] + [f"  ... and {len(lines) - most} more (see {SUMMARY_CSV} and {MANIFEST_FILE})"]
