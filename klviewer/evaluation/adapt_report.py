"""The adaptation report in OUT/adaptation/: ADAPTATION.md, adaptation.json and its figures.

It says what the adapted prior learned (held-out denoising error per sigma against the base
prior), how its calibration did on the held-out patients (false-positive rates of each rule), and
where the held-out slices lie against the prior-fit threshold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from klviewer.evaluation.calibrate import Calibration
from klviewer.io.safe_write import atomic_write, atomic_write_text
from klviewer.priors.report import SOFT_TISSUE_WINDOW, SigmaMSE, plot_loss
from klviewer.priors.unet import EDMUNetPrior

if TYPE_CHECKING:
    from klviewer.evaluation.adapt import AdaptConfig, PatientSplit

PANEL_SIGMA = 0.1
"""Noise level of the denoising examples: where the detection window's energy is made."""


def _calibration_rows(calibrations: Sequence[Calibration]) -> list[dict[str, Any]]:
    rows = []
    for cal in calibrations:
        entry = cal.entry
        s = entry["settings"]
        row: dict[str, Any] = {
            "settings": f"{s['guidance']}, {s['samples']} sample(s), {s['steps']} steps, patch {s['patch']}, "
                        f"sigma {s['sigma_window'][0]}-{s['sigma_window'][1]}" if s.get("sigma_window") else str(s),
            "n_held_out": entry["n_healthy"],
            "nats_threshold": cal.threshold, "nats_exceeding": entry["healthy_exceeding"],
        }
        z = entry.get("healthy_reference")
        if z is not None:
            row.update(z_threshold=z["z_threshold"], z_exceeding=z["healthy_exceeding"])
        fit = entry.get("prior_fit")
        if fit is not None:
            row.update(prior_fit_statistic=fit["statistic"], prior_fit_threshold=fit["threshold"],
                       prior_fit_scores=fit["healthy_scores"], prior_fit_exceeding=fit["healthy_exceeding"])
        rows.append(row)
    return rows


def _denoising_figure(path: Path, held: torch.Tensor, base: EDMUNetPrior, adapted: EDMUNetPrior, seed: int) -> None:
    """Two held-out slices: clean, noisy at PANEL_SIGMA, denoised by the base and by the adapted prior."""
    from matplotlib.figure import Figure

    gen = torch.Generator().manual_seed(seed)
    picks = held[: min(2, held.shape[0])]
    noisy = picks + PANEL_SIGMA * torch.randn(picks.shape, generator=gen)
    with torch.no_grad():
        outs = {"base": base.denoise(noisy.to(base.device), PANEL_SIGMA).cpu(),
                "adapted": adapted.denoise(noisy.to(adapted.device), PANEL_SIGMA).cpu()}
    level, width = SOFT_TISSUE_WINDOW
    fig = Figure(figsize=(8, 2.1 * len(picks)), dpi=100)
    axes = fig.subplots(len(picks), 4, squeeze=False)
    for r in range(len(picks)):
        for c, (title, image) in enumerate((("held-out slice", picks[r]), (f"noisy, sigma {PANEL_SIGMA}", noisy[r]),
                                            ("base prior", outs["base"][r]), ("adapted prior", outs["adapted"][r]))):
            hu = base.x_to_hu(image[0].numpy())
            axes[r, c].imshow(hu, cmap="gray", vmin=level - width / 2, vmax=level + width / 2)
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), overwrite=True)


def write_adaptation_report(folder: Path, cfg: AdaptConfig, split: PatientSplit, rows: dict[str, list[SigmaMSE]],
                            calibrations: Sequence[Calibration], losses: list[float], held: torch.Tensor,
                            base: EDMUNetPrior, adapted: EDMUNetPrior) -> dict[str, Any]:
    """Write the report; returns what adaptation.json holds."""
    denoising = [{"sigma": b.sigma, "base_rmse_hu": b.rmse_hu, "adapted_rmse_hu": a.rmse_hu}
                 for b, a in zip(rows["base"], rows["adapted"])]
    doc = {"split": split.describe(), "denoising": denoising, "calibration": _calibration_rows(calibrations),
           "steps": len(losses), "final_loss": float(np.mean(losses[-50:])) if losses else None}
    atomic_write_text(folder / "adaptation.json", json.dumps(doc, indent=2) + "\n", overwrite=True)
    if losses:
        plot_loss(losses, folder / "loss.png")
    _denoising_figure(folder / "denoising.png", held, base, adapted, cfg.seed)
    d = doc["split"]
    lines = [
        f"# Site adaptation of {base.config.name}", "",
        f"Command: `{cfg.command}`" if cfg.command else "", "",
        "## Split", "",
        f"- by {d['method']}" + (f", {d['gap_slices']} slices left out between the slabs" if d["method"] == "slabs" else ""),
        f"- training: {d['train_slices']} slices of {len(d['train_patients'])} patient(s)",
        f"- held out: {d['held_out_slices']} slices of {len(d['held_out_patients'])} patient(s)", "",
        f"## Training: {cfg.mode}, {len(losses)} steps, batch {cfg.batch}, lr {cfg.learning_rate:g}", "",
        "![loss](loss.png)", "",
        "## Held-out denoising error (RMSE, HU)", "",
        "| sigma | base prior | adapted prior |", "|---|---|---|",
        *[f"| {r['sigma']:g} | {r['base_rmse_hu']:.1f} | {r['adapted_rmse_hu']:.1f} |" for r in denoising], "",
        "![denoising](denoising.png)", "",
        "## Calibration on the held-out slices", "",
        "| settings | slices | nats threshold (above it) | z threshold (above it) | prior fit: threshold, held-out scores |",
        "|---|---|---|---|---|",
    ]
    for r in doc["calibration"]:
        z = f"{r['z_threshold']:.3g} ({r['z_exceeding']})" if "z_threshold" in r else "none (too few slices)"
        fit = "none"
        if "prior_fit_threshold" in r:
            s = r["prior_fit_scores"]
            fit = (f"{r['prior_fit_threshold']:.4g}; {s['min']:.4g} to {s['max']:.4g} "
                   f"({r['prior_fit_exceeding']} above)")
        lines.append(f"| {r['settings']} | {r['n_held_out']} | {r['nats_threshold']:.4g} ({r['nats_exceeding']}) | "
                     f"{z} | {fit} |")
    lines += ["", "Thresholds are set at a false-positive rate of "
              f"{cfg.fpr:g} on the held-out slices, so about that fraction of them lies above each one."]
    atomic_write_text(folder / "ADAPTATION.md", "\n".join(lines) + "\n", overwrite=True)
    return doc
