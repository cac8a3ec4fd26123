"""Command-line options shared by the subcommands: argument types, the measurement and analysis options."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from klviewer.errors import KlviewerInputError
from klviewer.inference.escalation import DEFAULT_RATE, Escalation
from klviewer.inference.precision import precision_for_device
from klviewer.inference.sampler import ANY_PRIOR_GUIDANCES, HIGH_GUIDANCES, PRECISIONS
from klviewer.inference.settings import DEFAULT_PROFILE, EXTRA_SAMPLING_KEYS, MAX_SAMPLES, PROFILES, AnalysisSettings
from klviewer.priors.checkpoint import DEFAULT_PRIOR

DEVICES = ("auto", "cpu", "cuda")
DEFAULTS = PROFILES[DEFAULT_PROFILE]
SAMPLER_OPTIONS = ("steps", "samples", "patch", "sigma_window", "guidance", *EXTRA_SAMPLING_KEYS)
"""The options a profile sets; each one given on the command line overrides its profile's value."""
INPUT_HELP = "DICOM file/folder, .npy/.npz HU image, or sinogram sidecar"
SLICES_HELP = "'all', 'mid', or 0-based indices like 0,3,5-7 (default all)"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def sample_count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_SAMPLES:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_SAMPLES} posterior samples, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=DEFAULTS.device, choices=DEVICES)


def add_measurement_options(p: argparse.ArgumentParser, *, seed_help: str | None = None) -> None:
    """How image inputs become measurements (views, Poisson or Gaussian noise), with the seed and device."""
    p.add_argument("--views", type=positive_int, default=DEFAULTS.views,
                   help=f"projection views for image inputs (default {DEFAULTS.views})")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--dose", type=positive_float, metavar="I0", help="Poisson noise: unattenuated photons per ray")
    noise.add_argument("--noise", type=positive_float, metavar="SIGMA", help="Gaussian noise std on line integrals")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help=seed_help)
    add_device_option(p)


def add_sampler_options(p: argparse.ArgumentParser, *, flag_help: str) -> None:
    """The profile, the sampler and KL-map settings that change it, and the flag threshold in nats."""
    profiles = ", ".join(f"{name}: {s.describe_sampling()}" for name, s in PROFILES.items())
    p.add_argument("--profile", default=DEFAULT_PROFILE, choices=tuple(PROFILES),
                   help=f"named settings the shipped prior is calibrated for (default {DEFAULT_PROFILE}; {profiles})")
    p.add_argument("--steps", type=positive_int, help="sampler steps (of the shared chain when branched)")
    p.add_argument("--samples", type=sample_count, help=f"posterior samples (1 to {MAX_SAMPLES})")
    p.add_argument("--patch", type=positive_int, help="KL patch size in pixels")
    p.add_argument("--sigma-window", type=positive_float, nargs=2, metavar=("LO", "HI"),
                   help="noise levels summed into the KL map")
    p.add_argument("--guidance", choices=ANY_PRIOR_GUIDANCES, help="likelihood guidance")
    p.add_argument("--sigma-min", type=positive_float, metavar="SIGMA", help="noise level the sampler stops at")
    p.add_argument("--sigma-max", type=positive_float, metavar="SIGMA", help="noise level the sampler starts from")
    p.add_argument("--branch-sigma", type=positive_float, metavar="SIGMA",
                   help="samples share one chain down to this noise level and branch there")
    p.add_argument("--branch-steps", type=positive_int, help="noise levels of each branch, down to --sigma-min")
    p.add_argument("--trunks", type=positive_int, metavar="N",
                   help="chains down to --branch-sigma, each branching into samples / N (default 1)")
    p.add_argument("--high-guidance", choices=HIGH_GUIDANCES,
                   help="guidance of the steps above --high-sigma (none: the prior alone, one forward pass per step)")
    p.add_argument("--high-sigma", type=positive_float, metavar="SIGMA", help="noise level above which --high-guidance runs")
    p.add_argument("--cg-iters", type=positive_int, metavar="N",
                   help="conjugate-gradient iterations of each step's data-consistency solve (dc, pigdm)")
    p.add_argument("--antithetic", action=argparse.BooleanOptionalAction,
                   help="posterior chains in antithetic pairs: the second of each pair draws the first's noise negated")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="the denoiser's arithmetic (a profile's bfloat16 runs in float32 on a device without bfloat16 "
                        "in hardware; this option asks for it anyway)")
    p.add_argument("--flag-threshold", type=positive_float, metavar="NATS", help=flag_help)


def add_analysis_options(p: argparse.ArgumentParser) -> None:
    """Everything `settings_from_args` reads, and the prior."""
    p.add_argument("--prior", default=DEFAULT_PRIOR, help=f"shipped prior name or prior folder (default {DEFAULT_PRIOR})")
    add_measurement_options(p)
    add_sampler_options(p, flag_help="flag slices whose score exceeds this (default: the prior's calibration for these settings)")


def add_escalation_options(p: argparse.ArgumentParser) -> None:
    """Two-stage screening (`escalation_from_args`)."""
    p.add_argument("--escalate", type=sample_count, metavar="SAMPLES",
                   help="two stages: the slices whose KL z-score passes the escalation threshold get more posterior "
                        "chains, SAMPLES in all, and their verdict; the others are not flagged (e.g. --profile "
                        "screening --escalate 4). The prior must be calibrated for both sample counts")
    p.add_argument("--escalate-rate", type=float, metavar="RATE",
                   help="with --escalate: the fraction of the prior's healthy calibration slices whose stage-1 KL "
                        f"z-score passes the escalation threshold (default {DEFAULT_RATE})")


def escalation_from_args(args: argparse.Namespace) -> Escalation | None:
    if args.escalate is None:
        if args.escalate_rate is not None:
            raise KlviewerInputError(None, "--escalate-rate goes with --escalate")
        return None
    return Escalation(args.escalate, DEFAULT_RATE if args.escalate_rate is None else args.escalate_rate)


def add_slices_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slices", default="all", help=SLICES_HELP)


def add_quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def settings_from_args(args: argparse.Namespace) -> AnalysisSettings:
    """The analysis settings of the parsed options: the profile, changed by each sampler option given;
    options a command lacks keep the profile's values. A profile's bfloat16 denoiser runs in float32 on a
    device without bfloat16 in hardware, unless --precision asks for it."""
    base = PROFILES[getattr(args, "profile", DEFAULT_PROFILE)]
    given = {k: getattr(args, k) for k in SAMPLER_OPTIONS if getattr(args, k, None) is not None}
    if "sigma_window" in given:
        given["sigma_window"] = tuple(given["sigma_window"])
    settings = replace(base, **given, views=args.views, dose_i0=args.dose, noise_sigma=args.noise, seed=args.seed,
                       device=args.device, flag_threshold=getattr(args, "flag_threshold", None))
    settings.sampler(0).validate()  # refused here, before any file is read or prior loaded
    if "precision" in given:
        return settings
    settings, notice = precision_for_device(settings)
    if notice:
        print(f"klviewer: {notice}", file=sys.stderr)
    return settings
