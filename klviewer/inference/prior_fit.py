"""Does this prior describe this study at all? The study-level prior-fit verdict.

A KL z-score standardised against healthy patches of the same edge energy answers "is this patch
unusual for this prior". It cannot say "this prior does not describe this study": a head CT, a
chest or a real scanner's noise shifts every patch at once. The prior-fit score says that, from the
same run, with no extra sampling: the KL the data added to the prior, per pixel of body, in the
run's own noise-level window (nats per body pixel). A prior that describes the slice needs little
KL to reach the posterior; one that does not must be pushed everywhere (docs/prior_fit.md has the
candidates that were measured and why this one was chosen).

The threshold is calibrated on healthy slices like the z threshold and stored in the calibration
entry ("prior_fit"). Only when a slice "fits" are its local KL maps, z-scores and flags meaningful;
a "mismatch" is reported as such, never as "not flagged".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

from klviewer.errors import KlviewerInputError
from klviewer.inference.energy import EnergyField
from klviewer.inference.healthy_reference import body_mask

STATISTIC = "kl_per_body_pixel"
"""What the score is: nats of KL in the run's sigma window per pixel of body (see the module docstring)."""
FITS, MISMATCH = "fits", "mismatch"


def prior_fit_score(energy: EnergyField, recon_hu: np.ndarray, sigma_window: tuple[float, float] | None) -> float:
    """KL (nats) in `sigma_window` per pixel of body in the reconstruction."""
    body = body_mask(recon_hu)
    return float((energy.windowed(sigma_window) * body).sum() / max(int(body.sum()), 1))


@dataclass(frozen=True)
class PriorFit:
    verdict: str
    """FITS or MISMATCH."""
    score: float
    threshold: float
    statistic: str = STATISTIC

    @property
    def fits(self) -> bool:
        return self.verdict == FITS

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "score": self.score, "threshold": self.threshold, "statistic": self.statistic}

    @classmethod
    def from_dict(cls, doc: Any, source: Any = None) -> PriorFit:
        try:
            fit = cls(str(doc["verdict"]), float(doc["score"]), float(doc["threshold"]), str(doc.get("statistic", STATISTIC)))
        except (KeyError, TypeError, ValueError) as exc:
            raise KlviewerInputError(source, f"unreadable prior_fit ({exc})") from exc
        if fit.verdict not in (FITS, MISMATCH) or not (np.isfinite(fit.score) and np.isfinite(fit.threshold)):
            raise KlviewerInputError(source, f"prior_fit must be fits or mismatch with finite numbers, got {doc!r}")
        return fit


def is_mismatch(fit: PriorFit | None) -> TypeGuard[PriorFit]:
    """Whether a slice's prior-fit verdict is a mismatch. Without a verdict (no prior-fit threshold for the
    settings) nothing is ruled out, so every view, flag and escalation rule reads an absent verdict as a fit."""
    return fit is not None and not fit.fits


def judge(score: float, threshold: float) -> PriorFit:
    return PriorFit(MISMATCH if score > threshold else FITS, score, threshold)


def study_prior_fit(fits: Sequence[PriorFit]) -> PriorFit | None:
    """A study's verdict from its slices': their median score against the threshold (one odd slice, e.g. the top
    of the head in an abdomen series, does not decide for the study)."""
    if not fits:
        return None
    return judge(float(np.median([f.score for f in fits])), fits[0].threshold)
