"""What one analysed slice produces, and the same result under other map settings (no sampling)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from klviewer.errors import KlviewerInputError
from klviewer.inference.energy import EnergyField, KLMap
from klviewer.inference.escalation import Stage
from klviewer.inference.healthy_reference import slice_z_score, z_map_fits
from klviewer.inference.prior_fit import PriorFit
from klviewer.inference.scoring import SliceScore, Verdict, flag_rule, verdict_of
from klviewer.inference.settings import AnalysisSettings, sampling_key
from klviewer.physics.grid import GridTransform, square_pad_transform


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
    grid_transform: GridTransform | None = None
    """How the source grid maps onto the prior's, where the images and maps live (None: results written before
    klviewer recorded it; see `klviewer.physics.grid.square_pad_transform`)."""
    geometry_warnings: list[str] = field(default_factory=list)
    prior_fit_score: float | None = None
    """KL per body pixel in the run's sigma window (`klviewer.inference.prior_fit`); None in older results."""
    prior_fit: PriorFit | None = None
    """The prior-fit verdict; None when the prior has no prior-fit threshold for these settings."""
    stage: Stage | None = None
    """In a two-stage run (`klviewer.inference.escalation`): the run's escalation and whether this slice was
    escalated. A slice that stayed at stage 1 was judged by the escalation threshold (`z_threshold` holds it), and
    views that rescore it at the map it was judged at judge it by that threshold too; None for one stage."""

    @property
    def z_score(self) -> float | None:
        return slice_z_score(self.z_map)

    def grid_for(self, source_shape: tuple[int, int]) -> GridTransform:
        """How the source grid maps onto this result's grid: as recorded, or for older results the
        square-padding by pixel count they were made with."""
        if self.grid_transform is not None:
            return self.grid_transform
        return square_pad_transform(source_shape, self.energy.image_shape[0])

    def verdict(self) -> Verdict:
        """The verdict at the run's own map settings, and the rule that made it."""
        scored = SliceScore(self.kl_map, self.flag_threshold, self.z_map, self.z_threshold, self.settings.flag_threshold)
        return verdict_of(scored, self.prior_fit)

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
