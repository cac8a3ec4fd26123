"""Flag thresholds calibrated on healthy data, stored beside a prior as calibration.json.

A threshold only means something for the settings it was measured with, so it is used only
when the analysis settings match on every key that changes the score's scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from klviewer.errors import OVERWRITE_HINT, KlviewerError, KlviewerInputError
from klviewer.inference.healthy_reference import HealthyReference, ZCalibration
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.json_input import Fields, read_json
from klviewer.io.safe_write import atomic_write_text
from klviewer.priors.checkpoint import prior_fingerprint

CALIBRATION_FILE = "calibration.json"
SCALE_KEYS = ("views", "dose_i0", "noise_sigma", "steps", "samples", "patch", "sigma_window", "guidance")


def calibration_key(settings: AnalysisSettings) -> dict[str, Any]:
    d = settings.to_dict()
    return {**{k: d[k] for k in SCALE_KEYS}, **settings.changed_extras()}


def threshold_at_fpr(healthy_scores: np.ndarray, fpr: float) -> float:
    """The smallest observed score that at most `fpr` of the healthy scores exceed (flag: score > threshold)."""
    if not 0 <= fpr < 1:
        raise KlviewerError(f"false-positive rate must be in [0, 1), got {fpr}")
    if healthy_scores.size == 0 or not np.isfinite(healthy_scores).all():
        raise KlviewerError("calibration needs finite scores from at least one healthy slice")
    ordered = np.sort(healthy_scores)
    allowed = int(np.floor(fpr * ordered.size))
    return float(ordered[ordered.size - 1 - allowed])


MAX_CALIBRATION_BYTES = 16 << 20


def read_calibrations(prior_path: Path) -> list[dict[str, Any]]:
    """The entries of the prior's calibration.json, each checked where the code relies on it:
    settings an object (its sigma window null or two numbers), a finite threshold, a string
    weights hash, a healthy reference an object (checked in full when it is used)."""
    path = prior_path / CALIBRATION_FILE
    if not (path.exists() or path.is_symlink()):
        return []
    doc = Fields(read_json(path, MAX_CALIBRATION_BYTES, "calibration file"), path, what="calibration field")
    entries = doc.items("calibrations", max_items=10_000)
    for number, raw in enumerate(entries):
        entry = Fields(raw, path, f"calibrations[{number}].", what="calibration field")
        settings = entry.section("settings")
        if settings.get("sigma_window", None) is not None:
            settings.numbers("sigma_window", length=2)
        entry.number("threshold")
        entry.text("prior_sha256", "", max_chars=128)
        if "healthy_reference" in entry:
            entry.section("healthy_reference")
    return entries


def current_calibrations(prior_path: Path) -> list[dict[str, Any]]:
    """The entries that apply to the prior's weights as they are now.

    A threshold measured with other weights (a prior retrained in place) does not apply.
    Entries without a recorded weights hash are taken as they are.
    """
    entries = read_calibrations(prior_path)
    if not any("prior_sha256" in e for e in entries):
        return entries
    fingerprint = prior_fingerprint(prior_path)
    return [e for e in entries if e.get("prior_sha256", fingerprint) == fingerprint]


@dataclass
class PriorCalibration:
    """A prior's calibration entries that hold for its weights as they are now, read once.

    A threshold or healthy reference holds only for the exact settings it was calibrated with,
    patch and sigma window included.
    """

    path: Path
    """The prior folder."""
    entries: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, prior_path: Path) -> PriorCalibration:
        return cls(prior_path, current_calibrations(prior_path))

    def entry(self, settings: AnalysisSettings) -> dict[str, Any] | None:
        key = calibration_key(settings)
        return next((e for e in self.entries if e.get("settings") == key), None)

    def nats_threshold(self, settings: AnalysisSettings) -> float | None:
        """The calibrated threshold in nats for these settings, or None when there is none."""
        entry = self.entry(settings)
        return None if entry is None else float(entry["threshold"])

    def z_calibration(self, settings: AnalysisSettings) -> ZCalibration | None:
        """The healthy reference and z threshold for these settings, or None when they were not calibrated."""
        entry = self.entry(settings)
        return None if entry is None else z_calibration_of(entry, self.path / CALIBRATION_FILE)

    def cross_fitted_z_scores(self, settings: AnalysisSettings) -> np.ndarray | None:
        """The healthy calibration slices' cross-fitted KL z-scores for these settings, or None when the
        entry has none (calibrated before klviewer kept them, or without a healthy reference)."""
        entry = self.entry(settings)
        if entry is None or "cross_fitted_z_scores" not in entry.get("healthy_reference", {}):
            return None
        fields = Fields(entry["healthy_reference"], self.path / CALIBRATION_FILE, "healthy_reference.",
                        what="calibration field")
        scores = np.asarray(fields.numbers("cross_fitted_z_scores", max_items=100_000), np.float64)
        if scores.size == 0:
            raise KlviewerInputError(self.path / CALIBRATION_FILE, "healthy_reference.cross_fitted_z_scores lists no score")
        return scores

    def prior_fit_threshold(self, settings: AnalysisSettings) -> float | None:
        """The prior-fit threshold (KL per body pixel) for these settings, or None when it was not calibrated."""
        entry = self.entry(settings)
        if entry is None or not isinstance(entry.get("prior_fit"), dict):
            return None
        try:
            value = float(entry["prior_fit"]["threshold"])
        except (KeyError, TypeError, ValueError) as exc:
            raise KlviewerInputError(self.path / CALIBRATION_FILE, f"prior_fit without a usable threshold ({exc})") from exc
        if not value > 0 or value == float("inf"):
            raise KlviewerInputError(self.path / CALIBRATION_FILE, f"prior_fit threshold must be positive, got {value}")
        return value

    def windows(self) -> list[tuple[float, float]]:
        """Sigma windows the prior was calibrated with, so the sliders can land on them exactly."""
        windows = []
        for entry in self.entries:
            window = entry.get("settings", {}).get("sigma_window")
            if isinstance(window, list) and len(window) == 2:
                windows.append((float(window[0]), float(window[1])))
        return windows


def flag_threshold_for(prior_path: Path, settings: AnalysisSettings) -> float | None:
    """The calibrated threshold for these settings, or None when there is none."""
    return PriorCalibration.read(prior_path).nats_threshold(settings)


def z_calibration_for(prior_path: Path, settings: AnalysisSettings) -> ZCalibration | None:
    """The healthy reference and z threshold for these settings, or None when they were not calibrated."""
    return PriorCalibration.read(prior_path).z_calibration(settings)


def z_calibration_of(entry: dict[str, Any], source: Path) -> ZCalibration | None:
    """An entry's healthy reference and z threshold (None when it has none), checked against the
    settings it is stored under, because anyone may have edited the file."""
    if "healthy_reference" not in entry:
        return None
    doc = entry["healthy_reference"]
    fields = Fields(doc, source, "healthy_reference.", what="calibration field")
    threshold = fields.number("z_threshold")
    patch, window = entry["settings"].get("patch"), entry["settings"].get("sigma_window")
    reference = HealthyReference.from_dict(doc, source)
    stored = None if window is None else tuple(float(v) for v in window)
    if reference.patch != patch or reference.sigma_window != stored:
        raise KlviewerInputError(source, f"healthy reference was fitted for patch {reference.patch} and window "
                                         f"{reference.sigma_window}, but is stored under patch {patch}, window {window}")
    return ZCalibration(reference, threshold)


def write_calibration(prior_path: Path, entry: dict[str, Any], overwrite: bool = False) -> Path:
    """Add `entry` (with its "settings" key) to the prior's calibration.json, atomically.

    Entries for other settings are kept. An entry for the same settings is replaced only with
    `overwrite`, because a threshold in use should not change silently.
    """
    entries = read_calibrations(prior_path)
    same = [e for e in entries if e.get("settings") == entry["settings"]]
    if same and not overwrite:
        raise KlviewerError(f"{prior_path / CALIBRATION_FILE}: already holds a threshold ({same[0].get('threshold')}) "
                            f"for these settings; {OVERWRITE_HINT}")
    kept = [e for e in entries if e.get("settings") != entry["settings"]]
    doc = {"calibrations": [*kept, entry]}
    return atomic_write_text(prior_path / CALIBRATION_FILE, json.dumps(doc, indent=2) + "\n", overwrite=True)
