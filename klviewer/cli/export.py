"""``klviewer export``: the command-line shell over :func:`klviewer.export.export_results`."""

from __future__ import annotations

import argparse
import sys

from klviewer.cli.progress import progress_bar
from klviewer.export.exporter import EXPORT_FORMATS


def _formats(text: str) -> list[str]:
    chosen = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in EXPORT_FORMATS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {','.join(EXPORT_FORMATS)}, got {text!r}")
    return chosen


def _note(text: str) -> tuple[str, str]:
    case, sep, note = text.partition("=")
    if not sep or not case.strip():
        raise argparse.ArgumentTypeError(f"expected CASE=TEXT, got {text!r}")
    return case.strip(), note


def _threshold(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of nats, got {text}")
    return value


def _cmd_export(args: argparse.Namespace) -> int:
    from klviewer.export.exporter import export_results

    with progress_bar("export", "case", quiet=args.quiet) as progress:
        report = export_results(
            args.results, args.out, flagged_only=not args.all, formats=args.formats, flag_threshold=args.flag_threshold,
            deidentify=args.deidentify, overwrite=args.overwrite, progress=progress, notes=dict(args.note),
        )
    if not report.cases:
        print(f"no flagged cases in {args.results}: nothing exported "
              "(flags come from the analysis' threshold; use --flag-threshold NATS or --all)")
        return 0
    for case in report.cases:
        if case.error is None:
            print(f"{case.case}: {len(case.files)} file(s) in {case.folder}")
        else:
            print(f"{case.case}: FAILED, nothing written: {case.error}", file=sys.stderr)
        for reason in case.skipped:
            print(f"  left out: {reason}")
        for note in case.notes:
            print(f"  note: {note}")
    for path in report.table_files:
        print(f"table: {path}")
    exported = len(report.cases) - len(report.failed)
    print(f"exported {exported} of {len(report.cases)} case(s) to {report.out}")
    return 1 if report.failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand to the klviewer parser."""
    p = subparsers.add_parser(
        "export", help="export flagged cases of a results folder: DICOM (Parametric Map, SEG, Secondary Capture), PNG, PDF, CSV",
        description="Export the cases of a `klviewer analyze` results folder, one folder per case (see docs/export.md). "
                    "A case counts as flagged when any of its slices is.",
    )
    p.add_argument("results", metavar="RESULTS_DIR", help="results folder written by `klviewer analyze`")
    p.add_argument("--out", required=True, help="export folder (created; must lie outside the results and source folders)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--flagged-only", action="store_true", default=True,
                       help="export only flagged cases (the default)")
    which.add_argument("--all", action="store_true", help="export every case")
    p.add_argument("--formats", type=_formats, default=list(EXPORT_FORMATS), metavar="LIST",
                   help=f"comma-separated subset of {','.join(EXPORT_FORMATS)} (default: all); "
                        "csv writes cases.csv and cases.json")
    p.add_argument("--flag-threshold", type=_threshold, metavar="NATS",
                   help="flag slices whose score exceeds this (default: the flags the analysis recorded)")
    p.add_argument("--deidentify", action="store_true",
                   help="pseudonymise patient name/ID, shift dates per patient and replace UIDs in exported DICOM, "
                        "and leave identifiers out of the PDF and tables")
    p.add_argument("--note", action="append", type=_note, default=[], metavar="CASE=TEXT",
                   help="a note for a case's PDF report and the tables (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace case folders and tables already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export)
