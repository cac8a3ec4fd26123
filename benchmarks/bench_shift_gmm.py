"""Measurement-domain KL on Gaussian mixtures (issue 6, item 3), like the paper's GMM figure.

10-D mixtures, 3 in-distribution and 3 shifted components (isotropic, std 0.3), every score
analytic. The exact KL is the image-domain formula by Monte Carlo over 20000 samples with the
analytic denoisers (checked against the direct E_p[log p - log q]). The measurement-domain
estimate uses N inpainted samples (keep probability p, a fresh mask per sample) with:

- derived / marginal: the exact denoisers of the observed coordinates' marginals, weight 1/p on
  observed coordinates (the estimator docs/shift_kl.md derives);
- derived / zero-filled: each prior's own denoiser at the zero-filled measurement (what a network
  prior allows), same weight;
- paper: zero-filled, the paper's printed W = E[P]^(-3/2) on all coordinates (weight p^-3);
- unweighted: zero-filled, no weight, all coordinates (what the paper's released code records).

Every (p, N) cell is repeated over R independent draws of samples, masks and noise; the table
gives mean +- standard deviation of the end value, the plot one draw (the first) per panel.

    .venv/bin/python benchmarks/bench_shift_gmm.py            # writes benchmarks/results/shift_gmm.*
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from klviewer.inference import shift_kl as sk
from klviewer.io.safe_write import atomic_write, atomic_write_text
from klviewer.priors.gaussian import GaussianMixturePrior

KEEP = (0.9, 0.7)
SIZES = (20, 100, 1000)
ESTIMATORS = ("derived / marginal", "derived / zero-filled", "paper / zero-filled", "unweighted / zero-filled")


def gmm_pair(seed: int = 0) -> tuple[GaussianMixturePrior, GaussianMixturePrior]:
    g = torch.Generator().manual_seed(seed)
    d = 10
    means_p = torch.randn(3, d, generator=g, dtype=torch.float64)
    means_q = means_p + torch.randn(3, d, generator=g, dtype=torch.float64)
    cov = (0.09 * torch.eye(d, dtype=torch.float64)).expand(3, d, d).clone()
    return (GaussianMixturePrior(torch.ones(3), means_p, cov, (1, 1, d), name="ind"),
            GaussianMixturePrior(torch.ones(3), means_q, cov.clone(), (1, 1, d), name="ood"))


def estimates(p, q, clean: torch.Tensor, keep: float, seed: int, grid: np.ndarray) -> dict[str, sk.ShiftCurve]:
    measured = sk.simulate_masked(clean, sk.inpainting_family((1, 10), keep), seed=seed)
    n = len(measured)
    zero = sk.measurement_kl_operator_curves(p, q, measured, sigmas=grid, batch=n, seed=seed, denoiser="zero-filled")
    marginal = sk.measurement_kl_operator(p, q, measured, sigmas=grid, batch=n, seed=seed, denoiser="marginal")
    return {"derived / marginal": marginal, "derived / zero-filled": zero["derived"],
            "paper / zero-filled": zero["paper"], "unweighted / zero-filled": zero["unweighted"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results", help="folder for shift_gmm.{md,json,png}")
    ap.add_argument("--repeats", type=int, default=20, help="independent draws per (p, N) cell (default 20)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    grid = sk.default_sigma_grid(1e-3, 80.0, 40)
    p, q = gmm_pair()

    reference = p.sample(20000, torch.Generator().manual_seed(1), dtype=torch.float64)
    direct = float((p.log_prob(reference) - q.log_prob(reference)).mean())
    direct_se = float((p.log_prob(reference) - q.log_prob(reference)).std() / np.sqrt(len(reference)))
    exact = sk.image_kl(p, q, reference, sigmas=grid, batch=20000, seed=1)

    results: dict[str, dict[str, list[float]]] = {}
    first: dict[str, dict[str, sk.ShiftCurve]] = {}
    for keep in KEEP:
        for n in SIZES:
            cell = f"p={keep}, N={n}"
            results[cell] = {e: [] for e in ESTIMATORS}
            for r in range(args.repeats):
                seed = 1000 * r + n + int(100 * keep)
                clean = p.sample(n, torch.Generator().manual_seed(seed), dtype=torch.float64)
                curves = estimates(p, q, clean, keep, seed, grid)
                for e in ESTIMATORS:
                    results[cell][e].append(curves[e].total)
                if r == 0:
                    first[cell] = curves
            print(cell, {e: round(float(np.mean(v)), 2) for e, v in results[cell].items()}, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_shift_gmm.py" + (
        f" --repeats {args.repeats}" if args.repeats != 20 else "")
    seconds = time.perf_counter() - start
    atomic_write_text(out / "shift_gmm.md", markdown(results, exact.total, direct, direct_se, args.repeats, command,
                                                     seconds), overwrite=True)
    figure(first, exact, out / "shift_gmm.png")
    doc = {
        "command": command, "seconds": seconds, "python": platform.python_version(), "torch": torch.__version__,
        "setting": {"dimension": 10, "components": 3, "component_std": 0.3, "means_p": "N(0, I)",
                    "means_q": "means_p + N(0, I)", "seed": 0, "sigma_grid": [float(grid[0]), float(grid[-1]), len(grid)]},
        "exact": {"image_domain_mc_20000": exact.total, "direct_log_ratio": direct, "direct_se": direct_se,
                  "curve": exact.to_dict()},
        "repeats": args.repeats,
        "cells": {cell: {e: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)), "values": v}
                         for e, v in est.items()} for cell, est in results.items()},
        "first_draw_curves": {cell: {e: c.to_dict() for e, c in curves.items()} for cell, curves in first.items()},
    }
    atomic_write_text(out / "shift_gmm.json", json.dumps(doc, indent=1) + "\n", overwrite=True)
    print((out / "shift_gmm.md").read_text())
    return 0


def markdown(results, exact: float, direct: float, direct_se: float, repeats: int, command: str, seconds: float) -> str:
    lines = [
        "# Measurement-domain KL on Gaussian mixtures",
        "",
        f"Command: `{command}` ({seconds:.0f} s on one CPU thread; torch {torch.__version__}, Python {sys.version.split()[0]}).",
        "",
        "10-D mixtures, 3 in-distribution components with means N(0, I) and 3 shifted ones (means + N(0, I)), all",
        "isotropic with std 0.3, equal weights. Inpainting with keep probability p, a fresh mask per sample; N",
        "measured samples. Sigma grid: 40 log-spaced levels from 0.001 to 80, log-trapezoid quadrature.",
        "",
        f"Exact KL(p || q): **{exact:.2f} nats** (image-domain formula, 20000 samples, analytic denoisers); "
        f"direct Monte Carlo E_p[log p - log q] = {direct:.2f} +- {direct_se:.2f}.",
        "",
        f"End values in nats, mean +- sd over {repeats} independent draws (samples, masks, noise); "
        "in brackets the mean's relative error against the exact KL.",
        "",
        "| p | N | derived, marginal scores | derived, zero-filled | paper W = E[P]^-3/2, zero-filled | unweighted, zero-filled |",
        "|---|---|---|---|---|---|",
    ]
    for cell, est in results.items():
        keep, n = cell.replace("p=", "").replace("N=", "").split(", ")
        row = [keep, n]
        for e in ESTIMATORS:
            v = np.asarray(est[e])
            row.append(f"{v.mean():.2f} +- {v.std(ddof=1):.2f} ({100 * (v.mean() / exact - 1):+.0f}%)")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Reading:",
        "",
        "- With the derived weight (1/p on observed coordinates) the estimate is within 3-4% of the exact KL at",
        "  p = 0.9 for every N (the spread shrinks like 1/sqrt(N)); at p = 0.7 it is 5% low with zero-filled",
        "  denoisers and 11% low with exact marginal scores.",
        "- Exact marginal scores are low because a mixture is not a product distribution: the marginals of a",
        "  random 70% of the coordinates carry less than 70% of the KL (docs/shift_kl.md). For product",
        "  distributions the derived estimator is unbiased (tests/test_shift_kl.py checks it on Gaussians).",
        "- The paper's printed weight W = E[P]^(-3/2) (p^-3 on the squared difference) overshoots by 38% at",
        "  p = 0.9 and by a factor 3 at p = 0.7: about p^-2 too much on the observed part, plus the unobserved",
        "  coordinates it also counts.",
        "- Unweighted (all coordinates, no weight) happens to land near the exact value on this mixture, but",
        "  not in general: on independent Gaussian coordinates at p = 0.5 it gives about two thirds of the KL.",
        "",
        "![curves](shift_gmm.png)",
    ]
    return "\n".join(lines) + "\n"


def figure(first: dict[str, dict[str, sk.ShiftCurve]], exact: sk.ShiftCurve, path: Path) -> None:
    fig = Figure(figsize=(12, 6.5), dpi=110)
    axes = fig.subplots(len(KEEP), len(SIZES), sharex=True, sharey="row")
    styles = {"derived / marginal": ("tab:red", "-"), "derived / zero-filled": ("tab:orange", "--"),
              "paper / zero-filled": ("tab:purple", ":"), "unweighted / zero-filled": ("0.5", "-.")}
    for i, keep in enumerate(KEEP):
        for j, n in enumerate(SIZES):
            ax = axes[i, j]
            ax.plot(exact.sigmas, exact.cumulative, color="tab:blue", lw=2.2, label=f"exact, image domain ({exact.total:.1f})")
            for e, curve in first[f"p={keep}, N={n}"].items():
                colour, ls = styles[e]
                ax.plot(curve.sigmas, curve.cumulative, color=colour, ls=ls, label=f"{e} ({curve.total:.1f})")
            ax.set_xlim(0, 2.0)
            top = max(float(c.total) for cell, curves in first.items() if cell.startswith(f"p={keep},")
                      for c in curves.values())
            ax.set_ylim(0, 1.08 * max(top, exact.total))
            ax.set_title(f"p = {keep}, N = {n}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5, loc="lower right" if i == 0 else "center right")
            if i == len(KEEP) - 1:
                ax.set_xlabel("sigma")
            if j == 0:
                ax.set_ylabel("cumulative KL (nats)")
    fig.suptitle("10-D GMM, 3 InD vs 3 OOD components: cumulative KL up to sigma (curves continue flat to 80)")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), overwrite=True)


if __name__ == "__main__":
    sys.exit(main())
