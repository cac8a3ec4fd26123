"""Two-stage screening: every slice gets the cheap chains, and the suspicious ones get more.

Stage 1 samples each slice with the run's settings. A slice whose stage-1 KL z-score passes the
escalation threshold gets more posterior chains: the run continues with the next random streams
(`SamplerSettings.first_sample`), so the escalated slice's run is the run of all its chains at once
(`sampler.merge_runs`), and it is scored and judged as a run of the escalated settings alone would be.
The other slices stay at stage 1 and are not flagged. Neither is a slice that stage 1 judges a prior
mismatch: it stays whatever its z-score, because a mismatched slice is never flagged.

The escalation threshold is the KL z-score that a fraction `rate` of the prior's healthy calibration
slices pass (their cross-fitted stage-1 scores, kept in calibration.json), but never above either
stage's flag threshold: a slice that either stage would flag is escalated. So a slice that stays at
stage 1 has a z-score at or below every threshold, and its verdict compares it with the escalation
threshold, the rule that decided it; its notes say it stayed (docs/screening.md). Every slice of the
run carries a `Stage` record, so the run and the slice's stage are known from its result alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from klviewer.errors import KlviewerInputError
from klviewer.inference.calibration import PriorCalibration, threshold_at_fpr
from klviewer.inference.healthy_reference import ZCalibration
from klviewer.inference.prior_fit import is_mismatch
from klviewer.inference.scoring import mismatch_rule
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.json_input import Fields

if TYPE_CHECKING:  # result.py records a slice's Stage, so it imports this module
    from klviewer.inference.result import SliceResult

DEFAULT_RATE = 0.5
"""The smallest rate at which two stages (2 then 4 bfloat16 chains) reached a dataset AUROC of 0.90 on the
phantom benchmark's tuning split, in a simulation from cached runs (benchmarks/results/two_stage/)."""


@dataclass(frozen=True)
class Escalation:
    """What a user asks for: escalate to `samples` chains in all the slices whose stage-1 KL z-score
    passes the z-score that a fraction `rate` of the healthy calibration slices pass."""

    samples: int
    rate: float = DEFAULT_RATE

    def validate(self, settings: AnalysisSettings) -> None:
        if self.samples <= settings.samples:
            raise KlviewerInputError(None, f"escalation must add chains: {self.samples} sample(s) in all against "
                                           f"{settings.samples} at stage 1")
        if not 0 < self.rate < 1:
            raise KlviewerInputError(None, f"escalation rate must be in (0, 1), got {self.rate}")
        if settings.branch_sigma is not None:
            raise KlviewerInputError(None, "escalation adds independent chains, so stage 1 cannot branch its samples")
        if settings.flag_threshold is not None:
            raise KlviewerInputError(None, "escalation decides by KL z-score, so it cannot run with a threshold in nats")

    def settings(self, settings: AnalysisSettings) -> AnalysisSettings:
        """The escalated slices' settings: stage 1's with all the chains."""
        return dataclasses.replace(settings, samples=self.samples)


@dataclass(frozen=True)
class Stage:
    """Which stage of a two-stage run decided a slice, carried by its result (`SliceResult.stage`): the run is
    known from any one of its slices, and a slice that stayed is judged by the escalation threshold."""

    escalation: Escalation
    stage1_samples: int
    threshold: float
    """The escalation threshold (KL z-score)."""
    patch: int
    sigma_window: tuple[float, float] | None
    """The map settings the slice was escalated (or not) at: the threshold holds for them alone."""
    escalated: bool

    def stage1(self, settings: AnalysisSettings) -> AnalysisSettings:
        """The run's stage-1 settings, from a result's own (`settings`, of either stage)."""
        return dataclasses.replace(settings, samples=self.stage1_samples, patch=self.patch,
                                   sigma_window=self.sigma_window)

    def decides(self, patch: int, sigma_window: tuple[float, float] | None) -> bool:
        """Whether the escalation threshold judges this slice under these map settings: it stayed at stage 1 and
        the map is the one it was judged at."""
        window = None if sigma_window is None else tuple(sigma_window)
        return not self.escalated and (patch, window) == (self.patch, self.sigma_window)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.escalation.samples, "rate": self.escalation.rate, "stage1_samples": self.stage1_samples,
                "threshold": self.threshold, "patch": self.patch,
                "sigma_window": None if self.sigma_window is None else list(self.sigma_window),
                "escalated": self.escalated}

    @classmethod
    def from_dict(cls, doc: Any, source: Path | None, prefix: str = "stage.") -> Stage:
        """Checked, because it is read from a results file anyone may have edited."""
        fields = Fields(doc, source, prefix, what="field")
        samples = fields.integer("samples", lo=2, hi=100_000)
        rate = fields.number("rate", lo=0, hi=1)
        window = None if fields.get("sigma_window") is None else fields.numbers("sigma_window", length=2, positive=True)
        return cls(Escalation(samples, rate), fields.integer("stage1_samples", lo=1, hi=samples - 1),
                   fields.number("threshold"), fields.integer("patch", lo=1, hi=8192),
                   None if window is None else (window[0], window[1]), fields.boolean("escalated"))


