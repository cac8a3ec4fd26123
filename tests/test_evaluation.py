from pathlib import Path

import numpy as np
import pytest
import torch

from klviewer.errors import KlviewerInputError
from klviewer.evaluation.detection import BASELINES, DetectionCase, run_cases, score_method
from klviewer.evaluation.metrics import auroc, psnr_hu, roc_curve
from klviewer.inference.energy import EnergyField, patch_sums
from klviewer.inference.result import SliceResult
from klviewer.inference.settings import AnalysisSettings
from klviewer.priors import EDMUNetPrior, PriorConfig


def test_auroc_equals_pairwise_probability_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(scores, labels) == pytest.approx(brute)
    assert auroc([1, 2, 3], [False, False, False]) != auroc([1, 2, 3], [False, False, False])  # NaN
    fpr, tpr = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute)


def test_psnr_uses_the_fixed_hu_range() -> None:
    a = np.zeros((8, 8))
    assert psnr_hu(a, a + 20.0) == pytest.approx(10 * np.log10(2000**2 / 400))


def _case(kind: str, energy_map: np.ndarray, ood: np.ndarray, seed: int) -> DetectionCase:
    h, w = energy_map.shape
    field = EnergyField(energy_map[None].astype(np.float32), np.array([0.001, 10.0]))
    zero = np.zeros((h, w), np.float32)
    rng = np.random.default_rng(seed)
    result = SliceResult(
        recon_hu=zero, posterior_std_hu=rng.random((h, w)).astype(np.float32), fbp_hu=zero,
        residual_backprojection=zero, energy=field, kl_map=patch_sums(energy_map, 4), score=0.0, total_kl=0.0,
        total_kl_all_sigma=0.0, flagged=False, flag_threshold=None, pixel_spacing_mm=1.0,
        settings=AnalysisSettings(), prior_name="x", seconds=0.0,
    )
    body = np.zeros((h, w), bool)
    body[2:-2, 2:-2] = True
    return DetectionCase(kind, seed, body, ood, zero, result)


def test_a_map_that_lights_up_the_lesion_scores_perfectly() -> None:
    cases = []
    for i in range(6):
        ood = np.zeros((32, 32), bool)
        if i >= 3:
            ood[8 + i:14 + i, 10:16] = True
        cases.append(_case("healthy" if i < 3 else "lesion", 0.01 + ood.astype(float), ood, i))
    klip = score_method(cases, "klip", 4, None)
    assert klip.dataset_auroc == 1.0 and klip.localisation_auroc == 1.0
    assert len(klip.per_image_localisation) == 3
    noise = score_method(cases, "posterior_std", 4, None)
    assert noise.localisation_auroc < 0.9
    inverted = score_method(cases, "klip", 4, None, transform=lambda m: -m)
    assert inverted.localisation_auroc == 0.0, "the transform is applied before the patch sums"


def test_centre_distance_control_ranks_central_lesions_and_cannot_separate_images() -> None:
    cases = []
    for i, (top, left) in enumerate([(14, 14), (2, 2)]):
        ood = np.zeros((32, 32), bool)
        ood[top:top + 4, left:left + 4] = True
        cases.append(_case("lesion", np.ones((32, 32)), ood, i))
    cases.append(_case("healthy", np.ones((32, 32)), np.zeros((32, 32), bool), 9))
    control = score_method(cases, "centre_distance", 4, None)
    assert control.dataset_auroc == 0.5, "the same map for every image separates nothing"
    central, rim = control.per_image_localisation
    assert central == 1.0 and rim < 0.2


def test_run_cases_caches_and_refuses_a_stale_cache(tmp_path: Path) -> None:
    torch.manual_seed(0)
    prior = EDMUNetPrior(PriorConfig(name="tiny", architecture="edm-unet", image_size=(32, 32),
                                     arch={"channels": [8, 16], "emb_dim": 16, "fourier_features": 8, "groups": 4}))
    settings = AnalysisSettings(steps=3, patch=8, device="cpu")
    first = run_cases(prior, settings, n_id=1, n_ood=1, cache=tmp_path)
    assert sorted(p.name.split("_")[0] for p in tmp_path.iterdir()) == ["healthy", "lesion"]
    again = run_cases(prior, settings, n_id=1, n_ood=1, cache=tmp_path)
    assert np.array_equal(first[1].result.energy.energy, again[1].result.energy.energy)
    assert first[1].ood_mask.any() and not first[0].ood_mask.any()
    with pytest.raises(KlviewerInputError, match="other settings"):
        run_cases(prior, AnalysisSettings(steps=4, patch=8, device="cpu"), n_id=1, n_ood=0, cache=tmp_path)
    # Other map settings reuse the sampling and cut the map again.
    recut = run_cases(prior, AnalysisSettings(steps=3, patch=4, sigma_window=(0.01, 1.0), device="cpu"), n_id=1, n_ood=1,
                      cache=tmp_path)
    assert np.array_equal(recut[1].result.energy.energy, first[1].result.energy.energy)
    assert recut[1].result.kl_map.patch == 4 and recut[1].result.settings.patch == 4
    assert recut[1].result.total_kl == pytest.approx(first[1].result.energy.total((0.01, 1.0)))


def test_report_sweeps_klip_and_gives_every_baseline_per_patch_size() -> None:
    from klviewer.evaluation.report import SWEEP_PATCHES, evaluate, markdown

    ood = np.zeros((32, 32), bool)
    ood[10:14, 10:14] = True
    lesion_map = np.ones((32, 32))
    lesion_map[ood] = 50.0
    cases = [_case("lesion", lesion_map, ood, 1), _case("healthy", np.ones((32, 32)), np.zeros((32, 32), bool), 2)]
    for case in cases:
        case.reference_hu = case.result.recon_hu + 10.0
    report = evaluate(cases, AnalysisSettings(patch=4, sigma_window=None))
    assert report.scores["klip"].dataset_auroc == 1.0 and report.scores["klip"].localisation_auroc == 1.0
    assert {(r["patch"], r["method"]) for r in report.baselines} == {(p, m) for p in SWEEP_PATCHES for m in BASELINES}
    control = {r["patch"]: r["localisation_auroc"] for r in report.baselines if r["method"] == "centre_distance"}
    np.testing.assert_array_equal([r["centre_control_localisation"] for r in report.sweep],
                                  [control[r["patch"]] for r in report.sweep])  # NaN where a patch covers everything
    meta = {"command": "test", "prior": "x", "n_id": 1, "n_ood": 1, "ood_kind": "lesion", "size": 32, "device": "cpu"}
    text = markdown(report, AnalysisSettings(patch=4, sigma_window=None), meta)
    assert "; pigdm, 1 independent sample(s) x 100 steps, patch 4. Mean" in text, "the header names the chains"
    table = text.split("## Baselines over patch size")[1]
    assert "| 4 | " in table and all(m in table for m in BASELINES)
