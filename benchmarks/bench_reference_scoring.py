"""How a patch's KL is standardised: by its bin's healthy quantiles (now) or by its bin's mean and spread (before).

    klviewer evaluate detect --n-id 20 --n-ood 20 --seed S --cache CACHE OPTIONS     # each split, one cache
    python benchmarks/bench_reference_scoring.py CACHE --splits 1 0 5 6 --out TABLE.md

The cache holds each split's slices and the 40 calibration-range healthy slices that `evaluate detect`
fits its reference on (`--reference 40`). Both references are fitted on those 40 and score the same
cached runs (no new sampling); the quantile reference is `fit_reference`'s, the mean-and-spread one is
the same reference without its quantiles, as references written before them are scored. Dataset /
localisation AUROC of the KL z-score per split, and pooled over every split's slices.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from klviewer.evaluation.detection import (
    healthy_slices,
    load_cached_cases,
    score_z,
    split_of,
)
from klviewer.evaluation.metrics import auroc
from klviewer.inference.healthy_reference import fit_reference
from klviewer.io.safe_write import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", type=Path, help="an `evaluate detect --cache` folder holding the splits and the reference")
    p.add_argument("--splits", type=int, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True, help="markdown table (a .json beside it)")
    args = p.parse_args(argv)
    cases = load_cached_cases(args.cache)
    reference_cases = [c for c in cases if split_of(c.seed) is None]
    splits = {s: [c for c in cases if split_of(c.seed) == s] for s in args.splits}
    if not reference_cases or not all(splits.values()):
        p.error(f"{args.cache} lacks the reference slices or a split's slices")
    settings = reference_cases[0].result.settings
    quantiles = fit_reference(healthy_slices(reference_cases), settings.patch, settings.sigma_window)
    references = {"bin quantiles (now)": quantiles,
                  "bin mean and spread (before)": replace(quantiles, quantiles=None, normal_scores=None)}
    results = {}
    for name, reference in references.items():
        scored = {s: score_z(split, reference) for s, split in splits.items()}
        scores = np.concatenate([m.image_scores for m in scored.values()])
        labels = np.concatenate([m.labels for m in scored.values()])
        per_image = [v for m in scored.values() for v in m.per_image_localisation]
        results[name] = {**{str(s): (m.dataset_auroc, m.localisation_auroc) for s, m in scored.items()},
                         "pooled": (auroc(scores, labels), float(np.mean(per_image)))}
    lines = [f"# KL z-score: healthy reference by bin quantiles or by bin mean and spread ({settings.describe_sampling()})",
             "", f"`python benchmarks/bench_reference_scoring.py {args.cache} --splits {' '.join(map(str, args.splits))}`",
             "", f"Reference: {len(reference_cases)} calibration-range healthy slices. Dataset / localisation AUROC per split "
                 f"(`--seed S`) and pooled over all {sum(map(len, splits.values()))} slices.", "",
             "| reference | " + " | ".join(f"`--seed {s}`" for s in args.splits) + " | pooled |",
             "|---|" + "---|" * (len(args.splits) + 1)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f} / {l:.3f}" for a, l in row.values()) + " |")
    atomic_write_text(args.out, "\n".join(lines) + "\n", overwrite=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(
        {"cache": str(args.cache), "splits": args.splits, "settings": settings.to_dict(),
         "results": {n: {k: {"dataset_auroc": a, "localisation_auroc": l} for k, (a, l) in r.items()}
                     for n, r in results.items()}}, indent=1), overwrite=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
