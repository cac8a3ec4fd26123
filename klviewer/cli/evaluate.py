"""`klviewer evaluate detect`: KLIP, its KL z-score and the baselines on phantom sets (AUROC tables, ROC plots)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from klviewer.cli.options import add_analysis_options, non_negative_int, positive_int, settings_from_args
from klviewer.cli.progress import progress_bar


def _cmd_evaluate_detect(args: argparse.Namespace) -> int:
    from klviewer.evaluation.report import run_detection_benchmark

    total = args.n_id + args.n_ood + args.reference
    with progress_bar("evaluate", "slice") as progress:
        report = run_detection_benchmark(
            Path(args.out), settings_from_args(args), prior=args.prior, n_id=args.n_id, n_ood=args.n_ood,
            ood_kind=args.ood_kind, seed=args.seed, cache=Path(args.cache) if args.cache else None,
            command="klviewer " + " ".join(sys.argv[1:]), progress=lambda done, _total: progress(done, total),
            n_reference=args.reference,
        )
    for method, s in report.scores.items():
        print(f"{method:26s} dataset AUROC {s.dataset_auroc:.3f}   localisation AUROC {s.localisation_auroc:.3f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("evaluate", help="benchmarks on generated phantoms")
    ev_sub = ev.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    det = ev_sub.add_parser("detect", help="KLIP vs. baselines: dataset-level and localisation AUROC, ROC plots")
    det.add_argument("--out", default="benchmarks/results", help="folder for the markdown table, JSON and ROC plot")
    det.add_argument("--n-id", type=positive_int, default=40, help="healthy phantoms (default 40)")
    det.add_argument("--n-ood", type=positive_int, default=40, help="OOD phantoms (default 40)")
    det.add_argument("--ood-kind", default="lesion", choices=("lesion", "metal", "shift"))
    det.add_argument("--reference", type=non_negative_int, default=40, metavar="N",
                     help="healthy phantoms from the calibration seeds that fit the KL z-score reference "
                          "(default 40, as `klviewer calibrate -n 40`; 0: no klip_z)")
    det.add_argument("--cache", help="folder keeping per-slice results, so re-runs and sweeps skip sampling")
    add_analysis_options(det)
    det.set_defaults(func=_cmd_evaluate_detect)
