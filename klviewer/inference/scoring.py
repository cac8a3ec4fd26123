"""Scores, verdicts and the flag rule: one place that decides whether a slice is flagged, and why.

The pipeline, the app's sliders, the comparison view and every export call `score_slice` or
`is_flagged`, so a slice gets the same verdict in every view, table and report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klviewer.inference.energy import EnergyField, KLMap
from klviewer.inference.healthy_reference import ZCalibration, slice_z_score


def flag_rule(flag_threshold: float | None, z_threshold: float | None, forced_nats: float | None) -> str | None:
    """The one flagging rule of every caller (see SliceResult.flag_rule).

    The KL z-score rule wins whenever the prior has a healthy reference for the settings: on
    lesion phantoms the largest patch KL does not separate healthy from lesion slices, because
    healthy anatomy carries as much KL (see docs/detection.md). A threshold in nats that the
    user sets forces the nats rule.
    """
    if forced_nats is None and z_threshold is not None:
        return "z"
    return "nats" if flag_threshold is not None else None


def is_flagged(score: float, flag_threshold: float | None, z_score: float | None, z_threshold: float | None,
               forced_nats: float | None = None) -> bool:
    rule = flag_rule(flag_threshold, z_threshold, forced_nats)
    if rule == "z":
        return z_score is not None and z_score > z_threshold
    return rule == "nats" and score > flag_threshold


@dataclass(frozen=True)
class SliceScore:
    """A slice's KL map, KL z-scores and verdict under one patch size and sigma window."""

    kl_map: KLMap
    nats_threshold: float | None
    """The threshold in nats that applies: the user's when forced, else the calibrated one (or None)."""
    z_map: KLMap | None = None
    z_threshold: float | None = None
    forced_nats: float | None = None

    @property
    def score(self) -> float:
        """The largest patch KL (nats)."""
        return self.kl_map.score

    @property
    def z_score(self) -> float | None:
        return slice_z_score(self.z_map)

    @property
    def rule(self) -> str | None:
        return flag_rule(self.nats_threshold, self.z_threshold, self.forced_nats)

    @property
    def flagged(self) -> bool:
        return is_flagged(self.score, self.nats_threshold, self.z_score, self.z_threshold, self.forced_nats)


def score_slice(energy: EnergyField, recon_hu: np.ndarray | None, patch: int, sigma_window: tuple[float, float] | None, *,
                nats_threshold: float | None, z_calibration: ZCalibration | None = None,
                forced_nats: float | None = None) -> SliceScore:
    """Cut the KL map for `patch` and `sigma_window` from the energy field and score it.

    `z_calibration` is the prior's healthy reference for exactly these map settings (None when it
    has none), which needs the slice's reconstruction `recon_hu`; `forced_nats` is a threshold the
    user set, which forces the nats rule.
    """
    kl_map = energy.kl_map(patch, sigma_window)
    threshold = forced_nats if forced_nats is not None else nats_threshold
    if z_calibration is None:
        return SliceScore(kl_map, threshold, forced_nats=forced_nats)
    return SliceScore(kl_map, threshold, z_calibration.reference.z_map(energy, recon_hu), z_calibration.threshold,
                      forced_nats)
