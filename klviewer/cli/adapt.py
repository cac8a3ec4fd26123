"""``klviewer adapt``: the command-line shell over :func:`klviewer.evaluation.adapt.adapt_prior`."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from klviewer.cli.options import INPUT_HELP, add_measurement_options, positive_float, positive_int, settings_from_args
from klviewer.cli.progress import StageBars, interrupt_cancels
from klviewer.evaluation import adapt as adapt_service
from klviewer.evaluation.adapt import HELD_OUT_FRACTION, AdaptConfig, AdaptProgress
from klviewer.inference.precision import precision_for_device
from klviewer.inference.settings import NAMED_SETTINGS, AnalysisSettings
from klviewer.priors.adapters import ADAPTER_MODES


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1, got {text}")
    return value


def _cmd_adapt(args: argparse.Namespace) -> int:
    acquisition = settings_from_args(args)
    settings: list[AnalysisSettings] = [
        precision_for_device(dataclasses.replace(NAMED_SETTINGS[name], views=acquisition.views,
                                                 dose_i0=acquisition.dose_i0, noise_sigma=acquisition.noise_sigma,
                                                 seed=acquisition.seed, device=args.device))[0]
        for name in dict.fromkeys(args.calibrate)]
    cfg = AdaptConfig(
        base=args.prior, inputs=args.healthy, out=Path(args.out), mode=args.mode, steps=args.steps, lr=args.lr,
        batch=args.batch, seed=args.seed, device=args.device, resume=args.resume, held_out=args.held_out,
        settings=settings, fpr=args.fpr, augment=not args.no_augment, name=args.name,
        command=shlex.join(["klviewer", *sys.argv[1:]]),
    )
    bars = StageBars(args.quiet)

    def progress(p: AdaptProgress) -> None:
        bars.update(p.stage, p.step, p.steps, unit="step" if p.stage == "train" else "slice",
                    loss=p.loss if p.stage == "train" else None)

    try:
        with interrupt_cancels() as cancel:
            result = adapt_service.adapt_prior(cfg, progress=progress, cancel=cancel)
    finally:
        bars.close()
    split = result.split.describe()
    print(f"adapted prior written to {result.out} (mode {cfg.mode}, {cfg.steps} steps; base prior {args.prior} "
          f"unchanged)")
    print(f"split by {split['method']}: {split['train_slices']} training slices of {len(split['train_patients'])} "
          f"patient(s), {split['held_out_slices']} held out of {len(split['held_out_patients'])}")
    for row in result.report["calibration"]:
        print(f"calibrated {row['settings']}: nats threshold {row['nats_threshold']:.4g}"
              + (f", z threshold {row['z_threshold']:.3g}" if "z_threshold" in row else "")
              + (f", prior-fit threshold {row['prior_fit_threshold']:.4g}" if "prior_fit_threshold" in row else ""))
    print(f"report: {result.out / 'adaptation' / 'ADAPTATION.md'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    d = AdaptConfig(base="", inputs=["-"], out=Path("-"))
    p = subparsers.add_parser(
        "adapt", help="make a site prior: fine-tune a copy of a prior on studies you vouch for as healthy, split by "
                      "patient, and calibrate it on the held-out patients",
        description="Split the healthy studies by patient (PatientID, else StudyInstanceUID; one patient: contiguous "
                    "slabs with a gap), fine-tune a copy of --prior on the training part, calibrate it on the held-out "
                    "part, and write a report. The result is an ordinary prior folder for --prior.")
    p.add_argument("--prior", required=True, help="base prior: shipped name or folder (never modified)")
    p.add_argument("--healthy", required=True, nargs="+", metavar="INPUT", help="healthy studies: " + INPUT_HELP)
    p.add_argument("--out", required=True, help="folder of the adapted prior (config.json, model.safetensors, "
                                                "calibration.json, adaptation/ with the report, resume/)")
    p.add_argument("--mode", choices=ADAPTER_MODES, default=d.mode,
                   help=f"what trains: all weights, norm and bias parameters, or LoRA adapters (default {d.mode})")
    p.add_argument("--steps", type=positive_int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    p.add_argument("--lr", type=positive_float, help="Adam learning rate (default: 1e-4 full, 3e-3 norm-bias, 1e-3 lora)")
    p.add_argument("--batch", type=positive_int, default=d.batch, help=f"slices per step (default {d.batch})")
    p.add_argument("--held-out", type=_fraction, default=HELD_OUT_FRACTION,
                   help=f"fraction of the slices held out for calibration, as whole patients (default {HELD_OUT_FRACTION})")
    p.add_argument("--calibrate", nargs="+", choices=sorted(NAMED_SETTINGS), default=["default"],
                   help="analysis settings to calibrate the adapted prior for (default: default)")
    p.add_argument("--fpr", type=float, default=d.fpr, help=f"false-positive rate on the held-out slices (default {d.fpr})")
    p.add_argument("--no-augment", action="store_true", help="train without flips, rotations, scales and HU offsets")
    p.add_argument("--name", help="prior name recorded in config.json (default: the --out folder name)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_measurement_options(p, seed_help="seed of the split, the training and the calibration's measurements")
    p.set_defaults(func=_cmd_adapt)
