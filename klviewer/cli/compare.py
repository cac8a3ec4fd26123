"""``klviewer compare``: the command-line shell over :func:`klviewer.evaluation.compare.compare_priors`."""

from __future__ import annotations

import argparse
from pathlib import Path

from klviewer.cli.align import add_input_options
from klviewer.cli.options import INPUT_HELP, add_sampler_options, settings_from_args
from klviewer.cli.progress import progress_bar
from klviewer.evaluation.compare import JSON_FILE, Comparison, compare_priors, write_comparison
from klviewer.io.safe_write import OutputExistsError, check_output_folder
from klviewer.priors.checkpoint import DEFAULT_PRIOR


def _cmd_compare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    # Refuse before minutes of sampling, not after.
    check_output_folder(out, args.inputs)
    if (out / JSON_FILE).exists() and not args.overwrite:
        raise OutputExistsError(out / JSON_FILE)
    settings = settings_from_args(args)
    with progress_bar("compare", "step", quiet=args.quiet) as progress:
        comparison = compare_priors(args.before, args.after, args.inputs, settings, reference=args.ref,
                                    slices=args.slices, progress=progress)
    write_comparison(comparison, out, overwrite=args.overwrite)
    print(format_table(comparison))
    print(f"results in {out}")
    for s in comparison.skipped:
        print(f"skipped {s['path']}: {s['reason']}")
    return 0


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = (("psnr", "PSNR dB", 2), ("ssim", "SSIM", 3), ("score", "score", 3), ("total_kl", "total KL", 2),
           ("dc_residual", "DC resid", 3))


def format_table(comparison: Comparison) -> str:
    """One row per case, each metric as before -> after, then the means and the shift KL."""
    head = ["case", "slice", *(label for _, label, _ in COLUMNS)]
    rows = []
    for c in comparison.cases:
        rows.append([c.case, str(c.index), *(f"{_fmt(c.metrics['before'][k], d)} -> {_fmt(c.metrics['after'][k], d)}"
                                             for k, _, d in COLUMNS)])
    means = comparison.means()
    rows.append(["mean", "", *(f"{_fmt(means['before'][k], d)} -> {_fmt(means['after'][k], d)}" for k, _, d in COLUMNS)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    title = f"before: {comparison.before_prior}   after: {comparison.after_prior}"
    text = "\n".join([title, *lines])
    if comparison.shift_before is not None and comparison.shift_after is not None:
        text += (f"\nmeasurement-domain KL vs reference {comparison.reference_ref.name if comparison.reference_ref else ''}: "
                 f"{comparison.shift_before.total:.4g} -> {comparison.shift_after.total:.4g} nats")
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` subcommand to the klviewer parser."""
    cmp = subparsers.add_parser("compare", help="reconstruct and analyse the same measurements with two priors "
                                                "(e.g. base vs aligned) and report per-case numbers")
    cmp.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
    cmp.add_argument("--before", required=True, help=f"first prior (e.g. the base prior; shipped: {DEFAULT_PRIOR})")
    cmp.add_argument("--after", required=True, help="second prior (e.g. the aligned prior)")
    cmp.add_argument("--ref", metavar="PRIOR", help="reference prior of the test data: adds the measurement-domain KL "
                                                    "of each prior against it (curves in shift_kl.png)")
    cmp.add_argument("--out", required=True, help="results folder (comparison.json, comparison.csv, before/, after/)")
    cmp.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    add_sampler_options(cmp, flag_help="flag slices whose score exceeds this (default: each prior's calibration, if any)")
    add_input_options(cmp)
    cmp.set_defaults(func=_cmd_compare)
