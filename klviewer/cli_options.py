"""Command-line options shared by every subcommand that runs the analysis."""

from __future__ import annotations

import argparse


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


def add_analysis_options(p: argparse.ArgumentParser) -> None:
    from klviewer.inference.analysis import AnalysisSettings
    from klviewer.inference.sampler import ANY_PRIOR_GUIDANCES
    from klviewer.priors.checkpoint import DEFAULT_PRIOR

    d = AnalysisSettings()
    p.add_argument("--prior", default=DEFAULT_PRIOR, help=f"shipped prior name or prior folder (default {DEFAULT_PRIOR})")
    p.add_argument("--views", type=positive_int, default=d.views, help=f"projection views for image inputs (default {d.views})")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--dose", type=positive_float, metavar="I0", help="Poisson noise: unattenuated photons per ray")
    noise.add_argument("--noise", type=positive_float, metavar="SIGMA", help="Gaussian noise std on line integrals")
    p.add_argument("--steps", type=positive_int, default=d.steps, help=f"sampler steps (default {d.steps})")
    p.add_argument("--samples", type=positive_int, default=d.samples, help=f"posterior samples (default {d.samples})")
    p.add_argument("--patch", type=positive_int, default=d.patch, help=f"KL patch size in pixels (default {d.patch})")
    p.add_argument("--sigma-window", type=positive_float, nargs=2, metavar=("LO", "HI"), default=list(d.sigma_window),
                   help=f"noise levels summed into the KL map (default {d.sigma_window[0]} {d.sigma_window[1]})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--guidance", default=d.guidance, choices=ANY_PRIOR_GUIDANCES, help=f"likelihood guidance (default {d.guidance})")
    p.add_argument("--flag-threshold", type=positive_float, metavar="NATS",
                   help="flag slices whose score exceeds this (default: the prior's calibration for these settings)")


def settings_from_args(args: argparse.Namespace):
    from klviewer.inference.analysis import AnalysisSettings

    return AnalysisSettings(
        views=args.views, dose_i0=args.dose, noise_sigma=args.noise, steps=args.steps, samples=args.samples,
        patch=args.patch, sigma_window=tuple(args.sigma_window), seed=args.seed, device=args.device,
        guidance=args.guidance, flag_threshold=args.flag_threshold,
    )
