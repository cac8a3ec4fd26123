"""benchmarks/bench_reference_scoring.py: one evaluate cache scored by the quantile and the mean-and-spread reference."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from benchmark_modules import load_benchmark  # noqa: E402

from klviewer.evaluation.detection import CALIBRATION_SEED_BASE, healthy_slices, run_cases, score_z  # noqa: E402
from klviewer.inference.healthy_reference import fit_reference  # noqa: E402
from klviewer.inference.settings import AnalysisSettings  # noqa: E402
from klviewer.priors import EDMUNetPrior, PriorConfig  # noqa: E402


def test_both_references_score_the_same_cached_runs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    prior = EDMUNetPrior(PriorConfig(name="tiny", architecture="edm-unet", image_size=(32, 32),
                                     arch={"channels": [8, 16], "emb_dim": 16, "fourier_features": 8, "groups": 4}))
    settings = AnalysisSettings(steps=3, patch=4, sigma_window=(0.01, 1.0), device="cpu")
    cache = tmp_path / "cache"
    cache.mkdir()
    split = run_cases(prior, settings, n_id=2, n_ood=2, seed=1, cache=cache)
    reference = run_cases(prior, settings, n_id=6, n_ood=0, seed_base=CALIBRATION_SEED_BASE, cache=cache)
    bench = load_benchmark("bench_reference_scoring.py")
    out = tmp_path / "table.md"
    assert bench.main([str(cache), "--splits", "1", "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    quantiles = fit_reference(healthy_slices(reference), 4, (0.01, 1.0))
    assert quantiles.quantiles is not None
    for name, ref in (("bin quantiles (now)", quantiles),
                      ("bin mean and spread (before)", replace(quantiles, quantiles=None, normal_scores=None))):
        expected = score_z(split, ref)
        row = doc["results"][name]
        assert row["1"]["dataset_auroc"] == pytest.approx(expected.dataset_auroc, nan_ok=True)
        assert row["pooled"]["localisation_auroc"] == pytest.approx(np.mean(expected.per_image_localisation))
    assert "| bin quantiles (now) |" in out.read_text()
    with pytest.raises(SystemExit):
        bench.main([str(cache), "--splits", "3", "--out", str(out)])
