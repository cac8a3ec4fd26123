"""KLIP detection and localisation on phantom sets, against three baselines on the same runs.

Every slice is sampled once and its result cached; patch size and sigma window are cut from the
cached EnergyField afterwards, so sweeping them costs no new sampling.

Metrics (as in the KLIP paper's code):
- dataset-level AUROC: image score (max patch value) of healthy vs. OOD slices;
- image-level localisation AUROC: for each OOD slice, over the patches that touch the body
  mask, a patch is positive when it touches the OOD mask; the per-image AUROCs are averaged.

``klip_z`` is KLIP's KL z-score against a healthy reference (`healthy_reference`), fitted on
healthy slices from the calibration seed range, never on the slices it scores.

The control ``centre_distance`` scores every pixel by its closeness to the image centre and uses
no measurement at all. Liver lesions sit at mid radius and the body rim is all negatives, so
localisation AUROC has a floor well above 0.5; a method is only localising by what it adds
above this control.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from klviewer.evaluation.cached_runs import CachedSlice, analyze_with_cache
from klviewer.evaluation.metrics import auroc, psnr_hu, ssim_hu
from klviewer.inference.energy import KLMap, patch_sums
from klviewer.inference.healthy_reference import HealthyReference, HealthySlice
from klviewer.inference.measurements import prepare_slice
from klviewer.inference.result import SliceResult
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.study import Series, Slice
from klviewer.phantoms import Phantom, make_phantom
from klviewer.results.slice_file import load_slice_result

BASELINES = ("posterior_std", "fbp_minus_mean", "residual_backprojection", "centre_distance")
METHODS = ("klip", *BASELINES)
EVAL_SEED_BASE = 1_000_000
"""Phantom seeds for evaluation start here, far from the seeds priors are trained on."""
CALIBRATION_SEED_BASE = 2_000_000
"""Healthy slices for flag thresholds: disjoint from training and from evaluation."""
SPLIT_SPAN = 10_000
"""Phantom seeds per evaluation split (`--seed`): its healthy phantoms first, its OOD ones from half-way."""


def split_plan(seed: int, n_id: int, n_ood: int, ood_kind: str = "lesion",
               seed_base: int = EVAL_SEED_BASE) -> list[tuple[str, int]]:
    """(kind, phantom seed) of split `seed`'s healthy then OOD phantoms, in `run_cases`' order."""
    first = seed_base + seed * SPLIT_SPAN
    return ([("healthy", first + i) for i in range(n_id)]
            + [(ood_kind, first + SPLIT_SPAN // 2 + i) for i in range(n_ood)])


def split_of(phantom_seed: int) -> int | None:
    """The evaluation split (`--seed`) a phantom seed belongs to; None for calibration-range seeds."""
    return None if phantom_seed >= CALIBRATION_SEED_BASE else (phantom_seed - EVAL_SEED_BASE) // SPLIT_SPAN


@dataclass
class DetectionCase:
    kind: str
    seed: int
    body_mask: np.ndarray
    ood_mask: np.ndarray
    reference_hu: np.ndarray
    result: SliceResult

    @classmethod
    def of(cls, phantom: Phantom, result: SliceResult) -> DetectionCase:
        return cls(phantom.kind, phantom.seed, phantom.body_mask, phantom.ood_mask, phantom.hu, result)


def _cache_file(cache: Path, kind: str, phantom_seed: int) -> Path:
    return cache / f"{kind}_{phantom_seed}.npz"


def series_from_phantom(phantom: Phantom) -> Series:
    return Series(
        uid=f"phantom:{phantom.kind}:{phantom.seed}", modality="CT", source_kind="array",
        description=f"{phantom.kind} phantom seed {phantom.seed}", slices=[Slice(hu=phantom.hu)],
        pixel_spacing_mm=(phantom.pixel_spacing_mm, phantom.pixel_spacing_mm),
    )


def run_cases(
    prior,
    settings: AnalysisSettings,
    *,
    n_id: int,
    n_ood: int,
    ood_kind: str = "lesion",
    seed: int = 0,
    seed_base: int = EVAL_SEED_BASE,
    cache: Path | None = None,
    device: torch.device = torch.device("cpu"),
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[DetectionCase]:
    """Healthy and OOD phantoms at the prior's size, analysed (or read back from `cache`)."""
    size = prior.config.image_size[0]
    phantoms = [make_phantom(kind, size, phantom_seed)
                for kind, phantom_seed in split_plan(seed, n_id, n_ood, ood_kind, seed_base)]

    def item(phantom: Phantom) -> CachedSlice:
        cached = _cache_file(cache, phantom.kind, phantom.seed) if cache is not None else None
        return cached, lambda: prepare_slice(series_from_phantom(phantom), 0, prior, settings, device)

    results = analyze_with_cache([item(p) for p in phantoms], prior, settings, prior_name=prior.config.name,
                                 device=device, progress=progress, cancel=cancel)
    return [DetectionCase.of(phantom, result) for phantom, result in zip(phantoms, results)]


