"""`klviewer info`: the patients, studies and series found under the paths, and every skipped file."""

from __future__ import annotations

import argparse
import json

from klviewer.cli.options import INPUT_HELP
from klviewer.io.loader import open_paths
from klviewer.io.summary import catalog_summary, format_summary


def _cmd_info(args: argparse.Namespace) -> int:
    summary = catalog_summary(open_paths(args.paths))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0 if summary["patients"] else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="list the patients, studies and series found under PATH(s), and every skipped file")
    p.add_argument("paths", nargs="+", metavar="PATH", help=INPUT_HELP.replace("DICOM file/folder", "DICOM file/folder/DICOMDIR"))
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_info)
