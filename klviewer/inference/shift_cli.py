"""``klviewer shift``: how far measured studies have drifted from candidate priors.

With ``--ref`` the candidates are ranked by the measurement-domain KL(reference || candidate);
without it, by their measurement-domain denoising fit (see prior_selection). Prints a table and,
on request, writes a JSON report and a PNG of the cumulative curves.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from klviewer import __version__
from klviewer.cli_options import positive_float, positive_int
from klviewer.errors import KlviewerInputError
from klviewer.inference.analysis import AnalysisSettings
from klviewer.inference.prior_selection import PriorRank, rank_priors
from klviewer.inference.shift_kl import CT_WEIGHTINGS, DEFAULT_CG_ITERS, default_sigma_grid
from klviewer.io.safe_write import OutputExistsError, atomic_write, atomic_write_text

DEFAULT_SIGMA_RANGE = (0.002, 80.0)
DEFAULT_SIGMA_POINTS = 40


@dataclass
class ShiftRun:
    ranks: list[PriorRank]
    report: dict[str, Any]


def run_shift(
    inputs: Sequence[str | Path],
    candidates: Sequence[str | Path],
    *,
    reference: str | Path | None = None,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    settings: AnalysisSettings | None = None,
    slices: str = "all",
    sigmas: np.ndarray | None = None,
    weighting: str = "derived",
    cg_iters: int = DEFAULT_CG_ITERS,
    batch: int = 4,
    overwrite: bool = False,
    command: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ShiftRun:
    """Measure ``inputs`` (CT images are simulated with the settings' views and noise, sinograms
    are used as given), rank ``candidates``, and write the JSON (``out``) and PNG (``plot``)."""
    from klviewer.devices import resolve_device
    from klviewer.inference.measurements import collect_measurements
    from klviewer.inference.runner import check_output_folder, prior_fingerprint
    from klviewer.priors.checkpoint import load_prior, read_prior_config, resolve_prior_path

    settings = settings or AnalysisSettings()
    for target in (out, plot):
        if target is not None:
            check_output_folder(Path(target), inputs)
            if Path(target).exists() and not overwrite:
                raise OutputExistsError(Path(target))
    if not candidates:
        raise KlviewerInputError(None, "give at least one candidate prior (--prior)")
    grid = default_sigma_grid(*DEFAULT_SIGMA_RANGE, DEFAULT_SIGMA_POINTS) if sigmas is None else sigmas
    device = resolve_device(settings.device)
    grid_prior_path = resolve_prior_path(reference if reference is not None else candidates[0])
    measurements = collect_measurements(inputs, load_prior(grid_prior_path, device=device), settings,
                                        slices=slices, device=device)
    ranks = rank_priors(candidates, measurements, reference=reference, sigmas=grid, seed=settings.seed, batch=batch,
                        weighting=weighting, cg_iters=cg_iters, device=device, progress=progress)
    report = {
        "klviewer_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "criterion": ranks[0].criterion,
        "reference": None if reference is None else {
            "name": read_prior_config(grid_prior_path).name, "path": str(grid_prior_path),
            "sha256": prior_fingerprint(grid_prior_path)},
        "settings": {
            "views": settings.views, "dose_i0": settings.dose_i0, "noise_sigma": settings.noise_sigma,
            "seed": settings.seed, "slices": slices, "device": str(device), "weighting": weighting,
            "cg_iters": cg_iters, "sigma_min": float(grid[0]), "sigma_max": float(grid[-1]), "sigma_points": len(grid),
        },
        "measurements": [{"case": m.case, "input": m.source, "slice_index": m.index, "notes": m.prepared.notes}
                         for m in measurements.slices],
        "skipped": measurements.skipped,
        "ranks": [{**r.to_dict(), "sha256": prior_fingerprint(Path(r.path))} for r in ranks],
    }
    if out is not None:
        atomic_write_text(Path(out), json.dumps(report, indent=2) + "\n", overwrite=overwrite)
    if plot is not None:
        shift_figure(ranks, Path(plot), overwrite=overwrite)
    return ShiftRun(ranks, report)


def shift_figure(ranks: Sequence[PriorRank], path: Path, overwrite: bool = False) -> Path:
    """Cumulative curves against sigma: the KL, or for the fit its excess over the best candidate."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and no pyplot state

    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    ax = fig.subplots()
    fit = ranks[0].criterion == "denoising-fit"
    best = ranks[0].curve
    for r in ranks:
        if r.curve is None:
            continue
        values = r.curve.cumulative - best.cumulative if fit and best is not None else r.curve.cumulative
        ax.plot(r.curve.sigmas, values, label=f"{r.name} ({r.delta if fit else r.score:.3g})")
    ax.set_xscale("log")
    ax.set_xlabel("noise level sigma (prior units)")
    if fit:
        ax.set_ylabel("denoising fit minus best (nats)")
        ax.set_title("Measurement-domain fit (no reference)")
    else:
        ax.set_ylabel("cumulative KL (nats)")
        ax.set_title("Measurement-domain KL(reference || prior)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"), overwrite=overwrite)


