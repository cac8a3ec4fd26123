"""The File → Export flagged… job: export a results folder, or this session's results, with `export_results`.

No Qt here. The session's results live in memory, so they are first written as results
folders (klviewer.app.session_results) into a private staging folder, exported from there,
and the staging folder is removed afterwards. Cancelling stops after the case being written:
finished case folders are complete and kept, and the tables list exactly those.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klviewer.app.display import MapSettings
from klviewer.app.session_results import SessionSlice, write_session_results
from klviewer.demo import cache_dir
from klviewer.errors import KlviewerError

Report = Callable[[int, int, str], None]


@dataclass
class SessionSnapshot:
    """The session's analysed slices as the case list shows them, taken when the export starts."""

    slices: list[SessionSlice]
    map_settings: MapSettings

    @property
    def n_flagged(self) -> int:
        return sum(1 for s in self.slices if s.flagged)


@dataclass(frozen=True)
class ExportRequest:
    out: Path
    results_dir: Path | None = None
    """A results folder to export; None exports the session snapshot."""
    session: SessionSnapshot | None = None
    flagged_only: bool = True
    formats: tuple[str, ...] = ("dicom", "png", "pdf", "csv")
    flag_threshold: float | None = None
    deidentify: bool = False
    overwrite: bool = False


@dataclass
class ExportOutcome:
    label: str
    report: Any
    """A klviewer.export.ExportReport."""


@dataclass
class ExportSummary:
    out: Path
    outcomes: list[ExportOutcome] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    """Session results of one prior that export refused (e.g. existing folders), with the reason."""

    @property
    def cases(self) -> list[Any]:
        return [case for outcome in self.outcomes for case in outcome.report.cases]

    @property
    def failed(self) -> list[Any]:
        return [case for outcome in self.outcomes for case in outcome.report.failed]

    @property
    def table_files(self) -> list[Path]:
        return [path for outcome in self.outcomes for path in outcome.report.table_files]


def staging_parent(out: Path) -> Path:
    """Where the session's results may be staged: never inside the export folder (export refuses that)."""
    target = out.expanduser().resolve()
    for candidate in (Path(tempfile.gettempdir()), cache_dir()):
        resolved = candidate.resolve()
        if target != resolved and target not in resolved.parents:
            return candidate
    raise KlviewerError(f"{out}: choose an export folder that does not contain the temporary folder {tempfile.gettempdir()}")


def run_export(request: ExportRequest, report: Report, cancel: threading.Event) -> ExportSummary:
    from klviewer.export import export_results

    def export(results_dir: Path, out: Path, notes: dict[str, str] | None,
               measurements: dict[str, list[str]] | None = None) -> Any:
        return export_results(results_dir, out, flagged_only=request.flagged_only, formats=request.formats,
                              flag_threshold=request.flag_threshold, deidentify=request.deidentify,
                              overwrite=request.overwrite, progress=lambda done, total: report(done, total, f"Exporting {out.name}"),
                              notes=notes, measurements=measurements, cancel=cancel)

    summary = ExportSummary(request.out)
    if request.results_dir is not None:
        summary.outcomes.append(ExportOutcome(request.results_dir.name, export(request.results_dir, request.out, None)))
        return summary
    if request.session is None:
        raise KlviewerError("nothing to export: no results folder and no session results")
    report(0, 1, "Writing the session's results")
    staging = Path(tempfile.mkdtemp(prefix="klviewer-session-", dir=_ensure(staging_parent(request.out))))
    try:
        folders = write_session_results(request.session.slices, staging / "results", request.session.map_settings)
        for folder in folders:
            if cancel.is_set():
                break
            out = request.out if len(folders) == 1 else request.out / folder.path.name
            try:
                summary.outcomes.append(ExportOutcome(folder.prior, export(folder.path, out, folder.notes, folder.measurements)))
            except KlviewerError as exc:
                if len(folders) == 1:
                    raise
                summary.refused.append(f"{folder.prior}: {exc}")  # the other priors' results still go out
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder

