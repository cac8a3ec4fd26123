"""Analysis results kept for the session, and the flag thresholds that go with them.

No Qt here. Results are keyed by everything that changes the sampling run, and not by the
map settings (patch, sigma window): those are re-cut from the cached EnergyField.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from klviewer.errors import KlviewerInputError
from klviewer.inference.analysis import AnalysisSettings, SliceResult, sampling_key
from klviewer.inference.calibration import CALIBRATION_FILE, calibration_key, current_calibrations, z_calibration_of
from klviewer.inference.healthy_reference import ZCalibration


@dataclass(frozen=True)
class ResultKey:
    series_uid: str
    slice_index: int
    prior: str
    sampling: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, series_uid: str, slice_index: int, prior_path: Path, settings: AnalysisSettings) -> ResultKey:
        return cls(series_uid, slice_index, str(prior_path), sampling_key(settings))


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
    """Calibrated flag thresholds per prior, read once per prior folder.

    A threshold holds only for the exact settings it was calibrated with, patch and sigma
    window included, so moving the map sliders away from them leaves a slice without one.
    """

    _entries: dict[Path, list[dict[str, Any]]] = field(default_factory=dict)

    def _load(self, prior_path: Path) -> list[dict[str, Any]]:
        if prior_path not in self._entries:
            try:
                self._entries[prior_path] = current_calibrations(prior_path)
            except (KlviewerInputError, OSError):
                self._entries[prior_path] = []  # an unreadable calibration means: not calibrated
        return self._entries[prior_path]

    def _entry(self, prior_path: Path, settings: AnalysisSettings, patch: int,
               sigma_window: tuple[float, float]) -> dict[str, Any] | None:
        key = calibration_key(replace(settings, patch=patch, sigma_window=tuple(sigma_window)))
        return next((e for e in self._load(prior_path) if e.get("settings") == key), None)

    def threshold(self, prior_path: Path, settings: AnalysisSettings, patch: int,
                  sigma_window: tuple[float, float]) -> float | None:
        if settings.flag_threshold is not None:
            return settings.flag_threshold
        entry = self._entry(prior_path, settings, patch, sigma_window)
        return None if entry is None else float(entry["threshold"])

    def z_calibration(self, prior_path: Path, settings: AnalysisSettings, patch: int,
                      sigma_window: tuple[float, float]) -> ZCalibration | None:
        """The healthy reference for these map settings; none while a threshold in nats is forced."""
        entry = self._entry(prior_path, settings, patch, sigma_window)
        if settings.flag_threshold is not None or entry is None:
            return None
        try:
            return z_calibration_of(entry, prior_path / CALIBRATION_FILE)
        except KlviewerInputError:
            return None  # a damaged reference means: no reference, as for the thresholds

    def calibrated_windows(self, prior_path: Path) -> list[tuple[float, float]]:
        """Sigma windows the prior was calibrated with, so the sliders can land on them exactly."""
        windows = []
        for entry in self._load(prior_path):
            window = entry.get("settings", {}).get("sigma_window")
            if isinstance(window, list) and len(window) == 2:
                windows.append((float(window[0]), float(window[1])))
        return windows
