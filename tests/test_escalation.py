"""Two-stage screening: chains added to a run are the run of all chains at once, and an escalated
slice gets exactly the verdict that the escalated settings give it alone."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from benchmark_modules import load_benchmark
from conftest import TINY_PRIOR_SIZE

from klviewer.cli import main
from klviewer.errors import KlviewerInputError
from klviewer.evaluation.calibrate import calibrate_prior
from klviewer.export.exporter import export_results
from klviewer.export.pdf_report import ReportContext, report_sections
from klviewer.inference import pipeline
from klviewer.inference.calibration import CALIBRATION_FILE, threshold_at_fpr
from klviewer.inference.escalation import Escalation, Stage, escalation_rule
from klviewer.inference.measurements import collect_measurements, ct_measurement_model
from klviewer.inference.pipeline import LoadedPrior, analyze_measurements
from klviewer.inference.sampler import SamplerSettings, merge_runs, posterior_sample_slices
from klviewer.inference.scoring import MISMATCH
from klviewer.inference.settings import AnalysisSettings
from klviewer.phantoms import make_phantom
from klviewer.results.reader import read_results
from klviewer.results.slice_file import load_slice_result

STAGE1 = AnalysisSettings(views=12, steps=6, samples=1, patch=4, sigma_window=(0.01, 0.5), noise_sigma=0.02, device="cpu")
ESCALATION = Escalation(samples=3, rate=0.5)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("two-stage-study")
    kinds = [("healthy", 15), ("lesion", 16), ("healthy", 17), ("lesion", 18), ("lesion", 19), ("healthy", 20)]
    hu = np.stack([make_phantom(kind, TINY_PRIOR_SIZE, seed).hu for kind, seed in kinds]).astype(np.float32)
    np.save(folder / "six.npy", hu)
    return folder


@pytest.fixture(scope="module")
def calibrated(tiny_prior: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny prior calibrated for both stages on 8 healthy phantoms."""
    prior = Path(shutil.copytree(tiny_prior, tmp_path_factory.mktemp("two-stage") / "tiny"))
    calibrate_prior(prior, STAGE1, n=8, fpr=0.125)
    calibrate_prior(prior, ESCALATION.settings(STAGE1), n=8, fpr=0.125)
    return prior


def test_added_chains_make_the_run_of_all_chains(tiny_prior: Path, study: Path) -> None:
    loaded = LoadedPrior.load(tiny_prior, "cpu")
    measured = collect_measurements([study], loaded.prior, STAGE1, slices="0-1").slices
    models = [ct_measurement_model(m.prepared.acquisition, loaded.prior) for m in measured]
    seeds = [m.prepared.slice_seed for m in measured]
    whole = posterior_sample_slices(loaded.prior, models, SamplerSettings(steps=6, samples=4), seeds)
    first = posterior_sample_slices(loaded.prior, models, SamplerSettings(steps=6, samples=2), seeds)
    more = posterior_sample_slices(loaded.prior, models, SamplerSettings(steps=6, samples=2, first_sample=2), seeds)
    for all_at_once, a, b in zip(whole, first, more):
        merged = merge_runs(a, b)
        assert merged.settings == all_at_once.settings and merged.energy.samples == 4
        scale = all_at_once.energy.energy.max()
        np.testing.assert_allclose(merged.energy.energy, all_at_once.energy.energy, rtol=1e-3, atol=1e-4 * scale)
        np.testing.assert_allclose(merged.mean, all_at_once.mean, atol=1e-4)
        np.testing.assert_allclose(merged.std, all_at_once.std, atol=1e-4)
        assert merged.evaluations == pytest.approx(all_at_once.evaluations)
        # the added chains are other chains: pooling the same ones twice would leave the spread unchanged
        assert not np.allclose(b.mean, a.mean, atol=1e-3)
    with pytest.raises(ValueError, match="does not continue"):
        merge_runs(first[0], first[1])
    with pytest.raises(KlviewerInputError, match="first_sample"):
        SamplerSettings(first_sample=2, branch_sigma=0.5, branch_steps=3).validate()


