"""`klviewer gui` (the default command) and `klviewer demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from klviewer.cli.options import positive_float, positive_int


def _cmd_gui(args: argparse.Namespace) -> int:
    from klviewer.app.launch import GuiOptions, run_gui

    return run_gui(GuiOptions(
        paths=[Path(p) for p in args.paths], analyze=args.analyze, slice_index=args.slice, patch=args.patch,
        sigma_window=tuple(args.sigma_window) if args.sigma_window else None,
        screenshot=Path(args.screenshot) if args.screenshot else None, quit=args.quit,
    ))


def _cmd_demo(args: argparse.Namespace) -> int:
    from klviewer.demo import ensure_demo_study

    print(ensure_demo_study())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    gui = subparsers.add_parser("gui", help="open the desktop app (the default when no command is given)")
    gui.add_argument("paths", nargs="*", metavar="PATH", help="studies to open (default: the demo study)")
    gui.add_argument("--analyze", action="store_true", help="run the analysis on the shown slice with the current settings")
    gui.add_argument("--slice", type=int, help="0-based slice to show")
    gui.add_argument("--patch", type=positive_int, help="KL patch size in pixels")
    gui.add_argument("--sigma-window", type=positive_float, nargs=2, metavar=("LO", "HI"), help="noise-level window")
    gui.add_argument("--screenshot", metavar="FILE.png", help="save a screenshot of the main window")
    gui.add_argument("--quit", action="store_true", help="exit after loading, analysing and the screenshot")
    gui.set_defaults(func=_cmd_gui)

    demo = subparsers.add_parser("demo", help="create the demo study in the user cache (if needed) and print its folder")
    demo.set_defaults(func=_cmd_demo)
