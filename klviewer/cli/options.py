"""Command-line options shared by the subcommands: argument types, the measurement and analysis options."""

from __future__ import annotations

import argparse

from klviewer.inference.sampler import ANY_PRIOR_GUIDANCES
from klviewer.inference.settings import AnalysisSettings
from klviewer.priors.checkpoint import DEFAULT_PRIOR

DEVICES = ("auto", "cpu", "cuda")
DEFAULTS = AnalysisSettings()
INPUT_HELP = "DICOM file/folder, .npy/.npz HU image, or sinogram sidecar"
SLICES_HELP = "'all', 'mid', or 0-based indices like 0,3,5-7 (default all)"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
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
    """Sampler and KL-map settings, and the flag threshold in nats."""
    d = DEFAULTS
    p.add_argument("--steps", type=positive_int, default=d.steps, help=f"sampler steps (default {d.steps})")
    p.add_argument("--samples", type=positive_int, default=d.samples, help=f"posterior samples (default {d.samples})")
    p.add_argument("--patch", type=positive_int, default=d.patch, help=f"KL patch size in pixels (default {d.patch})")
    p.add_argument("--sigma-window", type=positive_float, nargs=2, metavar=("LO", "HI"), default=list(d.sigma_window),
                   help=f"noise levels summed into the KL map (default {d.sigma_window[0]} {d.sigma_window[1]})")
    p.add_argument("--guidance", default=d.guidance, choices=ANY_PRIOR_GUIDANCES, help=f"likelihood guidance (default {d.guidance})")
    p.add_argument("--flag-threshold", type=positive_float, metavar="NATS", help=flag_help)


def add_analysis_options(p: argparse.ArgumentParser) -> None:
    """Everything `settings_from_args` reads, and the prior."""
    p.add_argument("--prior", default=DEFAULT_PRIOR, help=f"shipped prior name or prior folder (default {DEFAULT_PRIOR})")
    add_measurement_options(p)
    add_sampler_options(p, flag_help="flag slices whose score exceeds this (default: the prior's calibration for these settings)")


def add_slices_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slices", default="all", help=SLICES_HELP)


def add_quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def settings_from_args(args: argparse.Namespace) -> AnalysisSettings:
    """The analysis settings of the parsed options; options a command lacks keep their defaults."""
    d = DEFAULTS
    window = getattr(args, "sigma_window", None)
    return AnalysisSettings(
        views=args.views, dose_i0=args.dose, noise_sigma=args.noise, seed=args.seed, device=args.device,
        steps=getattr(args, "steps", d.steps), samples=getattr(args, "samples", d.samples),
        patch=getattr(args, "patch", d.patch), sigma_window=d.sigma_window if window is None else tuple(window),
        guidance=getattr(args, "guidance", d.guidance), flag_threshold=getattr(args, "flag_threshold", None),
    )
