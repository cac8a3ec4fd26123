"""Analysis results kept for the session, and the calibrations that go with them.

No Qt here. Results are keyed by everything that changes the sampling run, and not by the
map settings (patch, sigma window): those are re-cut from the cached EnergyField.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from klviewer.errors import KlviewerInputError
from klviewer.inference.calibration import PriorCalibration, calibration_key
from klviewer.inference.escalation import Escalation
from klviewer.inference.healthy_reference import ZCalibration
from klviewer.inference.result import SliceResult
from klviewer.inference.settings import MAP_ONLY_KEYS, AnalysisSettings, sampling_key


@dataclass(frozen=True)
class ResultKey:
    series_uid: str
    slice_index: int
    prior: str
    sampling: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, series_uid: str, slice_index: int, prior_path: Path, settings: AnalysisSettings,
           escalation: Escalation | None = None) -> ResultKey:
        return cls(series_uid, slice_index, str(prior_path), run_sampling_key(settings, escalation))


def run_sampling_key(settings: AnalysisSettings, escalation: Escalation | None = None) -> tuple[tuple[str, Any], ...]:
    """What a run is known by: its sampling settings; a two-stage run (`escalation`) is another run than its stage 1
    alone, and which slices it escalates depends on the map settings too."""
    if escalation is None:
        return sampling_key(settings)
    window = None if settings.sigma_window is None else tuple(settings.sigma_window)
    return sampling_key(settings) + (("escalation", (escalation.samples, escalation.rate, settings.patch, window)),)


def run_of(result: SliceResult) -> tuple[AnalysisSettings, Escalation | None]:
    """The settings and escalation of the run that made `result`: a two-stage run's slices carry either stage's
    settings, and their `stage` record names the run's stage 1 and escalation."""
    if result.stage is None:
        return result.settings, None
    return result.stage.stage1(result.settings), result.stage.escalation


@dataclass
class CachedResult:
    result: SliceResult
    prior_path: Path


@dataclass
class ResultCache:
    """Every result of the session, and which one is the latest for each slice."""

    _by_key: dict[ResultKey, CachedResult] = field(default_factory=dict)
    _latest: dict[tuple[str, int], ResultKey] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._by_key)

    def put(self, key: ResultKey, result: SliceResult, prior_path: Path) -> None:
        self._by_key[key] = CachedResult(result, prior_path)
        self._latest[(key.series_uid, key.slice_index)] = key

    def get(self, key: ResultKey) -> CachedResult | None:
        return self._by_key.get(key)

    def latest(self, series_uid: str, slice_index: int) -> CachedResult | None:
        """The newest result for a slice whatever its settings: going back to a slice shows it at once."""
        key = self._latest.get((series_uid, slice_index))
        return None if key is None else self._by_key[key]


@dataclass
class FlagThresholds:
    """Each prior's calibration, read once per prior folder, asked for the map sliders' settings.

    A threshold holds only for the exact settings it was calibrated with, patch and sigma
    window included, so moving the map sliders away from them leaves a slice without one. An
    unreadable calibration means: not calibrated.
    """

    _calibrations: dict[Path, PriorCalibration] = field(default_factory=dict)

    def calibration(self, prior_path: Path) -> PriorCalibration:
        if prior_path not in self._calibrations:
            try:
                self._calibrations[prior_path] = PriorCalibration.read(prior_path)
            except (KlviewerInputError, OSError):
                self._calibrations[prior_path] = PriorCalibration(prior_path)
        return self._calibrations[prior_path]

    def threshold(self, prior_path: Path, settings: AnalysisSettings, patch: int,
                  sigma_window: tuple[float, float]) -> float | None:
        if settings.flag_threshold is not None:
            return settings.flag_threshold
        at = replace(settings, patch=patch, sigma_window=tuple(sigma_window))
        return self.calibration(prior_path).nats_threshold(at)

    def z_calibration(self, prior_path: Path, settings: AnalysisSettings, patch: int,
                      sigma_window: tuple[float, float]) -> ZCalibration | None:
        """The healthy reference for these map settings; none while a threshold in nats is forced."""
        if settings.flag_threshold is not None:
            return None
        try:
            return self.calibration(prior_path).z_calibration(replace(settings, patch=patch, sigma_window=tuple(sigma_window)))
        except KlviewerInputError:
            return None  # a damaged reference means: no reference, as for the thresholds

    def calibrated_maps(self, prior_path: Path, settings: AnalysisSettings) -> list[tuple[int, tuple[float, float]]]:
        """(patch, sigma window) pairs the prior was calibrated with for this run's sampling settings."""
        run = calibration_key(settings)
        maps = []
        for entry in self.calibration(prior_path).entries:
            key = entry.get("settings", {})
            window = key.get("sigma_window")
            if _sampling_part(key) == _sampling_part(run) and isinstance(window, list) and len(window) == 2:
                maps.append((int(key["patch"]), (float(window[0]), float(window[1]))))
        return maps

    def calibrated_windows(self, prior_path: Path) -> list[tuple[float, float]]:
        """Sigma windows the prior was calibrated with, so the sliders can land on them exactly."""
        return self.calibration(prior_path).windows()


def _sampling_part(key: dict) -> dict:
    """A calibration key without its map settings: what one sampling run fixes."""
    return {k: v for k, v in key.items() if k not in MAP_ONLY_KEYS}
