"""`klviewer calibrate`: a prior's flag thresholds and healthy reference, stored in its calibration.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from klviewer.cli.options import SLICES_HELP, add_analysis_options, positive_int, settings_from_args
from klviewer.cli.progress import progress_bar
from klviewer.errors import KlviewerError

DEFAULT_CALIBRATION_SLICES = 20


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from klviewer.evaluation.calibrate import calibrate_prior

    if args.healthy and args.n is not None:
        raise KlviewerError("-n counts healthy phantoms; with --healthy every picked slice of the studies is scored")
    if args.slices != "all" and not args.healthy:
        raise KlviewerError("--slices picks slices of the --healthy studies; phantoms are counted with -n")
    n = DEFAULT_CALIBRATION_SLICES if args.n is None else args.n
    with progress_bar("calibrate", "slice") as progress:
        cal = calibrate_prior(
            args.prior, settings_from_args(args), n=n, fpr=args.fpr, seed=args.seed,
            cache=Path(args.cache) if args.cache else None, write=not args.dry_run, overwrite=args.overwrite,
            command="klviewer " + " ".join(sys.argv[1:]), progress=progress,
            healthy=args.healthy, slices=args.slices,
        )
    s = cal.entry["healthy_scores"]
    print(f"healthy scores (nats): min {s['min']:.4g}, median {s['median']:.4g}, max {s['max']:.4g} over {cal.scores.size} slices")
    print(f"threshold {cal.threshold:.6g} nats: {cal.entry['healthy_exceeding']} of {cal.scores.size} healthy slices above it")
    if cal.z_threshold is None:
        print("no healthy reference for KL z-scores: it needs at least 4 healthy slices")
    else:
        z = cal.entry["healthy_reference"]
        print(f"KL z-score threshold {cal.z_threshold:.4g}: {z['healthy_exceeding']} of {cal.scores.size} healthy "
              f"slices above it (cross-fitted z-scores {z['healthy_z_scores']['min']:.3g} to {z['healthy_z_scores']['max']:.3g})")
    fit = cal.entry["prior_fit"]
    print(f"prior-fit threshold {fit['threshold']:.4g} nats per body pixel ({fit['margin']:g} x the healthy score at the "
          f"false-positive rate; healthy {fit['healthy_scores']['min']:.3g} to {fit['healthy_scores']['max']:.3g})")
    print(f"written to {cal.path}" if cal.path else "not written (--dry-run)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="set a prior's flag thresholds and KL z-score reference from held-out healthy "
                                                "phantoms or healthy studies (calibration.json)")
    p.add_argument("-n", type=positive_int, help=f"healthy phantoms to score (default {DEFAULT_CALIBRATION_SLICES})")
    p.add_argument("--healthy", nargs="+", metavar="INPUT",
                   help="score these healthy studies (DICOM, arrays or sinograms) instead of phantoms")
    p.add_argument("--slices", default="all", help="with --healthy: " + SLICES_HELP)
    p.add_argument("--fpr", type=float, default=0.05, help="false-positive rate allowed on them (default 0.05)")
    p.add_argument("--cache", help="folder keeping per-slice results, so re-runs skip sampling")
    p.add_argument("--overwrite", action="store_true", help="replace the threshold already stored for these settings")
    p.add_argument("--dry-run", action="store_true", help="print the threshold without writing calibration.json")
    add_analysis_options(p)
    p.set_defaults(func=_cmd_calibrate)
