"""`klviewer shift`: rank priors by measurement-domain KL against a reference prior, or by denoising fit.

Prints a table and, on request, writes a JSON report and a PNG of the cumulative curves
(`klviewer.evaluation.prior_shift.run_shift`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from klviewer.cli.options import (
    INPUT_HELP,
    SLICES_HELP,
    add_measurement_options,
    add_quiet_option,
    positive_float,
    positive_int,
    settings_from_args,
)
from klviewer.cli.progress import progress_bar
from klviewer.errors import KlviewerInputError
from klviewer.evaluation.prior_shift import DEFAULT_SIGMA_POINTS, DEFAULT_SIGMA_RANGE, run_shift
from klviewer.inference.prior_selection import PriorRank
from klviewer.inference.shift_kl import CT_WEIGHTINGS, DEFAULT_CG_ITERS, default_sigma_grid


def format_table(ranks: Sequence[PriorRank]) -> str:
    """One row per candidate, best first: the ranking value, then the other estimates beside it."""
    fit = ranks[0].criterion == "denoising-fit"
    head = "fit - best" if fit else "KL nats"
    others = [w for w in CT_WEIGHTINGS if w not in ("derived", "paper")]
    width = max(12, *(len(r.name) for r in ranks))
    lines = [f"{'rank':<5}{'prior':<{width + 2}}{head:>12}" + "".join(f"{w:>12}" for w in others) + "  path"]
    for i, r in enumerate(ranks, 1):
        value = r.delta if fit else r.score
        extra = [r.totals.get(w, float("nan")) - (ranks[0].totals.get(w, 0.0) if fit else 0.0) for w in others]
        lines.append(f"{i:<5}{r.name:<{width + 2}}{value:>12.4g}" + "".join(f"{v:>12.4g}" for v in extra) + f"  {r.path}")
    return "\n".join(lines)


def _cmd_shift(args: argparse.Namespace) -> int:
    lo, hi = args.sigma_range
    if not lo < hi:
        raise KlviewerInputError(None, f"--sigma-range must be increasing, got {lo} {hi}")
    with progress_bar("shift", "step", quiet=args.quiet) as progress:
        run = run_shift(args.inputs, args.prior, reference=args.ref, out=args.out, plot=args.plot,
                        settings=settings_from_args(args),
                        slices=args.slices, sigmas=default_sigma_grid(lo, hi, args.sigma_points),
                        weighting=args.weighting, cg_iters=args.cg_iters, batch=args.batch, overwrite=args.overwrite,
                        command=shlex.join(["klviewer", *sys.argv[1:]]), progress=progress)
    n = len(run.report["measurements"])
    if args.ref is not None:
        print(f"measurement-domain KL(reference || prior) from {n} slice(s), weighting {args.weighting}; "
              f"reference {run.report['reference']['name']}")
    else:
        print(f"no reference: ranked by measurement-domain denoising fit on {n} slice(s) "
              f"(fit - best estimates the KL difference to the best prior)")
    print(format_table(run.ranks))
    for s in run.report["skipped"]:
        print(f"skipped {s['path']}: {s['reason']}")
    for target, what in ((args.out, "report"), (args.plot, "plot")):
        if target is not None:
            print(f"{what} written to {target}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``shift`` subcommand to the klviewer parser."""
    p = subparsers.add_parser(
        "shift", help="rank priors by measurement-domain KL against a reference prior (or by denoising fit)",
        description="Measurement-domain distribution shift between diffusion priors, from sparse-view CT "
                    "measurements only. With --ref: KL(reference || prior) per candidate; without: each "
                    "candidate's denoising fit on the measured data. Lowest first.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
    p.add_argument("--prior", action="append", required=True, metavar="PRIOR",
                   help="candidate prior (shipped name or folder); repeat for each candidate")
    p.add_argument("--ref", metavar="PRIOR", help="reference prior trained on data like the inputs (default: none, rank by fit)")
    p.add_argument("--out", metavar="FILE.json", help="write the report (ranks, curves, settings) here")
    p.add_argument("--plot", metavar="FILE.png", help="write the cumulative curves here")
    p.add_argument("--slices", default="all", metavar="SPEC", help=SLICES_HELP)
    add_measurement_options(p, seed_help="seed of the simulated measurements and the estimator's noise")
    p.add_argument("--weighting", default="derived", choices=CT_WEIGHTINGS,
                   help="which estimate ranks the priors (default derived: the row-space part, which the paper's "
                        "weight equals for fixed views; all are reported)")
    p.add_argument("--sigma-range", type=positive_float, nargs=2, metavar=("LO", "HI"), default=list(DEFAULT_SIGMA_RANGE),
                   help=f"noise levels integrated over (default {DEFAULT_SIGMA_RANGE[0]} {DEFAULT_SIGMA_RANGE[1]})")
    p.add_argument("--sigma-points", type=positive_int, default=DEFAULT_SIGMA_POINTS, metavar="N",
                   help=f"log-spaced noise levels (default {DEFAULT_SIGMA_POINTS})")
    p.add_argument("--cg-iters", type=positive_int, default=DEFAULT_CG_ITERS, metavar="N",
                   help=f"conjugate-gradient iterations of the row-space projections (default {DEFAULT_CG_ITERS})")
    p.add_argument("--batch", type=positive_int, default=4, metavar="N", help="slices per denoiser call (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --plot file")
    add_quiet_option(p)
    p.set_defaults(func=_cmd_shift)
