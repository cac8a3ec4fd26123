"""The `klviewer` command. Each subcommand is a thin shell over a service function."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from klviewer import __version__
from klviewer.cli_options import add_analysis_options, non_negative_int, positive_float, positive_int, settings_from_args
from klviewer.errors import KlviewerError

PHANTOM_KINDS = ("healthy", "lesion", "metal", "shift", "mixed")
DEFAULT_CALIBRATION_SLICES = 20


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


def _cmd_analyze(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from klviewer.inference.runner import run_analysis

    settings = settings_from_args(args)
    with tqdm(total=0, unit="step", file=sys.stderr, disable=args.quiet, dynamic_ncols=True) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        run = run_analysis(args.inputs, args.out, settings, prior=args.prior, slices=args.slices,
                           overwrite=args.overwrite, progress=progress)
    flagged = sum(1 for r in run.rows if r["flagged"])
    print(f"analysed {len(run.rows)} slice(s), {flagged} flagged; results in {run.out}")
    for s in run.skipped:
        print(f"skipped {s['path']}: {s['reason']}")
    return 0


def _cmd_evaluate_detect(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from klviewer.evaluation.report import run_detection_benchmark

    with tqdm(total=args.n_id + args.n_ood + args.reference, unit="slice", file=sys.stderr, dynamic_ncols=True) as bar:
        report = run_detection_benchmark(
            Path(args.out), settings_from_args(args), prior=args.prior, n_id=args.n_id, n_ood=args.n_ood,
            ood_kind=args.ood_kind, seed=args.seed, cache=Path(args.cache) if args.cache else None,
            command="klviewer " + " ".join(sys.argv[1:]), progress=lambda d, t: bar.update(d - bar.n),
            n_reference=args.reference,
        )
    for method, s in report.scores.items():
        print(f"{method:26s} dataset AUROC {s.dataset_auroc:.3f}   localisation AUROC {s.localisation_auroc:.3f}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from klviewer.evaluation.calibrate import calibrate_prior

    if args.healthy and args.n is not None:
        raise KlviewerError("-n counts healthy phantoms; with --healthy every picked slice of the studies is scored")
    if args.slices != "all" and not args.healthy:
        raise KlviewerError("--slices picks slices of the --healthy studies; phantoms are counted with -n")
    n = DEFAULT_CALIBRATION_SLICES if args.n is None else args.n

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    with tqdm(total=n, unit="slice", file=sys.stderr, dynamic_ncols=True) as bar:
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
    print(f"written to {cal.path}" if cal.path else "not written (--dry-run)")
    return 0


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

    an = sub.add_parser("analyze", help="KL analysis of CT inputs: per-slice OOD scores, KL maps and reconstructions")
    an.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM file/folder, .npy/.npz HU image, or sinogram sidecar")
    an.add_argument("--out", required=True, help="results folder (summary.json, summary.csv, <case>/<slice>.npz)")
    an.add_argument("--slices", default="all", help="'all', 'mid', or 0-based indices like 0,3,5-7 (default all)")
    an.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    an.add_argument("--quiet", action="store_true", help="no progress bar")
    add_analysis_options(an)
    an.set_defaults(func=_cmd_analyze)

    from klviewer.priors.train_cli import register as register_train

    register_train(sub)

    from klviewer.export.export_cli import register as register_export

    register_export(sub)

    from klviewer.inference.shift_cli import register as register_shift

    register_shift(sub)

    from klviewer.inference.align_cli import register as register_align

    register_align(sub)

    from klviewer.batch.batch_cli import register as register_batch

    register_batch(sub)

    ev = sub.add_parser("evaluate", help="benchmarks on generated phantoms")
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

    cal = sub.add_parser("calibrate", help="set a prior's flag thresholds and KL z-score reference from held-out healthy "
                                           "phantoms or healthy studies (calibration.json)")
    cal.add_argument("-n", type=positive_int, help=f"healthy phantoms to score (default {DEFAULT_CALIBRATION_SLICES})")
    cal.add_argument("--healthy", nargs="+", metavar="INPUT",
                     help="score these healthy studies (DICOM, arrays or sinograms) instead of phantoms")
    cal.add_argument("--slices", default="all", help="with --healthy: 'all', 'mid', or 0-based indices like 0,3,5-7")
    cal.add_argument("--fpr", type=float, default=0.05, help="false-positive rate allowed on them (default 0.05)")
    cal.add_argument("--cache", help="folder keeping per-slice results, so re-runs skip sampling")
    cal.add_argument("--overwrite", action="store_true", help="replace the threshold already stored for these settings")
    cal.add_argument("--dry-run", action="store_true", help="print the threshold without writing calibration.json")
    add_analysis_options(cal)
    cal.set_defaults(func=_cmd_calibrate)

    gui = sub.add_parser("gui", help="open the desktop app (the default when no command is given)")
    gui.add_argument("paths", nargs="*", metavar="PATH", help="studies to open (default: the demo study)")
    gui.add_argument("--analyze", action="store_true", help="run the analysis on the shown slice with the current settings")
    gui.add_argument("--slice", type=int, help="0-based slice to show")
    gui.add_argument("--patch", type=positive_int, help="KL patch size in pixels")
    gui.add_argument("--sigma-window", type=positive_float, nargs=2, metavar=("LO", "HI"), help="noise-level window")
    gui.add_argument("--screenshot", metavar="FILE.png", help="save a screenshot of the main window")
    gui.add_argument("--quit", action="store_true", help="exit after loading, analysing and the screenshot")
    gui.set_defaults(func=_cmd_gui)

    demo = sub.add_parser("demo", help="create the demo study in the user cache (if needed) and print its folder")
    demo.set_defaults(func=_cmd_demo)
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