def test_escalation_threshold_is_the_rate_capped_by_both_flag_thresholds(calibrated: Path) -> None:
    calibration = LoadedPrior.load(calibrated, "cpu").calibration
    healthy = calibration.cross_fitted_z_scores(STAGE1)
    assert healthy is not None and healthy.size == 8
    stage1, stage2 = calibration.z_calibration(STAGE1), calibration.z_calibration(ESCALATION.settings(STAGE1))
    for rate in (0.05, 0.5, 0.9):
        rule = escalation_rule(calibration, STAGE1, Escalation(3, rate))
        assert rule.threshold == min(threshold_at_fpr(healthy, rate), stage1.threshold, stage2.threshold)
        assert rule.stage1_z.threshold == rule.threshold and rule.stage2_z.threshold == stage2.threshold
    assert escalation_rule(calibration, STAGE1, Escalation(3, 0.9)).threshold < stage1.threshold


def test_escalated_slices_get_their_all_chain_verdict_and_the_others_stay(calibrated: Path, study: Path) -> None:
    loaded = LoadedPrior.load(calibrated, "cpu")
    measurements = collect_measurements([study], loaded.prior, STAGE1)
    rule = escalation_rule(loaded.calibration, STAGE1, ESCALATION)
    stage1 = [r for _m, r in analyze_measurements(measurements, loaded, STAGE1, slice_batch=3)]
    stage2 = [r for _m, r in analyze_measurements(measurements, loaded, ESCALATION.settings(STAGE1), slice_batch=3)]
    seen: list[tuple[int, int]] = []
    two = [r for _m, r in analyze_measurements(measurements, loaded, STAGE1, slice_batch=3, escalation=ESCALATION,
                                               progress=lambda d, t: seen.append((d, t)))]
    up = [r1.z_score > rule.threshold for r1 in stage1]
    assert 0 < sum(up) < len(up), "the study must have slices on both sides of the escalation threshold"
    for escalated, r1, r2, result in zip(up, stage1, stage2, two):
        if escalated:
            assert result.settings == r2.settings and result.z_threshold == r2.z_threshold
            assert result.z_score == pytest.approx(r2.z_score, rel=1e-3, abs=1e-3)
            assert result.flagged == r2.flagged and result.verdict() == r2.verdict()
            np.testing.assert_allclose(result.energy.energy, r2.energy.energy, rtol=1e-3,
                                       atol=1e-4 * r2.energy.energy.max())
            assert "got 3 chains" in result.notes[-1]
        else:
            assert result.settings == r1.settings and result.z_threshold == rule.threshold
            assert result.z_score == pytest.approx(r1.z_score, rel=1e-5)
            assert not result.flagged and f"<= {rule.threshold:.3g}" in result.verdict().rule
            assert "stayed at 1 chain" in result.notes[-1]
    done, total = seen[-1]
    assert done == total == len(up) * STAGE1.step_count + sum(up) * 2 * STAGE1.steps
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_slice_the_prior_does_not_fit_stays_at_stage_one(calibrated: Path, study: Path, tmp_path: Path) -> None:
    prior = Path(shutil.copytree(calibrated, tmp_path / "prior"))
    loaded = LoadedPrior.load(prior, "cpu")
    measurements = collect_measurements([study], loaded.prior, STAGE1)
    rule = escalation_rule(loaded.calibration, STAGE1, ESCALATION)
    stage1 = [r for _m, r in analyze_measurements(measurements, loaded, STAGE1, slice_batch=3)]
    up = [r.z_score > rule.threshold for r in stage1]
    # A run judges prior fit by stage 2's threshold; put it just under the highest-scoring escalating slice's score.
    threshold = 0.999 * max(r.prior_fit_score for r, u in zip(stage1, up) if u)
    doc = json.loads((prior / CALIBRATION_FILE).read_text())
    [entry] = [e for e in doc["calibrations"] if e["settings"]["samples"] == ESCALATION.samples]
    entry["prior_fit"] = {**entry.get("prior_fit", {}), "threshold": threshold}
    (prior / CALIBRATION_FILE).write_text(json.dumps(doc))
    loaded = LoadedPrior.load(prior, "cpu")
    seen: list[tuple[int, int]] = []
    two = [r for _m, r in analyze_measurements(measurements, loaded, STAGE1, slice_batch=3, escalation=ESCALATION,
                                               progress=lambda d, t: seen.append((d, t)))]
    mismatched = [r.prior_fit_score > threshold for r in stage1]
    assert any(u and m for u, m in zip(up, mismatched)), "an escalating slice must be a mismatch"
    for u, m, r1, result in zip(up, mismatched, stage1, two):
        assert result.stage is not None and result.stage.escalated == (u and not m)
        if m:
            assert result.settings == r1.settings and result.z_score == pytest.approx(r1.z_score, rel=1e-5)
            assert not result.prior_fit.fits and not result.flagged and result.verdict().status == MISMATCH
            assert "the prior does not fit this slice" in result.notes[-1] and "stayed at 1 chain" in result.notes[-1]
    escalated = sum(u and not m for u, m in zip(up, mismatched))
    assert seen[-1] == (len(up) * STAGE1.step_count + escalated * 2 * STAGE1.steps,) * 2


