"""How much a KL map depends on the posterior noise draws: one slice, several seeds.

Usage: python benchmarks/bench_kl_repeatability.py [--prior NAME|PATH] [--samples 1 8] [--seeds 3] [--guidance dc]
        [--device cpu] [--threads 2] [--results FILE.md]

For each sample count, the same lesion phantom is analysed with `--seeds` sampler seeds (same
measurement, different posterior draws). Reported: mean pairwise correlation of the windowed
energy maps and of the patch-8 KL maps, the spread of the image score, and the rank of the
highest-scoring lesion patch among the body's patches.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from klviewer.evaluation.detection import EVAL_SEED_BASE, series_from_phantom, touching
from klviewer.inference.measurements import prepare_slice
from klviewer.inference.pipeline import analyze_prepared
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.safe_write import atomic_write_text
from klviewer.phantoms import make_phantom
from klviewer.priors import load_prior

RESULTS = Path(__file__).parent / "results" / "kl_repeatability.md"


def lesion_rank(kl: np.ndarray, ood: np.ndarray, body: np.ndarray, patch: int) -> int:
    """1-based rank of the best lesion-touching patch among the patches touching the body."""
    inside, lesion = touching(body, patch), touching(ood, patch)
    best = kl[lesion & inside].max()
    return int((kl[inside] > best).sum()) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default="abdomen-phantom-256")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--guidance", default="dc")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prior = load_prior(args.prior, device=device)
    phantom = make_phantom("lesion", prior.config.image_size[0], EVAL_SEED_BASE + 5_000)
    series = series_from_phantom(phantom)
    rows = []
    for samples in args.samples:
        maps, klmaps, scores, ranks, seconds = [], [], [], [], []
        for seed in range(args.seeds):
            settings = AnalysisSettings(samples=samples, guidance=args.guidance, seed=seed, device=args.device)
            prepared = prepare_slice(series, 0, prior, settings, device)
            start = time.perf_counter()
            r = analyze_prepared(prepared, prior, settings, prior_name=args.prior, flag_threshold=None)
            seconds.append(time.perf_counter() - start)
            maps.append(r.energy.windowed(settings.sigma_window).ravel())
            klmaps.append(r.kl_map.values.ravel())
            scores.append(r.score)
            ranks.append(lesion_rank(r.kl_map.values, phantom.ood_mask, phantom.body_mask, settings.patch))
            print(f"samples {samples} seed {seed}: score {r.score:.1f}, lesion rank {ranks[-1]}, {seconds[-1]:.1f} s", file=sys.stderr)
        pairs = list(itertools.combinations(range(args.seeds), 2))
        rows.append({
            "samples": samples,
            "energy_corr": float(np.mean([np.corrcoef(maps[i], maps[j])[0, 1] for i, j in pairs])),
            "kl_corr": float(np.mean([np.corrcoef(klmaps[i], klmaps[j])[0, 1] for i, j in pairs])),
            "score_mean": float(np.mean(scores)), "score_cv": float(np.std(scores) / np.mean(scores)),
            "ranks": ranks, "seconds": float(np.mean(seconds)),
        })
    lines = [
        "# KL maps across posterior noise draws",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/bench_kl_repeatability.py', *sys.argv[1:]])}`",
        "",
        f"Lesion phantom seed {phantom.seed} (the detection benchmark's first lesion slice), 256², 24 views, noise-free, "
        f"100 steps, guidance `{args.guidance}`, patch 8, σ 0.01–0.5, prior `{args.prior}`; {args.seeds} sampler seeds per row; "
        f"{args.device} ({platform.machine()}), {args.threads} threads.",
        "",
        "| samples | energy map correlation (mean over seed pairs) | patch-8 KL map correlation | image score mean (nats) | score CV | rank of the best lesion patch per seed | seconds per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['samples']} | {r['energy_corr']:.3f} | {r['kl_corr']:.3f} | {r['score_mean']:.1f} | "
                     f"{r['score_cv']:.1%} | {', '.join(map(str, r['ranks']))} | {r['seconds']:.1f} |")
    atomic_write_text(args.results, "\n".join(lines) + "\n", overwrite=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
