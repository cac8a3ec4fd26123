"""`klviewer analyze`: per-slice OOD scores, KL maps and reconstructions into a results folder."""

from __future__ import annotations

import argparse

from klviewer.cli.options import INPUT_HELP, SLICES_HELP, add_analysis_options, add_quiet_option, settings_from_args
from klviewer.cli.progress import progress_bar


def _cmd_analyze(args: argparse.Namespace) -> int:
    from klviewer.results.analyze import run_analysis

    with progress_bar("analyze", "step", quiet=args.quiet) as progress:
        run = run_analysis(args.inputs, args.out, settings_from_args(args), prior=args.prior, slices=args.slices,
                           overwrite=args.overwrite, progress=progress)
    flagged = sum(1 for r in run.rows if r["flagged"])
    if run.flag_rule is None:
        s = settings_from_args(args)
        print(f"analysed {len(run.rows)} slice(s); nothing can be flagged: the prior has no calibration (threshold "
              f"or healthy reference) for these settings (views {s.views}, steps {s.steps}, samples {s.samples}, "
              f"guidance {s.guidance}, patch {s.patch}, sigma window {s.sigma_window}); run `klviewer calibrate` with "
              f"them or pass --flag-threshold; results in {run.out}")
    else:
        print(f"analysed {len(run.rows)} slice(s), {flagged} flagged ({run.rule_text}); results in {run.out}")
    for s in run.skipped:
        print(f"skipped {s['path']}: {s['reason']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze", help="KL analysis of CT inputs: per-slice OOD scores, KL maps and reconstructions")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
    p.add_argument("--out", required=True, help="results folder (summary.json, summary.csv, <case>/<slice>.npz)")
    p.add_argument("--slices", default="all", help=SLICES_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    add_quiet_option(p)
    add_analysis_options(p)
    p.set_defaults(func=_cmd_analyze)
