"""Reconstruction and KL map of some cached real-CT analyses side by side (benchmarks/bench_real_ct.py's cache).

Usage: python benchmarks/plot_real_ct_maps.py CACHE/<prior fingerprint> NAME... --out FILE.png
where NAME is a cached file's stem, e.g. pat_4_0031.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from klviewer.results.slice_file import load_slice_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("names", nargs="+")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    fig, axes = plt.subplots(2, len(args.names), figsize=(4 * len(args.names), 8), squeeze=False)
    for k, name in enumerate(args.names):
        result = load_slice_result(args.folder / f"{name}.npz")
        energy = result.energy.windowed(result.settings.sigma_window)
        z = "–" if result.z_score is None else f"{result.z_score:.2f}"
        axes[0, k].imshow(result.recon_hu, cmap="gray", vmin=-1000, vmax=400)
        axes[0, k].set_title(f"{name}: posterior mean, KL z {z}")
        axes[1, k].imshow(np.log10(energy + 1e-4), cmap="inferno")
        axes[1, k].set_title(f"log10 KL per pixel, σ {result.settings.sigma_window[0]:g}–{result.settings.sigma_window[1]:g}")
        for ax in axes[:, k]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=70)
    return 0


if __name__ == "__main__":
    sys.exit(main())
