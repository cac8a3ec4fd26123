"""What one analysed slice produces, and the same result under other map settings (no sampling)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from klviewer.errors import KlviewerInputError
from klviewer.inference.energy import EnergyField, KLMap
from klviewer.inference.healthy_reference import slice_z_score, z_map_fits
from klviewer.inference.scoring import flag_rule
from klviewer.inference.settings import AnalysisSettings, sampling_key


@dataclass
class SliceResult:
    """Everything one analysed slice produces. Images are (H, W) float32 on the prior's grid."""

    recon_hu: np.ndarray
    posterior_std_hu: np.ndarray
    fbp_hu: np.ndarray
    residual_backprojection: np.ndarray
    """|A^T W (y - A x_hat)| in prior units: where the reconstruction disagrees with the data."""
    energy: EnergyField
    kl_map: KLMap
    score: float
    total_kl: float
    total_kl_all_sigma: float
    flagged: bool
    flag_threshold: float | None
    pixel_spacing_mm: float
    settings: AnalysisSettings
    prior_name: str
    seconds: float
    original_hu: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    z_map: KLMap | None = None
    """KL z-scores against healthy patches with the same edge content, pooled over windows of about
    a lesion's size (see `healthy_reference`); None without a healthy reference calibrated for
    these settings."""
    z_threshold: float | None = None

    @property
    def z_score(self) -> float | None:
        return slice_z_score(self.z_map)

    @property
    def flag_rule(self) -> str | None:
        """What `flagged` compares: "z" (KL z-score against the healthy reference's threshold),
        "nats" (largest patch KL against a threshold in nats), or None (nothing to compare with)."""
        return flag_rule(self.flag_threshold, self.z_threshold, self.settings.flag_threshold)


def recut(result: SliceResult, settings: AnalysisSettings) -> SliceResult:
    """`result` under `settings`, which may differ from its own only in map settings: the KL map,
    score and total are cut again from the energy field, without sampling. KL z-scores stay only
    while patch and sigma window are unchanged, because their reference holds for those alone;
    the flag is left for the caller to decide."""
    if sampling_key(settings) != sampling_key(result.settings):
        raise KlviewerInputError(None, "only map settings (patch, sigma window, flag threshold) can change without sampling")
    kl_map = result.energy.kl_map(settings.patch, settings.sigma_window)
    z = result.z_map
    keep_z = z is not None and z_map_fits(z, kl_map)
    return dataclasses.replace(result, settings=settings, kl_map=kl_map, score=kl_map.score, total_kl=kl_map.total,
                               z_map=z if keep_z else None, z_threshold=result.z_threshold if keep_z else None)
