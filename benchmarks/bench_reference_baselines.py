"""Is the healthy reference doing the work, or KLIP? The baselines put through the same z-scores.

Usage:
    klviewer evaluate detect --n-id 20 --n-ood 20 --seed S --cache CACHE_S ...   # each split
    klviewer calibrate -n 40 --cache REF_CACHE --dry-run ...                    # healthy slices, same settings
    python benchmarks/bench_reference_baselines.py --reference REF_CACHE CACHE_1 CACHE_0 [--out FILE.md]

`klip_z` standardises each patch's log KL among healthy patches with the same edge energy in the
reconstruction (`klviewer.inference.healthy_reference`). Here every baseline map gets exactly
the same treatment, fitted on the same healthy calibration slices, so the table says how much
of `klip_z`'s detection comes from KLIP's energy and how much from the standardisation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from klviewer.evaluation.detection import BASELINES, DetectionCase, load_cached_cases, method_map, score_patches
from klviewer.inference.energy import EnergyField
from klviewer.inference.healthy_reference import HealthySlice, fit_reference
from klviewer.io.safe_write import atomic_write_text

CELLS = ((8, (0.01, 0.5)), (4, (0.01, 0.05)))
METHODS = ("klip", *(b for b in BASELINES if b != "centre_distance"))


def as_energy(case: DetectionCase, method: str, window: tuple[float, float]) -> EnergyField:
    """The method's per-pixel map as a one-bin energy field, so the reference code takes it as it is."""
    values = method_map(case, method, window)
    return EnergyField(np.maximum(values, 0.0)[None].astype(np.float32), np.array([window[0], window[1]]))


def table(reference: list[DetectionCase], cases: list[DetectionCase]) -> list[str]:
    lines = ["| method | " + " | ".join(f"patch {p}, σ {w[0]:g}-{w[1]:g}" for p, w in CELLS) + " |",
             "|---|" + "---|" * len(CELLS)]
    for method in METHODS:
        cells = []
        for patch, window in CELLS:
            healthy = [HealthySlice(as_energy(c, method, window), c.result.recon_hu) for c in reference]
            ref = fit_reference(healthy, patch, None)
            scores = score_patches(cases, f"{method}_z",
                                   lambda c: ref.z_map(as_energy(c, method, window), c.result.recon_hu))
            cells.append(f"{scores.dataset_auroc:.3f} / {scores.localisation_auroc:.3f}")
        lines.append(f"| {method}_z | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="cache of healthy calibration slices")
    parser.add_argument("splits", type=Path, nargs="+", help="detection caches, one per split")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reference_baselines.md")
    args = parser.parse_args()
    reference = load_cached_cases(args.reference)
    s = reference[0].result.settings
    lines = ["# Baselines through the same healthy reference as KLIP", "",
             f"Command: `python benchmarks/bench_reference_baselines.py --reference {args.reference} "
             + " ".join(str(p) for p in args.splits) + "`", "",
             f"Reference: {len(reference)} healthy calibration slices; guidance `{s.guidance}`, {s.samples} sample(s), "
             f"{s.steps} steps, {s.views} views. Cells: dataset AUROC / localisation AUROC. The first row is `klip_z`.", ""]
    for split in args.splits:
        cases = load_cached_cases(split)
        seed = cases[0].result.settings.seed
        lines += [f"## `{split.name}` (`--seed {seed}`, {len(cases)} slices)", "", *table(reference, cases), ""]
    text = "\n".join(lines)
    print(text)
    atomic_write_text(args.out, text, overwrite=True)


if __name__ == "__main__":
    main()
