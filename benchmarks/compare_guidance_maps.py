"""How two guidances' KL maps differ on the same phantoms: from two `klviewer evaluate detect --cache`
folders of the same split (same seeds, same settings but the guidance).

Usage: python benchmarks/compare_guidance_maps.py CACHE_A CACHE_B --names pigdm tmpd [--patch 8]
           [--sigma-window 0.01 0.5] [--out results/guidance_maps_pigdm_tmpd.md]

Per slice: the ratio of total KL (B / A), the correlation of log patch KL inside the body, and for
lesion slices the lesion contrast (mean KL of the patches touching the lesion over the mean of the
other body patches). Writes a markdown table and a PNG with both maps of the first lesion slice.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from klviewer.evaluation.detection import load_cached_cases, touching
from klviewer.evaluation.metrics import psnr_hu
from klviewer.inference.energy import patch_sums
from klviewer.io.safe_write import atomic_write, atomic_write_text


def describe(case, patch: int, window: tuple[float, float]) -> dict[str, float]:
    patches = patch_sums(case.result.energy.windowed(window), patch)
    body = touching(case.body_mask, patch)
    lesion = touching(case.ood_mask, patch) & body if case.kind != "healthy" else None
    out = {"total": float(case.result.energy.total()), "log_patches": np.log(patches.values[body] + 1e-3),
           "psnr": psnr_hu(case.reference_hu, case.result.recon_hu)}
    if lesion is not None and lesion.any():
        out["contrast"] = float(patches.values[lesion].mean() / patches.values[body & ~lesion].mean())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache_a", type=Path)
    ap.add_argument("cache_b", type=Path)
    ap.add_argument("--names", nargs=2, default=["A", "B"])
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--sigma-window", nargs=2, type=float, default=[0.01, 0.5])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    window = (args.sigma_window[0], args.sigma_window[1])
    a = {(c.kind, c.seed): c for c in load_cached_cases(args.cache_a)}
    b = {(c.kind, c.seed): c for c in load_cached_cases(args.cache_b)}
    keys = sorted(set(a) & set(b))
    if not keys:
        print("no slice is in both caches", file=sys.stderr)
        return 1
    na, nb = args.names
    rows = []
    for key in keys:
        da, db = describe(a[key], args.patch, window), describe(b[key], args.patch, window)
        rows.append((key, da["total"], db["total"], float(np.corrcoef(da["log_patches"], db["log_patches"])[0, 1]),
                     da.get("contrast"), db.get("contrast"), da["psnr"], db["psnr"]))

    def summary(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    lesion_rows = [r for r in rows if r[4] is not None and r[5] is not None]
    lines = [f"# KL maps of `{na}` and `{nb}` on the same phantoms", "",
             f"Command: `python benchmarks/compare_guidance_maps.py {args.cache_a} {args.cache_b} --names {na} {nb} "
             f"--patch {args.patch} --sigma-window {window[0]:g} {window[1]:g} --out {args.out}`", "",
             f"{len(rows)} slices ({len(lesion_rows)} with a lesion); patch {args.patch} px, σ window "
             f"{window[0]:g}–{window[1]:g}. Median (range) over slices:", "",
             "| quantity | value |", "|---|---|",
             f"| total KL, `{nb}` / `{na}` | {summary([r[2] / r[1] for r in rows])} |",
             f"| correlation of log patch KL in the body | {summary([r[3] for r in rows])} |",
             f"| lesion contrast, `{na}` | {summary([r[4] for r in lesion_rows])} |",
             f"| lesion contrast, `{nb}` | {summary([r[5] for r in lesion_rows])} |",
             f"| posterior-mean PSNR (dB), `{na}` | {summary([r[6] for r in rows])} |",
             f"| posterior-mean PSNR (dB), `{nb}` | {summary([r[7] for r in rows])} |", "",
             "Lesion contrast: mean KL of the patches touching the lesion over the mean of the other body patches.", "",
             f"| slice | total KL `{na}` | total KL `{nb}` | log-map correlation | contrast `{na}` | contrast `{nb}` |",
             "|---|---|---|---|---|---|"]
    for (kind, seed), ta, tb, corr, ca, cb, _, _ in rows:
        fmt = (lambda v: "–" if v is None else f"{v:.2f}")
        lines.append(f"| {kind} {seed} | {ta:.0f} | {tb:.0f} | {corr:.2f} | {fmt(ca)} | {fmt(cb)} |")
    first = next((k for k in keys if k[0] != "healthy"), keys[0])
    png = args.out.with_suffix(".png")
    lines += ["", f"![{first[0]} {first[1]}]({png.name})"]
    atomic_write_text(args.out, "\n".join(lines) + "\n", overwrite=True)
    fig = Figure(figsize=(11, 4), dpi=100)
    axes = fig.subplots(1, 3)
    axes[0].imshow(a[first].reference_hu, cmap="gray", vmin=-200, vmax=250)
    axes[0].contour(a[first].ood_mask, levels=[0.5], colors="cyan", linewidths=0.8)
    axes[0].set_title(f"{first[0]} {first[1]} (lesion outlined)")
    for ax, case, name in ((axes[1], a[first], na), (axes[2], b[first], nb)):
        shown = ax.imshow(np.log10(case.result.energy.windowed(window) + 1e-6), cmap="inferno")
        ax.contour(case.ood_mask, levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(f"{name}: log10 KL per pixel, σ {window[0]:g}–{window[1]:g}")
        fig.colorbar(shown, ax=ax, fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png"), overwrite=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
