"""Does the KL z-score gain from looking at each posterior chain apart? (issue 20)

    python benchmarks/bench_chain_statistics.py --splits 1 0 5 6 --cache DIR --out TABLE.md [--options "--profile screening"]

A lesion raises the KL of its patches in every chain; a healthy patch that one chain happens to
correct hard is an outlier in that chain only. The product scores a patch by the log of its KL
averaged over the chains. This benchmark samples every slice's chains one at a time (each with the
random stream it has in the product, so their mean is the product's run up to rounding) and scores
other statistics of the same chains: the mean of the chains' log KL, the smallest and the largest
chain's KL, and each chain alone. Every statistic gets its own healthy reference, fitted as `calibrate`
fits one on the 40 calibration-range phantoms (seed 0), and the KL z-score of the product (edge-energy
bins, pooled windows, a slice's largest window) on the splits of `klviewer evaluate detect --n-id N
--n-ood N --seed S`. The per-chain patch KL is kept in --cache, so a rerun only scores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_screening import settings_of  # noqa: E402
from bench_two_stage import split_phantoms  # noqa: E402

from klviewer.evaluation.detection import CALIBRATION_SEED_BASE, DetectionCase, localisation_auroc, series_from_phantom  # noqa: E402
from klviewer.evaluation.metrics import auroc  # noqa: E402
from klviewer.inference.energy import patch_sums  # noqa: E402
from klviewer.inference.healthy_reference import KL_FLOOR, patch_statistics, reference_of_patches  # noqa: E402
from klviewer.inference.measurements import ct_measurement_model, prepare_slice  # noqa: E402
from klviewer.inference.sampler import merge_runs, posterior_sample_slices  # noqa: E402
from klviewer.phantoms import make_phantom  # noqa: E402
from klviewer.priors.checkpoint import DEFAULT_PRIOR, load_prior, resolve_prior_path  # noqa: E402

STATISTICS = {
    "log of the chains' mean KL (the product)": lambda kl: np.log(kl.mean(axis=0) + KL_FLOOR),
    "mean of the chains' log KL": lambda kl: np.log(kl + KL_FLOOR).mean(axis=0),
    "log of the smallest chain's KL": lambda kl: np.log(kl.min(axis=0) + KL_FLOOR),
    "log of the largest chain's KL": lambda kl: np.log(kl.max(axis=0) + KL_FLOOR),
    "chain 0 alone": lambda kl: np.log(kl[0] + KL_FLOOR),
    "chain 1 alone": lambda kl: np.log(kl[1] + KL_FLOOR),
}
"""Per-patch log KL from the chains' patch KL (chains, rows, cols)."""


def sample_chains(prior, settings, phantoms: list, cache: Path) -> dict[str, np.ndarray]:
    """Per-chain patch KL, log edge energy and body patches of each phantom, from `cache` when there.
    Two slices share each forward pass, as in a series."""
    if cache.is_file():
        with np.load(cache) as f:
            return {k: f[k] for k in f.files}
    rows: dict[str, list[np.ndarray]] = {"kl": [], "edges": [], "inside": []}
    for first in range(0, len(phantoms), 2):
        group = phantoms[first:first + 2]
        prepared = [prepare_slice(series_from_phantom(p), 0, prior, settings, torch.device("cpu")) for p in group]
        models = [ct_measurement_model(p.acquisition, prior) for p in prepared]
        seeds = [p.slice_seed for p in prepared]
        chains = [posterior_sample_slices(prior, models, replace(settings.sampler(seeds[0]), samples=1, first_sample=k), seeds)
                  for k in range(settings.samples)]
        for j in range(len(group)):
            runs = [c[j] for c in chains]
            merged = runs[0]
            for run in runs[1:]:
                merged = merge_runs(merged, run)
            recon_hu = np.asarray(prior.x_to_hu(merged.mean), np.float32)
            _kl, edges, inside = patch_statistics(merged.energy, recon_hu, settings.patch, settings.sigma_window)
            rows["kl"].append(np.stack([r.energy.kl_map(settings.patch, settings.sigma_window).values for r in runs]))
            rows["edges"].append(edges)
            rows["inside"].append(inside)
        print(f"  {cache.stem}: {min(first + 2, len(phantoms))}/{len(phantoms)}", flush=True)
    arrays = {k: np.stack(v) for k, v in rows.items()}
    np.savez_compressed(cache, **arrays)
    return arrays


