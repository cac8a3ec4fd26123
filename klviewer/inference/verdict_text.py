"""A slice's verdict and the rule that produced it, in the words every view uses.

The caption under the image, the case list, the Analysis panel's summary line, the exported
pictures, the PDF and the tables all word a verdict with `describe` (or `score_verdict` for a
scored slice), so a slice never reads "not flagged" in one place and carries flag outlines in
another. The verdict itself, prior mismatch included, comes from `klviewer.inference.scoring`;
this module only says it.

Slices are numbered from 0 everywhere (app, `--slices`, file names, tables, PDF): `slice_label`.
"""

from __future__ import annotations

from dataclasses import dataclass

from klviewer.inference.prior_fit import PriorFit
from klviewer.inference.scoring import CANNOT_FLAG, FLAGGED, MISMATCH, NOT_FLAGGED, SliceScore, flag_rule, verdict_of

__all__ = ["CANNOT_FLAG", "FLAGGED", "MISMATCH", "NOT_FLAGGED", "VerdictText", "describe", "score_verdict",
           "table_verdict", "rule_text", "format_nats", "slice_label", "nats_are_calibrated", "nats_meaning"]


@dataclass(frozen=True)
class VerdictText:
    """One slice's verdict with the numbers and the rule behind it, in words."""

    status: str
    """FLAGGED, NOT_FLAGGED, MISMATCH or CANNOT_FLAG (klviewer.inference.scoring)."""
    rule: str | None
    """"z", "nats" or None (see `klviewer.inference.scoring.flag_rule`)."""
    value: str
    """The compared number with its unit, e.g. "KL z 3.76" or "score 132 nats"."""
    rule_text: str
    """The rule in words, e.g. "flags when KL z-score > 4.91 (prior's healthy reference)"."""
    rule_short: str
    """The rule in a few characters, e.g. "KL z > 4.91", for captions burned into pictures."""

    @property
    def flagged(self) -> bool:
        return self.status == FLAGGED

    @property
    def caption(self) -> str:
        """A short line for pictures: "not flagged · KL z 3.76 (rule: KL z > 4.91)"."""
        return f"{self.status} · {self.value} (rule: {self.rule_short})"

    @property
    def line(self) -> str:
        """One line for captions and tables: "not flagged · KL z 3.76 · flags when KL z-score > 4.91 (...)"."""
        return f"{self.status} · {self.value} · {self.rule_text}"


def format_nats(value: float) -> str:
    """KL values for people: whole numbers from 100 on, three significant digits below."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


CALIBRATED_GUIDANCES = ("exact",)
"""Guidances whose summed energy is KL(p(x|y) || p(x)) for the priors they run with (docs/nats.md). `exact`
needs a Gaussian prior. `tmpd` is exact on Gaussian priors too, but on the shipped network prior its
covariance solve failed on 40-64 of 100 steps (the run's notes count them); `pigdm` is 1.2-2.8x the
closed form on sparse-view CT."""


def nats_are_calibrated(guidance: str | None) -> bool:
    """Whether a run with this guidance measures KL(posterior || prior) rather than a relative energy."""
    return guidance in CALIBRATED_GUIDANCES


def nats_meaning(guidance: str | None) -> str:
    """What the nats of a run with this guidance are, in one sentence for the app and the report."""
    if guidance is None:
        return "KL values in nats; the guidance that made them is not recorded, so whether they are calibrated is unknown."
    if nats_are_calibrated(guidance):
        return f"KL values in nats are KL(posterior || prior) ({guidance} guidance, docs/nats.md)."
    if guidance == "tmpd":
        return ("KL values in nats (tmpd guidance) are KL(posterior || prior) only where its covariance solve "
                "converges, as on Gaussian priors; on a network prior it can fail on many steps (the run's notes "
                "count them), so read them as a relative energy (docs/nats.md).")
    return (f"KL values in nats are a relative energy ({guidance} guidance): comparable between slices and patches "
            f"analysed with the same prior and settings, not a calibrated KL(posterior || prior) "
            f"(1.2-2.8x it on Gaussian CT test problems, docs/nats.md).")


def rule_text(rule: str | None, nats_threshold: float | None, z_threshold: float | None, forced: bool = False) -> str:
    """The flag rule in words, with its threshold and unit."""
    if rule == "z":
        return f"flags when KL z-score > {z_threshold:.3g} (prior's healthy reference)"
    if rule == "nats":
        source = "set by the user" if forced else "prior's calibration"
        return f"flags when largest patch KL > {format_nats(nats_threshold)} nats ({source})"
    return "no calibrated rule for these settings: nothing can be flagged"


def describe(flagged: bool, rule: str | None, score: float, z_score: float | None, nats_threshold: float | None,
             z_threshold: float | None, forced: bool = False, mismatch: str | None = None) -> VerdictText:
    """The verdict of a slice whose flag, rule and numbers are known (a SliceScore, a SliceResult, a summary row).
    `mismatch` is the prior-fit rule when the prior does not describe the study: then that is the verdict."""
    if mismatch is not None:
        status = MISMATCH
    elif rule is None:
        status = CANNOT_FLAG
    else:
        status = FLAGGED if flagged else NOT_FLAGGED
    if rule == "z":
        value = "KL z —" if z_score is None else f"KL z {z_score:.3g}"
    else:
        value = f"score {format_nats(score)} nats"
    short = ("prior does not fit the study" if mismatch is not None else
             f"KL z > {z_threshold:.3g}" if rule == "z" else
             f"KL > {format_nats(nats_threshold)} nats" if rule == "nats" else "none calibrated")
    words = mismatch if mismatch is not None else rule_text(rule, nats_threshold, z_threshold, forced)
    return VerdictText(status, rule, value, words, short)


def score_verdict(scored: SliceScore, prior_fit: PriorFit | None = None) -> VerdictText:
    """The verdict of a slice scored under the map settings (what the viewer and the case list show), the
    study-level prior fit first (`klviewer.inference.scoring.verdict_of`)."""
    decided = verdict_of(scored, prior_fit)
    return describe(scored.flagged, scored.rule, scored.score, scored.z_score, scored.nats_threshold,
                    scored.z_threshold, scored.forced_nats is not None,
                    decided.rule if decided.status == MISMATCH else None)


def table_verdict(flagged: bool, score: float, z_score: float | None, nats_threshold: float | None,
                  z_threshold: float | None, forced_nats: float | None = None,
                  mismatch: str | None = None) -> VerdictText:
    """The verdict of a stored row, whose rule follows from the thresholds it was decided with."""
    return describe(flagged, flag_rule(nats_threshold, z_threshold, forced_nats), score, z_score, nats_threshold,
                    z_threshold, forced_nats is not None, mismatch)


def slice_label(index: int, count: int | None = None) -> str:
    """How a slice is named to people: by its 0-based index, as in `--slices`, file names and tables."""
    return f"slice {index}" if count is None else f"slice {index} (of 0–{count - 1})"
