"""The `klviewer` command: shared options and progress bars, and one module per subcommand.

Each subcommand is a thin shell over a service function of the library; no library module
imports this package.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from klviewer import __version__
from klviewer.cli import (
    adapt,
    align,
    analyze,
    batch,
    calibrate,
    compare,
    evaluate,
    export,
    gui,
    info,
    phantoms,
    shift,
    train,
)
from klviewer.errors import KlviewerError

SUBCOMMANDS = (info, phantoms, analyze, train, adapt, export, shift, align, compare, batch, evaluate, calibrate, gui)
"""In the order `klviewer --help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klviewer",
        description="Detect and localise where a CT study lies outside a diffusion prior's distribution.",
    )
    parser.add_argument("--version", action="version", version=f"klviewer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # pydicom warns about every non-conforming value it reads (hashed UIDs, odd VRs); the reader
    # reports what actually stops a file from loading, so the rest is noise on a terminal.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["gui"])
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
