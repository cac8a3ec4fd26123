"""What a trained prior has learned: loss curve, unconditional samples, held-out denoising error.

``write_training_report(folder)`` writes ``TRAINING.md`` plus its figures and tables into
``folder/training/``; ``klviewer train`` calls it at the end of a run.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from klviewer.errors import KlviewerInputError
from klviewer.io.safe_write import atomic_write, atomic_write_text
from klviewer.priors.base import Prior
from klviewer.priors.checkpoint import load_prior
from klviewer.priors.sampling import sample_heun

REPORT_SIGMAS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# Held-out phantoms are drawn from a seed range far from any training seed we use.
HELDOUT_SEED = 900_000
SOFT_TISSUE_WINDOW = (40.0, 400.0)  # (level, width) in HU


@dataclass
class SigmaMSE:
    sigma: float
    mse: float
    """Mean squared error of D(x0 + sigma n; sigma) against x0, in prior units squared."""
    rmse_hu: float
    gain_db: float
    """10 log10(sigma^2 / mse): how much the denoiser improves on its noisy input."""


def denoising_mse(prior: Prior, images: torch.Tensor, sigmas: tuple[float, ...] = REPORT_SIGMAS,
                  seed: int = 0, batch: int = 8) -> list[SigmaMSE]:
    """Per-sigma MSE of the prior's denoiser on clean ``images`` (N, C, H, W) in prior units."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for sigma in sigmas:
        total, count = 0.0, 0
        for start in range(0, images.shape[0], batch):
            x0 = images[start:start + batch]
            noisy = x0 + sigma * torch.randn(x0.shape, generator=gen)
            with torch.no_grad():
                out = prior.denoise(noisy.to(prior.device), sigma).cpu()
            total += float(((out.double() - x0.double()) ** 2).sum())
            count += x0.numel()
        mse = total / count
        rows.append(SigmaMSE(sigma, mse, math.sqrt(mse) * abs(prior.config.hu_scale),
                             10 * math.log10(sigma**2 / mse) if mse > 0 else math.inf))
    return rows


def heldout_phantoms(prior: Prior, n: int = 16) -> tuple[torch.Tensor, list[int]]:
    """``n`` healthy phantoms whose seeds the prior's training data did not use."""
    from klviewer.phantoms import make_phantom_set

    size = prior.config.image_size[0]
    phantoms = make_phantom_set("healthy", n, size, HELDOUT_SEED)
    seeds = [int(p.seed) for p in phantoms]
    used = set(prior.config.training.get("data", {}).get("phantom_seeds", []))
    if used & set(seeds):
        raise KlviewerInputError(None, f"held-out phantom seeds overlap the training seeds: {sorted(used & set(seeds))}")
    images = torch.stack([torch.from_numpy(np.asarray(prior.hu_to_x(p.hu), dtype=np.float32)) for p in phantoms])
    return images.unsqueeze(1), seeds


def _png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="0.75", lw=0.5, label="per step")
    window = max(1, len(losses) // 50)
    if len(losses) >= window:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="C0", lw=1.5, label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("EDM-weighted loss")
    ax.legend()
    ax.grid(alpha=0.3)
    blob = _png_bytes(fig)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(blob), overwrite=True)