def test_escalation_is_refused_without_what_it_needs(calibrated: Path, tiny_prior: Path) -> None:
    calibration = LoadedPrior.load(calibrated, "cpu").calibration
    with pytest.raises(KlviewerInputError, match="--samples 5"):
        escalation_rule(calibration, STAGE1, Escalation(5))
    with pytest.raises(KlviewerInputError, match="calibrate"):
        escalation_rule(LoadedPrior.load(tiny_prior, "cpu").calibration, STAGE1, ESCALATION)
    for bad, match in [(Escalation(1), "must add chains"), (Escalation(3, 1.0), "rate"),
                       (Escalation(3, 0.0), "rate")]:
        with pytest.raises(KlviewerInputError, match=match):
            escalation_rule(calibration, STAGE1, bad)
    with pytest.raises(KlviewerInputError, match="nats"):
        escalation_rule(calibration, dataclasses.replace(STAGE1, flag_threshold=3.0), ESCALATION)


def test_a_calibration_without_every_slice_z_score_cannot_escalate(calibrated: Path, tmp_path: Path) -> None:
    prior = Path(shutil.copytree(calibrated, tmp_path / "old"))
    doc = json.loads((prior / CALIBRATION_FILE).read_text())
    for entry in doc["calibrations"]:
        entry["healthy_reference"].pop("cross_fitted_z_scores", None)
    (prior / CALIBRATION_FILE).write_text(json.dumps(doc))
    with pytest.raises(KlviewerInputError, match="every calibration slice's z-score"):
        escalation_rule(LoadedPrior.load(prior, "cpu").calibration, STAGE1, ESCALATION)
    doc["calibrations"][0]["healthy_reference"]["cross_fitted_z_scores"] = ["1.0"]
    (prior / CALIBRATION_FILE).write_text(json.dumps(doc))
    with pytest.raises(KlviewerInputError, match="cross_fitted_z_scores"):
        escalation_rule(LoadedPrior.load(prior, "cpu").calibration, STAGE1, ESCALATION)


