"""The `klviewer` command. Each subcommand is a thin shell over a service function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from klviewer import __version__
from klviewer.errors import KlviewerError

PHANTOM_KINDS = ("healthy", "lesion", "metal", "shift", "mixed")


def _cmd_info(args: argparse.Namespace) -> int:
    from klviewer.io.loader import open_paths
    from klviewer.io.summary import catalog_summary, format_summary

    summary = catalog_summary(open_paths(args.paths))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0 if summary["patients"] else 1


def _cmd_phantoms(args: argparse.Namespace) -> int:
    from klviewer.phantoms.export import write_phantom_set

    written = write_phantom_set(
        Path(args.out), kind=args.kind, n=args.n, size=args.size, seed=args.seed, dicom=args.dicom
    )
    print(f"wrote {args.n} {args.kind} phantom(s) of {args.size}x{args.size} to {written}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from klviewer.demo import ensure_demo_study

    print(ensure_demo_study())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klviewer",
        description="Detect and localise where a CT study lies outside a diffusion prior's distribution.",
    )
    parser.add_argument("--version", action="version", version=f"klviewer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="list the patients, studies and series found under PATH(s), and every skipped file")
    info.add_argument("paths", nargs="+", metavar="PATH", help="DICOM file/folder/DICOMDIR, .npy/.npz image, or sinogram sidecar")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_cmd_info)

    ph = sub.add_parser("phantoms", help="generate procedural abdominal CT phantoms (healthy or with OOD ground truth)")
    ph.add_argument("--out", required=True, help="output folder (created; existing files are never overwritten)")
    ph.add_argument("-n", type=int, default=8, help="number of slices (default 8)")
    ph.add_argument("--kind", choices=PHANTOM_KINDS, default="healthy")
    ph.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--dicom", action="store_true", help="write a DICOM CT series (plus ground-truth masks) instead of .npz files")
    ph.set_defaults(func=_cmd_phantoms)

    demo = sub.add_parser("demo", help="create the demo study in the user cache (if needed) and print its folder")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except KlviewerError as exc:
        print(f"klviewer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("klviewer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