def plot_samples(prior: Prior, samples: torch.Tensor, path: Path, columns: int = 4) -> None:
    """A grid of samples shown in the soft-tissue window (W400 / L40)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hu = prior.x_to_hu(samples[:, 0].cpu().numpy())
    level, width = SOFT_TISSUE_WINDOW
    rows = math.ceil(len(hu) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, hu):
        ax.imshow(image, cmap="gray", vmin=level - width / 2, vmax=level + width / 2, interpolation="nearest")
    fig.suptitle(f"{prior.config.name}: unconditional samples (soft-tissue window W{width:g}/L{level:g})")
    blob = _png_bytes(fig)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(blob), overwrite=True)


def _markdown(prior: Prior, mse: list[SigmaMSE], heldout_seeds: list[int], n_samples: int,
              sample_steps: int, notes: str) -> str:
    t = prior.config.training
    data = {k: v for k, v in t.get("data", {}).items() if k != "phantom_seeds"}
    seeds = t.get("data", {}).get("phantom_seeds", [])
    seed_range = f"{min(seeds)}..{max(seeds)}" if seeds else "n/a"
    lines = [
        f"# Prior `{prior.config.name}`",
        "",
        f"Architecture `{prior.config.architecture}`, image {prior.config.image_size[0]}x{prior.config.image_size[1]}, "
        f"pixel spacing {prior.config.pixel_spacing_mm} mm, prior units x = (HU - {prior.config.hu_offset:g}) / "
        f"{prior.config.hu_scale:g}, sigma_data {prior.config.sigma_data:g}, "
        f"{sum(p.numel() for p in prior.parameters()):,} parameters.",
        "",
        "## Training",
        "",
        "```",
        *[str(c) for c in (t.get("commands") or [t.get("command")])],
        "```",
        "",
        f"- data: `{json.dumps(data)}` (phantom seeds {seed_range})",
        *([f"- distilled from `{t['distill_from']}`: the targets were its denoised images, not the clean ones"]
          if t.get("distill_from") else []),
        f"- steps {t.get('steps')}, batch {t.get('batch')}, patch {t.get('patch')}, lr {t.get('lr')}, "
        f"EMA {t.get('ema')}, ln sigma ~ N({t.get('p_mean')}, {t.get('p_std')}^2)",
        f"- wall time {t.get('seconds')} s on {t.get('device')} (torch {t.get('torch_version')}, "
        f"klviewer {t.get('klviewer_version')})",
        f"- final loss {t.get('final_loss', float('nan')):.4g} ({t.get('final_loss_note', '')})",
        "",
        "![loss](training/loss.png)",
        "",
        f"## Unconditional samples ({n_samples}, Heun ODE, {sample_steps} steps, "
        f"sigma {prior.config.sigma_max:g} -> {prior.config.sigma_min:g})",
        "",
        "![samples](training/samples.png)",
        "",
        f"## Denoising error on {len(heldout_seeds)} held-out healthy phantoms (seeds {min(heldout_seeds)}.."
        f"{max(heldout_seeds)}, not used in training)",
        "",
        "| sigma | MSE (prior units^2) | RMSE (HU) | gain over noisy input (dB) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.sigma:g} | {r.mse:.3e} | {r.rmse_hu:.1f} | {r.gain_db:.1f} |" for r in mse]
    if notes:
        lines += ["", "## Notes", "", notes.strip()]
    return "\n".join(lines) + "\n"


def write_training_report(folder: Path, device: torch.device | str = "cpu", n_heldout: int = 16,
                          n_samples: int = 8, sample_steps: int = 32, seed: int = 0, notes: str = "") -> Path:
    """Evaluate the prior in ``folder`` and write TRAINING.md with its figures; returns its path."""
    folder = Path(folder)
    prior = load_prior(folder, device=device)
    images, seeds = heldout_phantoms(prior, n_heldout)
    mse = denoising_mse(prior, images, seed=seed)
    samples = sample_heun(prior, n_samples, steps=sample_steps, generator=torch.Generator().manual_seed(seed))
    training = folder / "training"
    plot_samples(prior, samples, training / "samples.png")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["sigma", "mse", "rmse_hu", "gain_db"])
    for row in mse:
        writer.writerow([row.sigma, f"{row.mse:.6e}", f"{row.rmse_hu:.3f}", f"{row.gain_db:.3f}"])
    atomic_write_text(training / "denoising_mse.csv", buffer.getvalue(), overwrite=True)
    atomic_write_text(training / "report.json", json.dumps(
        {"heldout_seeds": seeds, "denoising_mse": [asdict(r) for r in mse], "n_samples": n_samples,
         "sample_steps": sample_steps, "seed": seed}, indent=2) + "\n", overwrite=True)
    return atomic_write_text(folder / "TRAINING.md", _markdown(prior, mse, seeds, n_samples, sample_steps, notes),
                             overwrite=True)
