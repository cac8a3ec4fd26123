"""Flag thresholds calibrated on healthy data, stored beside a prior as calibration.json.

A threshold only means something for the settings it was measured with, so it is used only
when the analysis settings match on every key that changes the score's scale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from klviewer.errors import KlviewerInputError
from klviewer.inference.analysis import AnalysisSettings

CALIBRATION_FILE = "calibration.json"
SCALE_KEYS = ("views", "dose_i0", "noise_sigma", "steps", "samples", "patch", "sigma_window", "guidance")


def calibration_key(settings: AnalysisSettings) -> dict[str, Any]:
    d = settings.to_dict()
    return {k: d[k] for k in SCALE_KEYS}


def read_calibrations(prior_path: Path) -> list[dict[str, Any]]:
    path = prior_path / CALIBRATION_FILE
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        entries = doc["calibrations"]
        if not isinstance(entries, list):
            raise TypeError("'calibrations' must be a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KlviewerInputError(path, f"unreadable calibration file ({exc})") from exc
    return entries


def flag_threshold_for(prior_path: Path, settings: AnalysisSettings) -> float | None:
    """The calibrated threshold for these settings, or None when there is none."""
    key = calibration_key(settings)
    for entry in read_calibrations(prior_path):
        if entry.get("settings") == key:
            return float(entry["threshold"])
    return None

