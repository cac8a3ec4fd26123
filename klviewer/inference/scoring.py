"""Scores, verdicts and the flag rule: one place that decides whether a slice is flagged, and why.

The pipeline, the app's sliders, the comparison view and every export call `score_slice` or
`is_flagged`, so a slice gets the same verdict in every view, table and report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klviewer.inference.energy import EnergyField, KLMap
from klviewer.inference.healthy_reference import ZCalibration, slice_z_score
from klviewer.inference.prior_fit import PriorFit, is_mismatch


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


FLAGGED, NOT_FLAGGED, MISMATCH, CANNOT_FLAG = "flagged", "not flagged", "prior mismatch", "cannot flag"


@dataclass(frozen=True)
class Verdict:
    """One slice's (or study's) verdict and the rule that made it, as every view, table and report shows it."""

    status: str
    """FLAGGED, NOT_FLAGGED, MISMATCH (the prior does not describe the study: local maps mean nothing) or
    CANNOT_FLAG (no threshold is calibrated for these settings)."""
    rule: str

    @property
    def needs_review(self) -> bool:
        return self.status in (FLAGGED, MISMATCH)


def mismatch_rule(prior_fit: PriorFit) -> str:
    """The words of a prior-fit mismatch, wherever one is shown."""
    return (f"prior fit {prior_fit.score:.3g} > {prior_fit.threshold:.3g} nats per body pixel: "
            "this prior does not describe the study, so its local KL maps are not meaningful")


def verdict_of(scored: SliceScore, prior_fit: PriorFit | None) -> Verdict:
    """The prior-fit verdict first (a mismatch is never "not flagged"), then the flag rule of `scored`."""
    if is_mismatch(prior_fit):
        return Verdict(MISMATCH, mismatch_rule(prior_fit))
    rule = scored.rule
    if rule == "z":
        above = scored.z_score is not None and scored.z_score > scored.z_threshold
        z = "none" if scored.z_score is None else f"{scored.z_score:.3g}"
        return Verdict(FLAGGED if above else NOT_FLAGGED,
                       f"KL z-score {z} {'>' if above else '<='} {scored.z_threshold:.3g} (healthy-reference threshold)")
    if rule == "nats":
        above = scored.score > scored.nats_threshold
        source = "set by the user" if scored.forced_nats is not None else "calibrated"
        return Verdict(FLAGGED if above else NOT_FLAGGED,
                       f"largest patch KL {scored.score:.3g} {'>' if above else '<='} {scored.nats_threshold:.3g} nats "
                       f"({source} threshold)")
    return Verdict(CANNOT_FLAG, "no threshold is calibrated for these settings: nothing can be flagged")
