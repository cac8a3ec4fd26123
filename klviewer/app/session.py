"""Analysis results kept for the session, and the flag thresholds that go with them.

No Qt here. Results are keyed by everything that changes the sampling run, and not by the
map settings (patch, sigma window): those are re-cut from the cached EnergyField.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from klviewer.errors import KlviewerInputError
from klviewer.inference.analysis import AnalysisSettings, SliceResult
from klviewer.inference.calibration import calibration_key, current_calibrations

MAP_ONLY_KEYS = ("patch", "sigma_window", "flag_threshold")


def sampling_key(settings: AnalysisSettings) -> tuple[tuple[str, Any], ...]:
    """The settings that need a new sampling run when they change."""
    d = settings.to_dict()
    return tuple(sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in d.items() if k not in MAP_ONLY_KEYS))


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

    def threshold(self, prior_path: Path, settings: AnalysisSettings, patch: int,
                  sigma_window: tuple[float, float]) -> float | None:
        if settings.flag_threshold is not None:
            return settings.flag_threshold
        key = calibration_key(replace(settings, patch=patch, sigma_window=tuple(sigma_window)))
        for entry in self._load(prior_path):
            if entry.get("settings") == key:
                return float(entry["threshold"])
        return None

    def calibrated_windows(self, prior_path: Path) -> list[tuple[float, float]]:
        """Sigma windows the prior was calibrated with, so the sliders can land on them exactly."""
        windows = []
        for entry in self._load(prior_path):
            window = entry.get("settings", {}).get("sigma_window")
            if isinstance(window, list) and len(window) == 2:
                windows.append((float(window[0]), float(window[1])))
        return windows
