"""``klviewer align`` and ``klviewer compare``: command-line shells over
:func:`klviewer.inference.align.align_prior` and :func:`klviewer.inference.compare.compare_priors`."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path

from klviewer.cli_options import positive_float, positive_int, settings_from_args


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _add_measurement_options(p: argparse.ArgumentParser) -> None:
    """How image inputs are turned into measurements, as in ``klviewer analyze``."""
    from klviewer.inference.analysis import AnalysisSettings

    d = AnalysisSettings()
    p.add_argument("--views", type=positive_int, default=d.views, help=f"projection views for image inputs (default {d.views})")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--dose", type=positive_float, metavar="I0", help="Poisson noise: unattenuated photons per ray")
    noise.add_argument("--noise", type=positive_float, metavar="SIGMA", help="Gaussian noise std on line integrals")
    p.add_argument("--slices", default="all", help="'all', 'mid', or 0-based indices like 0,3,5-7 (default all)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _plain_warning(show):
    """Print klviewer's own warnings as one plain line; leave every other warning to `show`."""
    from klviewer.inference.align import FewMeasurementsWarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FewMeasurementsWarning):
            print(f"klviewer: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def _cmd_align(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from klviewer.inference.align import AlignConfig, AlignProgress, FewMeasurementsWarning, align_prior

    cfg = AlignConfig(
        prior=args.prior, inputs=args.inputs, out=Path(args.out), mode=args.mode, steps=args.steps, lr=args.lr,
        batch=args.batch, lora_rank=args.lora_rank, seed=args.seed, device=args.device, resume=args.resume,
        slices=args.slices, views=args.views, dose_i0=args.dose, noise_sigma=args.noise,
        checkpoint_every=args.checkpoint_every, name=args.name, ema=args.ema, input_image=args.input_image,
        recon_steps=args.recon_steps, command=shlex.join(["klviewer", *sys.argv[1:]]),
    )
    bars: dict[str, tqdm] = {}

    def progress(p: AlignProgress) -> None:
        bar = bars.get(p.stage)
        if bar is None:
            for other in bars.values():
                other.close()
            unit = "slice" if p.stage == "reconstruct" else "step"
            bar = bars[p.stage] = tqdm(total=p.steps, desc=p.stage, unit=unit, file=sys.stderr, disable=args.quiet,
                                       dynamic_ncols=True, initial=p.step - 1)
        bar.update(p.step - bar.n)
        if p.stage == "align":
            bar.set_postfix(loss=f"{p.loss:.4f}")

    # Ctrl-C cancels like the GUI's Cancel: the run stops within one step and leaves a resume checkpoint.
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    with warnings.catch_warnings():
        warnings.simplefilter("always", FewMeasurementsWarning)
        warnings.showwarning = _plain_warning(warnings.showwarning)
        try:
            out = align_prior(cfg, progress=progress, cancel=cancel)
        finally:
            signal.signal(signal.SIGINT, previous)
            for bar in bars.values():
                bar.close()
    print(f"aligned prior written to {out} (mode {cfg.mode}, {cfg.steps} steps; base prior {args.prior} unchanged)")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from klviewer.inference.compare import JSON_FILE, compare_priors, write_comparison
    from klviewer.inference.runner import check_output_folder
    from klviewer.io.safe_write import OutputExistsError

    out = Path(args.out)
    # Refuse before minutes of sampling, not after.
    check_output_folder(out, args.inputs)
    if (out / JSON_FILE).exists() and not args.overwrite:
        raise OutputExistsError(out / JSON_FILE)
    settings = settings_from_args(args)
    with tqdm(total=0, unit="step", file=sys.stderr, disable=args.quiet, dynamic_ncols=True) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

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


def format_table(comparison) -> str:
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
    """Add the ``align`` and ``compare`` subcommands to the klviewer parser."""
    from klviewer.inference.adapters import ADAPTER_MODES
    from klviewer.inference.align import INPUT_IMAGES, AlignConfig
    from klviewer.inference.analysis import AnalysisSettings
    from klviewer.inference.sampler import ANY_PRIOR_GUIDANCES
    from klviewer.priors.checkpoint import DEFAULT_PRIOR

    d = AlignConfig(prior="", inputs=["-"], out=Path("-"))
    al = subparsers.add_parser("align", help="fine-tune a copy of a prior on the measurements of INPUTs (no clean images)")
    al.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM file/folder, .npy/.npz HU image, or sinogram sidecar")
    al.add_argument("--prior", required=True, help="base prior: shipped name or folder (never modified)")
    al.add_argument("--out", required=True, help="folder of the aligned prior (config.json, model.safetensors, "
                                                 "alignment/ with the loss curve, resume/)")
    al.add_argument("--mode", choices=ADAPTER_MODES, default=d.mode,
                    help=f"what trains: all weights, norm and bias parameters, or LoRA adapters (default {d.mode})")
    al.add_argument("--steps", type=positive_int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    al.add_argument("--lr", type=positive_float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})")
    al.add_argument("--batch", type=positive_int, default=d.batch, help=f"measurements per step (default {d.batch})")
    al.add_argument("--lora-rank", type=positive_int, default=d.lora_rank, help=f"LoRA rank (default {d.lora_rank})")
    al.add_argument("--ema", type=_unit_interval, default=d.ema, help=f"EMA decay of the saved weights, 0 = off (default {d.ema})")
    al.add_argument("--input-image", choices=INPUT_IMAGES, default=d.input_image,
                    help="training image made from each measurement: a posterior sample under the base prior (EDM loss "
                         "on all pixels), or the minimum-norm least-squares image (loss on the measured data only; "
                         f"worse for sparse-view CT, see docs/alignment.md) (default {d.input_image})")
    al.add_argument("--recon-steps", type=positive_int, default=d.recon_steps,
                    help=f"sampler steps for each 'recon' image (default {d.recon_steps})")
    al.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    al.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every,
                    help=f"steps between resume checkpoints (default {d.checkpoint_every})")
    al.add_argument("--name", help="prior name recorded in config.json (default: the --out folder name)")
    _add_measurement_options(al)
    al.set_defaults(func=_cmd_align)

    a = AnalysisSettings()
    cmp = subparsers.add_parser("compare", help="reconstruct and analyse the same measurements with two priors "
                                                "(e.g. base vs aligned) and report per-case numbers")
    cmp.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM file/folder, .npy/.npz HU image, or sinogram sidecar")
    cmp.add_argument("--before", required=True, help=f"first prior (e.g. the base prior; shipped: {DEFAULT_PRIOR})")
    cmp.add_argument("--after", required=True, help="second prior (e.g. the aligned prior)")
    cmp.add_argument("--ref", metavar="PRIOR", help="reference prior of the test data: adds the measurement-domain KL "
                                                    "of each prior against it (curves in shift_kl.png)")
    cmp.add_argument("--out", required=True, help="results folder (comparison.json, comparison.csv, before/, after/)")
    cmp.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    cmp.add_argument("--steps", type=positive_int, default=a.steps, help=f"sampler steps (default {a.steps})")
    cmp.add_argument("--samples", type=positive_int, default=a.samples, help=f"posterior samples (default {a.samples})")
    cmp.add_argument("--patch", type=positive_int, default=a.patch, help=f"KL patch size in pixels (default {a.patch})")
    cmp.add_argument("--sigma-window", type=positive_float, nargs=2, metavar=("LO", "HI"), default=list(a.sigma_window),
                     help=f"noise levels summed into the KL map (default {a.sigma_window[0]} {a.sigma_window[1]})")
    cmp.add_argument("--guidance", default=a.guidance, choices=ANY_PRIOR_GUIDANCES, help=f"likelihood guidance (default {a.guidance})")
    cmp.add_argument("--flag-threshold", type=positive_float, metavar="NATS",
                     help="flag slices whose score exceeds this (default: each prior's calibration, if any)")
    _add_measurement_options(cmp)
    cmp.set_defaults(func=_cmd_compare)
