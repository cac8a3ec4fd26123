"""`klviewer batch --export`: export each finished study's cases into export/<study id>/.

De-identification is not offered here: each `export_results` call draws its own pseudonyms, so
two patients in two studies would both become ANON-0001.

Each study's export is recorded in the manifest, so a re-run exports only studies that have not
been exported yet, or whose export failed (a case that failed is written again, over this batch's
own earlier attempt).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from klviewer.batch.manifest import DONE, Manifest
from klviewer.errors import KlviewerError, KlviewerInputError

EXPORT_DIR = "export"
EXPORTED, NOTHING_FLAGGED, EXPORT_FAILED = "done", "nothing flagged", "failed"


@dataclass(frozen=True)
class ExportOptions:
    formats: tuple[str, ...] | None = None
    """None: every format the exporter supports."""
    flagged_only: bool = True


def check_export(options: ExportOptions) -> None:
    """Refuse an export that cannot happen before the batch spends hours analysing."""
    try:
        from klviewer.export import EXPORT_FORMATS
    except ImportError as exc:
        raise KlviewerError(f"export is not available in this installation ({exc})") from exc
    unknown = sorted(set(options.formats or ()) - set(EXPORT_FORMATS))
    if unknown:
        raise KlviewerInputError(None, f"unknown export format(s) {unknown}; choose from {', '.join(EXPORT_FORMATS)}")


def export_studies(out: Path, manifest: Manifest, options: ExportOptions, flag_threshold: float | None) -> None:
    """Export every finished, not yet exported study; failures are recorded, not raised."""
    from klviewer.export import EXPORT_FORMATS, export_results

    for record in manifest.records():
        previous = (record.export or {}).get("status")
        if record.status != DONE or previous in (EXPORTED, NOTHING_FLAGGED):
            continue
        if options.flagged_only and record.flagged == 0:
            record.export = {"status": NOTHING_FLAGGED}
            continue
        folder = f"{EXPORT_DIR}/{record.id}"
        try:
            report = export_results(
                out / record.results, out / folder, flagged_only=options.flagged_only,
                formats=options.formats or EXPORT_FORMATS, flag_threshold=flag_threshold,
                # Only this batch's own earlier, failed attempt at this study is ever replaced.
                overwrite=previous == EXPORT_FAILED,
            )
        except KlviewerError as exc:
            record.export = {"status": EXPORT_FAILED, "reason": str(exc)}
        else:
            failed = [f"{c.case}: {c.error}" for c in report.failed]
            record.export = {"status": EXPORT_FAILED if failed else EXPORTED, "folder": folder,
                             "cases": len(report.cases) - len(failed), "failed": failed}
            if failed:
                record.export["reason"] = f"{len(failed)} case(s) failed: " + "; ".join(failed)
        manifest.save()  # a killed run keeps the record of every export it finished
    manifest.save()