def test_analyze_and_batch_run_two_stages_and_record_them(calibrated: Path, study: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    options = ["--prior", str(calibrated), "--views", "12", "--noise", "0.02", "--steps", "6", "--samples", "1",
               "--patch", "4", "--sigma-window", "0.01", "0.5", "--device", "cpu", "--quiet"]
    assert main(["analyze", str(study), "--out", str(tmp_path / "two"), *options, "--escalate", "3"]) == 0
    printed = capsys.readouterr().out
    results = read_results(tmp_path / "two")
    rows = [s.row for c in results.cases for s in c.slices]
    rule = escalation_rule(LoadedPrior.load(calibrated, "cpu").calibration, STAGE1, ESCALATION)
    summary = results.summary
    assert summary["escalation"] == rule.to_dict() and summary["z_threshold"] == rule.stage2_z.threshold
    assert f"{sum(r['escalated'] for r in rows)} of 6 slice(s) escalated to 3 chains" in printed
    assert f"rule: {rule.describe()}" in printed
    for row in rows:
        stored = load_slice_result(tmp_path / "two" / row["file"])
        assert row["samples"] == stored.settings.samples == (3 if row["escalated"] else 1)
        assert row["z_threshold"] == stored.z_threshold == (rule.stage2_z.threshold if row["escalated"] else rule.threshold)
        assert row["verdict"] == stored.verdict().status
        assert stored.stage == rule.stage(escalated=row["escalated"])
    csv_rows = list(csv.DictReader((tmp_path / "two" / "summary.csv").open()))
    assert [r["escalated"] for r in csv_rows] == [str(r["escalated"]) for r in rows]
    # the export's verdict of a slice names the threshold that decided it
    export_results(tmp_path / "two", tmp_path / "export", flagged_only=False, formats=("csv",))
    cases = json.loads((tmp_path / "export" / "cases.json").read_text())
    stayed = next(r for r in rows if not r["escalated"])
    exported = next(s for c in cases["cases"] for s in c["slices"] if s["slice_index"] == stayed["slice_index"])
    assert exported["verdict"] == "not flagged"
    case = results.cases[0]
    ctx = ReportContext(case=case, patient="", flagged_slices={s.slice_index for s in case.slices if s.flagged},
                        threshold=None, threshold_source="", note="", settings=results.settings, prior=results.prior,
                        analysis_version="", analysis_date="", export_date="", z_threshold=results.z_threshold,
                        escalation=summary["escalation"]["rule"])
    sections = dict(report_sections(ctx))
    assert " ".join(sections["Sampler"]).count("two stages: slices with a 1-chain KL z-score above") == 1
    assert [line.endswith("escalated") for line in sections["Slices"]] == [r["escalated"] for r in rows]
    # one stage: no escalation recorded, and the rows say so
    assert main(["analyze", str(study), "--out", str(tmp_path / "one"), *options]) == 0
    one = read_results(tmp_path / "one")
    assert one.summary["escalation"] is None and all(s.row["escalated"] is None for s in one.cases[0].slices)
    capsys.readouterr()
    assert main(["analyze", str(study), "--out", str(tmp_path / "x"), *options, "--escalate-rate", "0.3"]) != 0
    assert "--escalate-rate goes with --escalate" in capsys.readouterr().err
    # batch: the same two stages, recorded in the manifest, so a resume with other settings is refused
    assert main(["batch", str(study), "--out", str(tmp_path / "batch"), *options, "--escalate", "3"]) == 0
    manifest = json.loads((tmp_path / "batch" / "manifest.json").read_text())
    assert manifest["config"]["settings"]["escalation"] == {"samples": 3, "rate": 0.5}
    batch_rows = [s.row for c in read_results(next((tmp_path / "batch" / "studies").iterdir())).cases for s in c.slices]
    assert [r["escalated"] for r in batch_rows] == [r["escalated"] for r in rows]
    assert main(["batch", str(study), "--out", str(tmp_path / "batch"), *options, "--escalate", "3",
                 "--escalate-rate", "0.3"]) != 0
    assert "escalation {'samples': 3, 'rate': 0.5} then, {'samples': 3, 'rate': 0.3} now" in capsys.readouterr().err


def test_the_two_stage_benchmark_scores_the_product_run(calibrated: Path, tmp_path: Path) -> None:
    bench = load_benchmark("bench_two_stage.py")
    out = tmp_path / "two_stage.md"
    stage1 = "--views 12 --noise 0.02 --steps 6 --samples 1 --patch 4 --sigma-window 0.01 0.5"
    assert bench.main(["--splits", "1", "--n", "3", "--options", stage1, "--escalate", "3", "--prior", str(calibrated),
                       "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    (row,) = doc["rows"]
    assert row["slices"] == 6 and 0 <= row["dataset_auroc"] <= 1
    assert row["chains_healthy"] == pytest.approx(1 + 2 * row["escalated_healthy"])
    assert row["chains_mix"] == pytest.approx(1 + (row["escalated_healthy"] + row["escalated_lesion"]))
    # only escalated slices can be flagged
    assert row["flagged_healthy"] <= round(3 * row["escalated_healthy"])
    assert row["flagged_lesion"] <= round(3 * row["escalated_lesion"])
    assert doc["escalation"]["samples"] == 3 and len(doc["bare_100_forwards_seconds"]) == 6
    assert f"| 1 | {row['dataset_auroc']:.3f} |" in out.read_text()


def test_the_series_benchmark_times_two_stages(calibrated: Path, tmp_path: Path) -> None:
    bench = load_benchmark("bench_screening.py")
    out = tmp_path / "series.md"
    stage1 = "--views 12 --noise 0.02 --steps 6 --samples 1 --patch 4 --sigma-window 0.01 0.5"
    assert bench.main(["series", "--slices", "4", "--batches", "2", "--prior", str(calibrated), "--out", str(out),
                       f"one={stage1}", f"two={stage1} --escalate 3", f"own prior={stage1} --prior {calibrated}"]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| one") or line.startswith("| two")]
    assert len(rows) == 2 and rows[0].endswith("| – |")
    # A setting may run its own prior (a smaller one, say); its row is timed like the others.
    assert any(line.startswith(f"| own prior `{stage1} --prior {calibrated}` | 2 |") for line in out.read_text().splitlines())
    assert bench.parsed_options(f"{stage1} --prior {calibrated}").prior == str(calibrated)
    escalated = int(rows[1].rsplit("|", 2)[1].split(" of ")[0])
    settings, escalation = bench.options_of(f"{stage1} --escalate 3")
    assert escalation == Escalation(3) and settings == STAGE1
    assert rows[1].endswith(f"| {escalated} of 4 |") and 0 <= escalated <= 4


@pytest.mark.parametrize("bad, match", [
    ({"samples": 1}, "samples"), ({"stage1_samples": 4}, "stage1_samples"), ({"rate": "0.5"}, "rate"),
    ({"threshold": float("nan")}, "threshold"), ({"escalated": 1}, "escalated"), ({"patch": 0}, "patch"),
    ({"sigma_window": [0.01]}, "sigma_window"), ("two stages", "stage"),
])
def test_a_hostile_stage_record_is_refused_naming_the_field(bad: object, match: str, tmp_path: Path) -> None:
    good = Stage(Escalation(4), 2, 5.41, 4, (0.01, 0.05), False)
    assert Stage.from_dict(good.to_dict(), tmp_path) == good
    doc = {**good.to_dict(), **bad} if isinstance(bad, dict) else bad
    with pytest.raises(KlviewerInputError, match=match):
        Stage.from_dict(doc, tmp_path)


def test_stage_two_pools_escalated_slices_to_fill_its_passes(calibrated: Path, study: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = LoadedPrior.load(calibrated, "cpu")
    measurements = collect_measurements([study], loaded.prior, STAGE1)
    pooled_sizes: list[int] = []
    add_chains = pipeline._add_chains

    def recording(waiting, *args, **kwargs):
        pooled_sizes.append(len(waiting))
        return add_chains(waiting, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_add_chains", recording)
    # one chain per pass: each escalated slice's two added chains fill a pass at once
    alone = [r for _m, r in analyze_measurements(measurements, loaded, STAGE1, slice_batch=1, escalation=ESCALATION)]
    escalated = sum(r.stage.escalated for r in alone)
    assert pooled_sizes == [1] * escalated and 0 < escalated < len(alone)
    # four chains per pass (batches of 4 + 2 slices): escalated slices wait for a second one across batches
    pooled_sizes.clear()
    pooled = [(m.index, r) for m, r in analyze_measurements(measurements, loaded, STAGE1, slice_batch=4,
                                                             escalation=ESCALATION)]
    assert [i for i, _ in pooled] == list(range(6)), "results come in order"
    assert sum(pooled_sizes) == escalated and all(size >= 2 for size in pooled_sizes[:-1])
    for a, (_i, b) in zip(alone, pooled):
        assert a.settings == b.settings and a.stage == b.stage
        assert b.z_score == pytest.approx(a.z_score, rel=1e-3, abs=1e-3)
