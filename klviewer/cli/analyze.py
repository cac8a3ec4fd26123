"""`klviewer analyze`: per-slice OOD scores, KL maps and reconstructions into a results folder."""

from __future__ import annotations

import argparse
from collections import Counter

from klviewer.cli.options import (
    INPUT_HELP,
    SLICES_HELP,
    add_analysis_options,
    add_escalation_options,
    add_quiet_option,
    escalation_from_args,
    positive_int,
    settings_from_args,
)
from klviewer.cli.progress import progress_bar
from klviewer.inference.scoring import CANNOT_FLAG, FLAGGED, MISMATCH, NOT_FLAGGED


def _cmd_analyze(args: argparse.Namespace) -> int:
    from klviewer.results.analyze import run_analysis

    with progress_bar("analyze", "step", quiet=args.quiet) as progress:
        run = run_analysis(args.inputs, args.out, settings_from_args(args), prior=args.prior, slices=args.slices,
                           overwrite=args.overwrite, slice_batch=args.slice_batch,
                           escalation=escalation_from_args(args), progress=progress)
    counts = Counter(r["verdict"] for r in run.rows)
    parts = [f"{counts[status]} {status}" for status in (FLAGGED, MISMATCH, NOT_FLAGGED, CANNOT_FLAG) if counts[status]]
    print(f"analysed {len(run.rows)} slice(s): {', '.join(parts)}; results in {run.out}")
    if args.escalate is not None:
        escalated = sum(1 for r in run.rows if r["escalated"])
        print(f"two stages: {escalated} of {len(run.rows)} slice(s) escalated to {args.escalate} chains")
    if counts[MISMATCH]:
        print(f"prior mismatch: {args.prior} does not describe {counts[MISMATCH]} slice(s), so their KL maps and flags "
              "are not meaningful; adapt a prior to your site's healthy studies (klviewer adapt)")
    if counts[CANNOT_FLAG]:
        s = settings_from_args(args)
        print(f"cannot flag: nothing can be flagged, because {args.prior} has no calibrated threshold for these settings "
              f"(views {s.views}, steps {s.steps}, samples {s.samples}, guidance {s.guidance}, patch {s.patch}, "
              f"sigma window {s.sigma_window}); klviewer calibrate with them, or --flag-threshold NATS")
    elif run.rule_text:
        print(f"rule: {run.rule_text}")
    for s in run.skipped:
        print(f"skipped {s['path']}: {s['reason']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze", help="KL analysis of CT inputs: per-slice OOD scores, KL maps and reconstructions")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
    p.add_argument("--out", required=True, help="results folder (summary.json, summary.csv, <case>/<slice>.npz)")
    p.add_argument("--slices", default="all", help=SLICES_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--slice-batch", type=positive_int, metavar="N",
                   help="slices of one series whose posterior chains share each forward pass (default: enough for "
                        "4 chains per pass on a CPU, 16 on a GPU); the numbers change by rounding only")
    add_quiet_option(p)
    add_analysis_options(p)
    add_escalation_options(p)
    p.set_defaults(func=_cmd_analyze)