def load_cached_cases(cache: Path) -> list[DetectionCase]:
    """Every result `run_cases` left in `cache`, whatever its settings, with its phantom rebuilt
    from the file name (for offline analyses of finished runs)."""
    cases = []
    for path in sorted(cache.glob("*.npz")):
        kind, seed = path.stem.rsplit("_", 1)
        result = load_slice_result(path)
        cases.append(DetectionCase.of(make_phantom(kind, result.recon_hu.shape[0], int(seed)), result))
    return cases


def method_map(case: DetectionCase, method: str, sigma_window: tuple[float, float] | None) -> np.ndarray:
    """Per-pixel evidence of each method; patch sums of it are the method's patch scores."""
    r = case.result
    if method == "klip":
        return r.energy.windowed(sigma_window)
    if method == "posterior_std":
        return r.posterior_std_hu.astype(np.float64)
    if method == "fbp_minus_mean":
        return np.abs(r.fbp_hu.astype(np.float64) - r.recon_hu)
    if method == "residual_backprojection":
        return r.residual_backprojection.astype(np.float64)
    if method == "centre_distance":
        h, w = r.recon_hu.shape
        yy, xx = np.mgrid[:h, :w]
        return -(((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (h * w))
    raise ValueError(f"unknown method {method!r}")


def touching(mask: np.ndarray, patch: int) -> np.ndarray:
    """Which patches of size `patch` hold at least one pixel of `mask`."""
    return patch_sums(mask.astype(np.float64), patch).values > 0


@dataclass
class MethodScores:
    method: str
    image_scores: np.ndarray
    labels: np.ndarray
    dataset_auroc: float
    localisation_auroc: float
    per_image_localisation: list[float] = field(default_factory=list)


def score_method(cases: list[DetectionCase], method: str, patch: int, sigma_window: tuple[float, float] | None,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None) -> MethodScores:
    """Image scores and AUROCs of one method; `transform` maps each per-pixel map before the patch sums."""

    def patches(case: DetectionCase) -> KLMap:
        evidence = method_map(case, method, sigma_window)
        return patch_sums(evidence if transform is None else transform(evidence), patch)

    return score_patches(cases, method, patches)


def score_z(cases: list[DetectionCase], reference: HealthyReference) -> MethodScores:
    """KLIP's KL z-scores against a healthy reference (fitted on other slices than `cases`),
    localised over the reference's pooled windows."""
    return score_patches(cases, "klip_z", lambda case: reference.z_map(case.result.energy, case.result.recon_hu))


def healthy_slices(cases: list[DetectionCase]) -> list[HealthySlice]:
    return [HealthySlice(c.result.energy, c.result.recon_hu) for c in cases if c.kind == "healthy"]


def localisation_auroc(patches: KLMap, case: DetectionCase) -> float:
    """One OOD slice's localisation AUROC: over the patches that touch the body, those that touch the OOD
    mask are the positives (NaN when there are no positives or no negatives)."""
    inside = patches.sums_of(case.body_mask) > 0
    return auroc(patches.values[inside], (patches.sums_of(case.ood_mask) > 0)[inside])


def score_patches(cases: list[DetectionCase], method: str,
                  patch_map: Callable[[DetectionCase], KLMap]) -> MethodScores:
    """Dataset AUROC of the largest patch value, and per-image localisation AUROC over body patches."""
    scores, labels, per_image = [], [], []
    for case in cases:
        patches = patch_map(case)
        scores.append(patches.score)
        is_ood = case.kind != "healthy"
        labels.append(is_ood)
        if is_ood:
            value = localisation_auroc(patches, case)
            if np.isfinite(value):
                per_image.append(value)
    scores_a, labels_a = np.array(scores), np.array(labels)
    return MethodScores(method, scores_a, labels_a, auroc(scores_a, labels_a),
                        float(np.mean(per_image)) if per_image else float("nan"), per_image)


def reconstruction_quality(cases: list[DetectionCase]) -> dict[str, float]:
    """Mean PSNR/SSIM of posterior mean and FBP against the phantom."""
    return {
        "psnr_posterior_mean": float(np.mean([psnr_hu(c.reference_hu, c.result.recon_hu) for c in cases])),
        "psnr_fbp": float(np.mean([psnr_hu(c.reference_hu, c.result.fbp_hu) for c in cases])),
        "ssim_posterior_mean": float(np.mean([ssim_hu(c.reference_hu, c.result.recon_hu) for c in cases])),
        "ssim_fbp": float(np.mean([ssim_hu(c.reference_hu, c.result.fbp_hu) for c in cases])),
    }