def format_table(ranks: Sequence[PriorRank]) -> str:
    """One row per candidate, best first: the ranking value, then the other estimates beside it."""
    fit = ranks[0].criterion == "denoising-fit"
    head = "fit - best" if fit else "KL nats"
    others = [w for w in CT_WEIGHTINGS if w not in ("derived", "paper")]
    width = max(12, *(len(r.name) for r in ranks))
    lines = [f"{'rank':<5}{'prior':<{width + 2}}{head:>12}" + "".join(f"{w:>12}" for w in others) + "  path"]
    for i, r in enumerate(ranks, 1):
        value = r.delta if fit else r.score
        extra = [r.totals.get(w, float("nan")) - (ranks[0].totals.get(w, 0.0) if fit else 0.0) for w in others]
        lines.append(f"{i:<5}{r.name:<{width + 2}}{value:>12.4g}" + "".join(f"{v:>12.4g}" for v in extra) + f"  {r.path}")
    return "\n".join(lines)


def _cmd_shift(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    lo, hi = args.sigma_range
    if not lo < hi:
        raise KlviewerInputError(None, f"--sigma-range must be increasing, got {lo} {hi}")
    settings = AnalysisSettings(views=args.views, dose_i0=args.dose, noise_sigma=args.noise, seed=args.seed,
                                device=args.device)
    with tqdm(total=0, unit="step", file=sys.stderr, disable=args.quiet, dynamic_ncols=True) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        run = run_shift(args.inputs, args.prior, reference=args.ref, out=args.out, plot=args.plot, settings=settings,
                        slices=args.slices, sigmas=default_sigma_grid(lo, hi, args.sigma_points),
                        weighting=args.weighting, cg_iters=args.cg_iters, batch=args.batch, overwrite=args.overwrite,
                        command=shlex.join(["klviewer", *sys.argv[1:]]), progress=progress)
    n = len(run.report["measurements"])
    if args.ref is not None:
        print(f"measurement-domain KL(reference || prior) from {n} slice(s), weighting {args.weighting}; "
              f"reference {run.report['reference']['name']}")
    else:
        print(f"no reference: ranked by measurement-domain denoising fit on {n} slice(s) "
              f"(fit - best estimates the KL difference to the best prior)")
    print(format_table(run.ranks))
    for s in run.report["skipped"]:
        print(f"skipped {s['path']}: {s['reason']}")
    for target, what in ((args.out, "report"), (args.plot, "plot")):
        if target is not None:
            print(f"{what} written to {target}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``shift`` subcommand to the klviewer parser."""
    d = AnalysisSettings()
    p = subparsers.add_parser(
        "shift", help="rank priors by measurement-domain KL against a reference prior (or by denoising fit)",
        description="Measurement-domain distribution shift between diffusion priors, from sparse-view CT "
                    "measurements only. With --ref: KL(reference || prior) per candidate; without: each "
                    "candidate's denoising fit on the measured data. Lowest first.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM file/folder, .npy/.npz HU image, or sinogram sidecar")
    p.add_argument("--prior", action="append", required=True, metavar="PRIOR",
                   help="candidate prior (shipped name or folder); repeat for each candidate")
    p.add_argument("--ref", metavar="PRIOR", help="reference prior trained on data like the inputs (default: none, rank by fit)")
    p.add_argument("--out", metavar="FILE.json", help="write the report (ranks, curves, settings) here")
    p.add_argument("--plot", metavar="FILE.png", help="write the cumulative curves here")
    p.add_argument("--slices", default="all", metavar="SPEC", help="'all', 'mid', or 0-based indices like 0,3,5-7 (default all)")
    p.add_argument("--views", type=positive_int, default=d.views, metavar="N", help=f"projection views for image inputs (default {d.views})")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--dose", type=positive_float, metavar="I0", help="Poisson noise: unattenuated photons per ray")
    noise.add_argument("--noise", type=positive_float, metavar="SIGMA", help="Gaussian noise std on line integrals")
    p.add_argument("--seed", type=int, default=d.seed, metavar="S", help="seed of the simulated measurements and the estimator's noise")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--weighting", default="derived", choices=CT_WEIGHTINGS,
                   help="which estimate ranks the priors (default derived: the row-space part, which the paper's "
                        "weight equals for fixed views; all are reported)")
    p.add_argument("--sigma-range", type=positive_float, nargs=2, metavar=("LO", "HI"), default=list(DEFAULT_SIGMA_RANGE),
                   help=f"noise levels integrated over (default {DEFAULT_SIGMA_RANGE[0]} {DEFAULT_SIGMA_RANGE[1]})")
    p.add_argument("--sigma-points", type=positive_int, default=DEFAULT_SIGMA_POINTS, metavar="N",
                   help=f"log-spaced noise levels (default {DEFAULT_SIGMA_POINTS})")
    p.add_argument("--cg-iters", type=positive_int, default=DEFAULT_CG_ITERS, metavar="N",
                   help=f"conjugate-gradient iterations of the row-space projections (default {DEFAULT_CG_ITERS})")
    p.add_argument("--batch", type=positive_int, default=4, metavar="N", help="slices per denoiser call (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --plot file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_shift)
