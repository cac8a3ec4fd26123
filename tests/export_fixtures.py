"""Real results folders for the export tests: DICOM series and an array stack, analysed with the tiny prior."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klviewer.inference.settings import AnalysisSettings
from klviewer.io.dicom_write import write_ct_series
from klviewer.phantoms import make_phantom
from klviewer.results.analyze import run_analysis

SETTINGS = AnalysisSettings(steps=4, samples=1, patch=8, seed=1, device="cpu")


@dataclass
class ResultsFixture:
    root: Path
    results: Path
    sources: Path
    summary: dict

    def case_scores(self) -> dict[str, float]:
        scores: dict[str, float] = {}
        for row in self.summary["rows"]:
            scores[row["case"]] = max(scores.get(row["case"], 0.0), row["score"])
        return scores


def phantom_stack(n: int, size: int, seed: int, crop_rows: int = 0) -> np.ndarray:
    stack = np.stack([make_phantom("lesion", size, seed=seed + k).hu for k in range(n)])
    return stack[:, crop_rows:size - crop_rows, :] if crop_rows else stack


def make_results(root: Path, prior: Path, *, with_arrays: bool = True) -> ResultsFixture:
    """Three DICOM series (two patients; one non-square) and, optionally, an .npy stack, analysed."""
    sources = root / "sources"
    common = {"slice_thickness_mm": 5.0, "study_description": "export test"}
    # 40 x 48: non-square, so the map placement (padding + resampling) is exercised.
    write_ct_series(phantom_stack(2, 48, 10, crop_rows=4), sources / "jane_a", pixel_spacing_mm=8.0, patient_id="P-111",
                    patient_name="Doe^Jane", series_description="abdomen", series_number=2, **common)
    write_ct_series(phantom_stack(1, 64, 20), sources / "jane_b", pixel_spacing_mm=6.0, patient_id="P-111",
                    patient_name="Doe^Jane", series_description="abdomen late", series_number=3, **common)
    write_ct_series(phantom_stack(1, 32, 30), sources / "john", pixel_spacing_mm=12.0, patient_id="P-222",
                    patient_name="Roe^John", series_description="chest", series_number=4, **common)
    inputs = [sources / "jane_a", sources / "jane_b", sources / "john"]
    if with_arrays:
        (sources / "arrays").mkdir()
        np.save(sources / "arrays" / "stack.npy", phantom_stack(2, 32, 40))
        inputs.append(sources / "arrays" / "stack.npy")
    results = root / "results"
    run_analysis(inputs, results, SETTINGS, prior=prior)
    summary = json.loads((results / "summary.json").read_text())
    return ResultsFixture(root, results, sources, summary)


def threshold_between(scores: list[float]) -> float:
    """A threshold with some scores above and some below it."""
    ordered = sorted(scores)
    mid = len(ordered) // 2
    return (ordered[mid - 1] + ordered[mid]) / 2