def z_scores(reference, statistic, arrays: dict[str, np.ndarray], phantoms: list, settings) -> tuple[np.ndarray, list[float]]:
    """One statistic's slice KL z-scores on one split, and each lesion slice's localisation AUROC."""
    template = patch_statistics_template(settings, phantoms[0].hu.shape)
    z, loc = [], []
    for i, phantom in enumerate(phantoms):
        z_map = reference.z_of(template, statistic(arrays["kl"][i]), arrays["edges"][i], arrays["inside"][i])
        z.append(z_map.score)
        if phantom.kind != "healthy":
            loc.append(localisation_auroc(z_map, DetectionCase(phantom.kind, phantom.seed, phantom.body_mask,
                                                               phantom.ood_mask, phantom.hu, None)))
    return np.array(z), loc


def labels_of(phantoms: list) -> np.ndarray:
    return np.array([p.kind != "healthy" for p in phantoms])


def patch_statistics_template(settings, size: tuple[int, int]):
    """The patch grid (a KLMap of zeros) that the per-chain values sit on."""
    return patch_sums(np.zeros(size), settings.patch, sigma_window=tuple(settings.sigma_window))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", type=int, nargs="+", default=[1, 0, 5, 6])
    p.add_argument("--n", type=int, default=20, help="healthy and lesion phantoms per split (default 20 + 20)")
    p.add_argument("--reference", type=int, default=40, help="calibration-range healthy phantoms (default 40)")
    p.add_argument("--options", default="--profile screening", help="`klviewer analyze` sampler options")
    p.add_argument("--prior", default=DEFAULT_PRIOR, help=f"shipped prior name or prior folder (default {DEFAULT_PRIOR})")
    p.add_argument("--cache", type=Path, required=True, help="folder for the per-chain patch KL")
    p.add_argument("--out", type=Path, required=True, help="markdown table (a .json beside it)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    settings = settings_of(args.options)
    if settings.samples < 2:
        p.error("needs at least 2 posterior samples")
    prior = load_prior(resolve_prior_path(args.prior), device="cpu")
    size = prior.config.image_size[0]
    args.cache.mkdir(parents=True, exist_ok=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").is_file() else "n/a"
    reference_phantoms = [make_phantom("healthy", size, CALIBRATION_SEED_BASE + i) for i in range(args.reference)]
    reference_arrays = sample_chains(prior, replace(settings, seed=0), reference_phantoms, args.cache / "reference.npz")
    splits = {s: split_phantoms(s, args.n, size) for s in args.splits}
    arrays = {s: sample_chains(prior, settings, phantoms, args.cache / f"split{s}.npz") for s, phantoms in splits.items()}
    results = {}
    for name, statistic in STATISTICS.items():
        inside = reference_arrays["inside"]
        y = np.concatenate([statistic(kl)[m] for kl, m in zip(reference_arrays["kl"], inside)])
        x = np.concatenate([e[m] for e, m in zip(reference_arrays["edges"], inside)])
        reference = reference_of_patches(y, x, settings.patch, tuple(settings.sigma_window), args.reference)
        per_split = {s: z_scores(reference, statistic, arrays[s], splits[s], settings) for s in args.splits}
        results[name] = {s: (auroc(z, labels_of(splits[s])), float(np.nanmean(loc))) for s, (z, loc) in per_split.items()}
        # every split's slices together (each split's healthy against every split's lesions)
        results[name]["pooled"] = (auroc(np.concatenate([z for z, _ in per_split.values()]),
                                         np.concatenate([labels_of(splits[s]) for s in args.splits])),
                                   float(np.nanmean([v for _, loc in per_split.values() for v in loc])))
    command = "python benchmarks/bench_chain_statistics.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [f"# KL z-score from each chain apart: {settings.describe_sampling()}", "", f"`{command}`", "",
             f"Load average at the start: {load}. Dataset / localisation AUROC of the KL z-score per split "
             f"(`--seed S`, {args.n} healthy + {args.n} lesion phantoms), each statistic with its own reference on "
             f"{args.reference} calibration-range phantoms.", "",
             "| statistic of the chains' patch KL | " + " | ".join(f"`--seed {s}`" for s in args.splits) + " | pooled |",
             "|---|" + "---|" * (len(args.splits) + 1)]
    for name, per_split in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f} / {l:.3f}" for a, l in per_split.values()) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "load": load, "settings": settings.to_dict(),
         "results": {n: {str(s): {"dataset_auroc": a, "localisation_auroc": l} for s, (a, l) in r.items()}
                     for n, r in results.items()}}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
