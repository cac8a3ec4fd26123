"""`klviewer phantoms`: procedural abdominal CT phantoms, healthy or with ground-truth OOD masks."""

from __future__ import annotations

import argparse
from pathlib import Path

PHANTOM_KINDS = ("healthy", "lesion", "metal", "shift", "mixed")


def _cmd_phantoms(args: argparse.Namespace) -> int:
    from klviewer.phantoms.export import write_phantom_set

    written = write_phantom_set(
        Path(args.out), kind=args.kind, n=args.n, size=args.size, seed=args.seed, dicom=args.dicom
    )
    print(f"wrote {args.n} {args.kind} phantom(s) of {args.size}x{args.size} to {written}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("phantoms", help="generate procedural abdominal CT phantoms (healthy or with OOD ground truth)")
    p.add_argument("--out", required=True, help="output folder (created; existing files are never overwritten)")
    p.add_argument("-n", type=int, default=8, help="number of slices (default 8)")
    p.add_argument("--kind", choices=PHANTOM_KINDS, default="healthy")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dicom", action="store_true", help="write a DICOM CT series (plus ground-truth masks) instead of .npz files")
    p.set_defaults(func=_cmd_phantoms)
