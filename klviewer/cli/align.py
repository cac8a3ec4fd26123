"""``klviewer align``: the command-line shell over :func:`klviewer.inference.align.align_prior`."""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

from klviewer.cli.options import (
    INPUT_HELP,
    SLICES_HELP,
    add_measurement_options,
    add_quiet_option,
    positive_float,
    positive_int,
)
from klviewer.cli.progress import StageBars, interrupt_cancels
from klviewer.inference import align as align_service
from klviewer.inference.align import INPUT_IMAGES, AlignConfig, AlignProgress, FewMeasurementsWarning
from klviewer.priors.adapters import ADAPTER_MODES


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_input_options(p: argparse.ArgumentParser) -> None:
    """How image inputs are turned into measurements, and which slices, as in ``klviewer analyze``."""
    p.add_argument("--slices", default="all", help=SLICES_HELP)
    add_measurement_options(p)
    add_quiet_option(p)


def _plain_warning(show):
    """Print klviewer's own warnings as one plain line; leave every other warning to `show`."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FewMeasurementsWarning):
            print(f"klviewer: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def _cmd_align(args: argparse.Namespace) -> int:
    cfg = AlignConfig(
        prior=args.prior, inputs=args.inputs, out=Path(args.out), mode=args.mode, steps=args.steps, lr=args.lr,
        batch=args.batch, lora_rank=args.lora_rank, seed=args.seed, device=args.device, resume=args.resume,
        slices=args.slices, views=args.views, dose_i0=args.dose, noise_sigma=args.noise,
        checkpoint_every=args.checkpoint_every, name=args.name, ema=args.ema, input_image=args.input_image,
        recon_steps=args.recon_steps, command=shlex.join(["klviewer", *sys.argv[1:]]),
    )
    bars = StageBars(args.quiet)

    def progress(p: AlignProgress) -> None:
        bars.update(p.stage, p.step, p.steps, unit="slice" if p.stage == "reconstruct" else "step",
                    loss=p.loss if p.stage == "align" else None)

    with warnings.catch_warnings(), interrupt_cancels() as cancel:
        warnings.simplefilter("always", FewMeasurementsWarning)
        warnings.showwarning = _plain_warning(warnings.showwarning)
        try:
            out = align_service.align_prior(cfg, progress=progress, cancel=cancel)
        finally:
            bars.close()
    print(f"aligned prior written to {out} (mode {cfg.mode}, {cfg.steps} steps; base prior {args.prior} unchanged)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``align`` subcommand to the klviewer parser."""
    d = AlignConfig(prior="", inputs=["-"], out=Path("-"))
    al = subparsers.add_parser("align", help="fine-tune a copy of a prior on the measurements of INPUTs (no clean images)")
    al.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
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
    add_input_options(al)
    al.set_defaults(func=_cmd_align)