@dataclass(frozen=True)
class EscalationRule:
    """An escalation with its thresholds from the prior's calibration."""

    escalation: Escalation
    stage1: AnalysisSettings
    threshold: float
    """KL z-score above which a slice is escalated."""
    stage1_z: ZCalibration
    """Stage 1's healthy reference, with the escalation threshold as its threshold: a stage-1 "flag" escalates."""
    stage2_z: ZCalibration
    stage2_nats: float | None
    stage2_prior_fit: float | None

    @property
    def stage2(self) -> AnalysisSettings:
        return self.escalation.settings(self.stage1)

    @property
    def added_chains(self) -> int:
        """Posterior chains that escalating one slice adds."""
        return self.escalation.samples - self.stage1.samples

    @property
    def added_steps(self) -> int:
        """Sampler steps that escalating one slice adds (its added chains')."""
        return dataclasses.replace(self.stage1, samples=self.added_chains).step_count

    def describe(self) -> str:
        """The rule in words, as results and reports give it."""
        return (f"two stages: slices with a {self.stage1.samples}-chain KL z-score above {self.threshold:.3g} "
                f"(passed by {self.escalation.rate:.0%} of the healthy calibration slices) get "
                f"{self.escalation.samples} chains and are flagged above z {self.stage2_z.threshold:.3g}; "
                f"the others are not flagged")

    def escalates(self, stage1: SliceResult) -> bool:
        """Whether a slice gets the added chains: its stage-1 KL z-score passes the escalation threshold and the
        prior fits it. A slice the prior does not describe is never flagged, so more chains cannot change its
        verdict (on real CT under the phantom prior, every slice: docs/screening.md)."""
        return not is_mismatch(stage1.prior_fit) and stage1.z_score is not None and stage1.z_score > self.threshold

    def stayed_note(self, stage1: SliceResult) -> str:
        """Why a slice stayed at stage 1, for its notes."""
        z, fit, chains = stage1.z_score, stage1.prior_fit, f"stayed at {self.stage1.samples} chain(s)"
        if is_mismatch(fit):
            return (f"two stages: the prior does not fit this slice at stage 1 ({mismatch_rule(fit)}), so more chains "
                    f"cannot flag it and it {chains}")
        shown = "none" if z is None else f"{z:.3g}"
        return (f"two stages: stage-1 KL z-score {shown} <= {self.threshold:.3g} (escalation threshold), so this slice "
                f"{chains} and is not flagged")

    def escalated_note(self, z: float | None) -> str:
        shown = "none" if z is None else f"{z:.3g}"
        return (f"two stages: stage-1 KL z-score {shown} > {self.threshold:.3g} (escalation threshold), so this slice "
                f"got {self.escalation.samples} chains; its verdict is theirs")

    def stage(self, escalated: bool) -> Stage:
        """The record a slice of this run carries."""
        return Stage(self.escalation, self.stage1.samples, self.threshold, self.stage1.patch, self.stage1.sigma_window,
                     escalated)

    def to_dict(self) -> dict[str, object]:
        """What a results summary records about the escalation."""
        return {"samples": self.escalation.samples, "rate": self.escalation.rate, "z_threshold": self.threshold,
                "stage1_samples": self.stage1.samples, "stage2_z_threshold": self.stage2_z.threshold,
                "rule": self.describe()}


def escalation_rule(calibration: PriorCalibration, settings: AnalysisSettings, escalation: Escalation) -> EscalationRule:
    """The thresholds of `escalation` from stage 1's calibration for `settings` and stage 2's for the escalated
    settings; refused, naming the command that fills the gap, when either is missing."""
    escalation.validate(settings)
    stage2 = escalation.settings(settings)
    source = calibration.path / "calibration.json"
    stage1_z, stage2_z = calibration.z_calibration(settings), calibration.z_calibration(stage2)
    healthy = calibration.cross_fitted_z_scores(settings)
    if stage1_z is None or healthy is None:
        raise KlviewerInputError(source, f"no healthy reference with every calibration slice's z-score for stage 1 "
                                         f"({settings.describe_sampling()}); run `klviewer calibrate` with these "
                                         f"settings (and --overwrite) first")
    if stage2_z is None:
        raise KlviewerInputError(source, f"no healthy reference for the escalated settings "
                                         f"({stage2.describe_sampling()}); run `klviewer calibrate` with "
                                         f"--samples {escalation.samples} first")
    threshold = min(threshold_at_fpr(healthy, escalation.rate), stage1_z.threshold, stage2_z.threshold)
    return EscalationRule(escalation, settings, threshold, ZCalibration(stage1_z.reference, threshold), stage2_z,
                          calibration.nats_threshold(stage2), calibration.prior_fit_threshold(stage2))
