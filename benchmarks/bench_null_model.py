"""Does a per-pixel healthy null model help KLIP? An offline test on cached detection runs.

Usage:
    klviewer evaluate detect --n-id 20 --n-ood 20 --seed S --cache CACHE_S ...   # each split
    klviewer calibrate -n 40 --cache NULL_CACHE --dry-run ...                   # healthy slices, same settings
    python benchmarks/bench_null_model.py --null NULL_CACHE CACHE_1 CACHE_0 [--out FILE.md]

The null model is the per-pixel mean (and spread) of the windowed energy over the healthy
calibration slices, which share no slice with the detection splits. Each KLIP map is then
compared with it in several ways before patch sums are taken; dataset and localisation AUROC
are computed as in the detection benchmark.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from klviewer.evaluation.detection import load_cached_cases, score_method
from klviewer.io.safe_write import atomic_write_text

PATCHES = (4, 8, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--null", type=Path, required=True, help="cache of healthy calibration slices")
    parser.add_argument("splits", type=Path, nargs="+", help="detection caches, one per split")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "null_model.md")
    args = parser.parse_args()
    null = load_cached_cases(args.null)
    window = null[0].result.settings.sigma_window
    energies = np.stack([c.result.energy.windowed(window) for c in null])
    mean, spread = energies.mean(0), energies.std(0)
    floor = 1e-3 * float(mean.mean())
    variants = {
        "raw energy": lambda e: e,
        "energy − null mean": lambda e: e - mean,
        "energy / null mean": lambda e: e / (mean + floor),
        "(energy − mean) / null std": lambda e: (e - mean) / (spread + floor),
    }
    s = null[0].result.settings
    lines = [
        "# KLIP against a per-pixel healthy null model",
        "",
        f"Command: `python benchmarks/bench_null_model.py --null {args.null} {' '.join(map(str, args.splits))}`",
        "",
        f"Null model from {len(null)} healthy calibration slices; guidance `{s.guidance}`, {s.samples} sample(s), "
        f"{s.steps} steps, {s.views} views, σ window {window}. Cells: dataset AUROC / localisation AUROC.",
        "",
    ]
    for split in args.splits:
        cases = load_cached_cases(split)
        lines += [f"## {split.name} ({len(cases)} slices)", "",
                  "| map | " + " | ".join(f"patch {p}" for p in PATCHES) + " |", "|---|" + "---|" * len(PATCHES)]
        for name, transform in [*variants.items(), ("centre_distance control", None)]:
            cells = []
            for patch in PATCHES:
                if transform is None:
                    m = score_method(cases, "centre_distance", patch, None)
                else:
                    m = score_method(cases, "klip", patch, window, transform=transform)
                cells.append(f"{m.dataset_auroc:.3f} / {m.localisation_auroc:.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    atomic_write_text(args.out, "\n".join(lines), overwrite=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
