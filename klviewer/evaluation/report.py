"""`klviewer evaluate detect`: run the detection benchmark and write its tables and ROC plots."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from klviewer.devices import resolve_device
from klviewer.evaluation.detection import (
    BASELINES,
    CALIBRATION_SEED_BASE,
    METHODS,
    DetectionCase,
    MethodScores,
    healthy_slices,
    reconstruction_quality,
    run_cases,
    score_method,
    score_z,
)
from klviewer.evaluation.metrics import roc_curve
from klviewer.inference.healthy_reference import POOL_PX, fit_reference
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.safe_write import atomic_write, atomic_write_text
from klviewer.priors.checkpoint import load_prior, resolve_prior_path

SWEEP_PATCHES = (2, 4, 8, 12, 16, 24, 32)
SWEEP_WINDOWS: tuple[tuple[float, float] | None, ...] = ((0.002, 0.01), (0.01, 0.05), (0.01, 0.5), (0.05, 0.5), (0.5, 10.0), None)


@dataclass
class DetectionReport:
    scores: dict[str, MethodScores]
    sweep: list[dict[str, Any]]
    baselines: list[dict[str, Any]]
    """Every method but KLIP at every sweep patch size (none of them depends on the sigma window)."""
    quality: dict[str, float]
    seconds_per_slice: float


def _fmt_window(w: tuple[float, float] | None) -> str:
    return "all" if w is None else f"{w[0]:g}-{w[1]:g}"


def evaluate(cases: list[DetectionCase], settings: AnalysisSettings,
             reference_cases: list[DetectionCase] | None = None) -> DetectionReport:
    """Every method at the run's settings, KLIP over the sweep, the baselines per patch size.
    With healthy `reference_cases`, KLIP's KL z-scores (`klip_z`) too, fitted on them per sweep cell."""
    healthy = healthy_slices(reference_cases or [])
    scores = {m: score_method(cases, m, settings.patch, settings.sigma_window) for m in METHODS}
    if healthy:
        z = score_z(cases, fit_reference(healthy, settings.patch, settings.sigma_window))
        scores = {"klip": scores["klip"], "klip_z": z, **{m: scores[m] for m in BASELINES}}
    baselines = []
    for patch in SWEEP_PATCHES:
        for method in BASELINES:
            b = score_method(cases, method, patch, None)
            baselines.append({"patch": patch, "method": method, "dataset_auroc": b.dataset_auroc,
                              "localisation_auroc": b.localisation_auroc})
    controls = {r["patch"]: r["localisation_auroc"] for r in baselines if r["method"] == "centre_distance"}
    sweep = []
    for patch in SWEEP_PATCHES:
        for window in SWEEP_WINDOWS:
            s = score_method(cases, "klip", patch, window)
            row = {"patch": patch, "sigma_window": _fmt_window(window),
                   "dataset_auroc": s.dataset_auroc, "localisation_auroc": s.localisation_auroc,
                   "centre_control_localisation": controls[patch]}
            if healthy:
                z = score_z(cases, fit_reference(healthy, patch, window))
                row.update(z_dataset_auroc=z.dataset_auroc, z_localisation_auroc=z.localisation_auroc)
            sweep.append(row)
    seconds = float(np.mean([c.result.seconds for c in cases]))
    return DetectionReport(scores, sweep, baselines, reconstruction_quality(cases), seconds)


def markdown(report: DetectionReport, settings: AnalysisSettings, meta: dict[str, Any]) -> str:
    lines = [
        "# Detection benchmark: KLIP vs. baselines on phantoms",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Prior `{meta['prior']}`; {meta['n_id']} healthy and {meta['n_ood']} {meta['ood_kind']} phantoms at "
        f"{meta['size']}²; {settings.views} views, noise {settings.noise_sigma or settings.dose_i0 or 'none'}; "
        f"{settings.describe_sampling()}. Mean {report.seconds_per_slice:.1f} s per slice on {meta['device']}.",
        "",
        "| method | dataset-level AUROC | image-level localisation AUROC |",
        "|---|---|---|",
    ]
    for m, s in report.scores.items():
        lines.append(f"| {m} | {s.dataset_auroc:.3f} | {s.localisation_auroc:.3f} |")
    lines += ["", "`centre_distance` is a control that uses no measurement (closeness to the image centre): "
              "a localisation AUROC counts only by how far it rises above the control's."]
    if "klip_z" in report.scores:
        lines += ["", f"`klip_z` is the KL z-score against a healthy reference fitted on {meta['n_reference']} other healthy "
                  "phantoms (calibration seeds): each patch's log KL scored by its normal score among healthy patches with "
                  f"the same edge energy in the reconstruction, then pooled (Stouffer) over windows of about {POOL_PX} px "
                  "(larger patches stand alone). Its localisation AUROC is over those windows."]
    q = report.quality
    lines += [
        "",
        f"Reconstruction: posterior mean PSNR {q['psnr_posterior_mean']:.2f} dB / SSIM {q['ssim_posterior_mean']:.3f}; "
        f"FBP PSNR {q['psnr_fbp']:.2f} dB / SSIM {q['ssim_fbp']:.3f} (HU range -1000..1000).",
        "",
        "## KLIP over patch size and sigma window (same runs, no new sampling)",
        "",
    ]
    with_z = "z_dataset_auroc" in report.sweep[0]
    z_head = " klip_z dataset AUROC | klip_z localisation AUROC |" if with_z else ""
    lines += [f"| patch | sigma window | dataset AUROC | localisation AUROC | centre_distance control |{z_head}",
              "|---|---|---|---|---|" + ("---|---|" if with_z else "")]
    lines += [f"| {r['patch']} | {r['sigma_window']} | {r['dataset_auroc']:.3f} | {r['localisation_auroc']:.3f} | "
              f"{r['centre_control_localisation']:.3f} |"
              + (f" {r['z_dataset_auroc']:.3f} | {r['z_localisation_auroc']:.3f} |" if with_z else "")
              for r in report.sweep]
    lines += ["", "## Baselines over patch size (dataset AUROC / localisation AUROC)", "",
              "| patch | " + " | ".join(BASELINES) + " |", "|---|" + "---|" * len(BASELINES)]
    for patch in SWEEP_PATCHES:
        row = {r["method"]: r for r in report.baselines if r["patch"] == patch}
        lines.append(f"| {patch} | " + " | ".join(f"{row[m]['dataset_auroc']:.3f} / {row[m]['localisation_auroc']:.3f}"
                                                  for m in BASELINES) + " |")
    return "\n".join(lines) + "\n"


def roc_figure(report: DetectionReport, path: Path) -> None:
    # A bare Figure renders with Agg and touches no GUI backend or global pyplot state.
    fig = Figure(figsize=(4.5, 4.5), dpi=120)
    ax = fig.subplots()
    for m, s in report.scores.items():
        fpr, tpr = roc_curve(s.image_scores, s.labels)
        ax.plot(fpr, tpr, label=f"{m} ({s.dataset_auroc:.2f})")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Dataset-level ROC (image score)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), overwrite=True)


def run_detection_benchmark(
    out: Path, settings: AnalysisSettings, *, prior: str, n_id: int, n_ood: int, ood_kind: str, seed: int,
    cache: Path | None, command: str, progress=None, n_reference: int = 0,
) -> DetectionReport:
    """`n_reference` healthy phantoms from the calibration seed range fit the `klip_z` reference
    (0: no `klip_z`); they are analysed as `klviewer calibrate` analyses them and cached beside the others."""
    device = resolve_device(settings.device)
    prior_path = resolve_prior_path(prior)
    model = load_prior(prior_path, device=device)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cases = run_cases(model, settings, n_id=n_id, n_ood=n_ood, ood_kind=ood_kind, seed=seed, cache=cache,
                      device=device, progress=progress)
    # Seed 0 as `klviewer calibrate` uses by default: the reference is the one a calibrated prior carries.
    reference = run_cases(model, replace(settings, seed=0), n_id=n_reference, n_ood=0, seed_base=CALIBRATION_SEED_BASE, cache=cache,
                          device=device,
                          progress=None if progress is None else lambda d, t: progress(n_id + n_ood + d, n_id + n_ood + t))
    report = evaluate(cases, settings, reference)
    meta = {"command": command, "prior": prior_path.name, "n_id": n_id, "n_ood": n_ood, "n_reference": n_reference,
            "ood_kind": ood_kind,
            "size": model.config.image_size[0], "device": str(device), "wall_seconds": time.perf_counter() - start}
    out.mkdir(parents=True, exist_ok=True)
    stem = f"detection_{ood_kind}"
    atomic_write_text(out / f"{stem}.md", markdown(report, settings, meta), overwrite=True)
    roc_figure(report, out / f"{stem}_roc.png")
    doc = {"settings": settings.to_dict(), **meta, "quality": report.quality, "sweep": report.sweep,
           "baselines": report.baselines,
           "methods": {m: {"dataset_auroc": s.dataset_auroc, "localisation_auroc": s.localisation_auroc,
                           "image_scores": s.image_scores.tolist(), "labels": s.labels.tolist()}
                       for m, s in report.scores.items()}}
    atomic_write_text(out / f"{stem}.json", json.dumps(doc, indent=2), overwrite=True)
    return report
