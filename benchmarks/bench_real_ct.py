"""Real-CT benchmark (issue 16): prior-fit verdicts before and after site adaptation, real tumours in a held-out
patient, and synthetic lesions in held-out real slices.

    make data                                     # the real CT (pycerr, InVesalius, pydicom-data)
    python benchmarks/bench_real_ct.py --out benchmarks/results/real_ct --cache /tmp/realct-cache

Stages (each analysis is cached per prior, so a re-run only redoes what is missing):
1. Prior fit of every real source under the shipped prior, at the default settings.
2. `adapt_prior` on the tumour-free slices of the training patients (pycerr pat_1..3; the adaptation itself holds out
   whole patients among them to calibrate), then the prior fit of every source again, under the adapted prior.
3. The test patient (pat_4, never seen by the adaptation): every slice analysed with the adapted prior; tumour slices
   against tumour-free ones (dataset AUROC of the KL z-score), the tumour's windows against the other body windows of
   each tumour slice (localisation AUROC), and the tumour-free slices flagged at the calibrated z threshold.
4. Synthetic lesions (soft round blobs of 6-14 mm radius, +-40-80 HU against the tissue around them) inserted into
   half of the test patient's tumour-free slices, the other half left healthy: dataset and localisation AUROC, and the
   healthy slices flagged.
Writes results.json and README.md (tables, commands, machine load) into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from klviewer.evaluation.adapt import AdaptConfig, adapt_prior
from klviewer.evaluation.detection import DetectionCase, score_z
from klviewer.inference.healthy_reference import body_mask
from klviewer.inference.pipeline import LoadedPrior, analyze_slices
from klviewer.inference.plan import plan_open_series
from klviewer.inference.prior_fit import prior_fit_score
from klviewer.inference.settings import AnalysisSettings
from klviewer.io import realct
from klviewer.io.study import Series, Slice
from klviewer.results.slice_file import load_slice_result, write_slice_npz

BASE = "abdomen-phantom-256"
TRAIN_PATIENTS = ("pycerr:pat_1", "pycerr:pat_2", "pycerr:pat_3")
TEST_PATIENT = "pycerr:pat_4"
TUMOUR_MARGIN = 2
"""Slices this close to a tumour slice count as neither tumour nor tumour-free (partial volume)."""


def picks_for(volume: realct.RealCtVolume) -> list[int]:
    """A few slices of each scan, as benchmarks/bench_prior_fit.py picks them (its analyses are reused)."""
    n = volume.series.n_slices
    picks = np.linspace(0, n - 1, min(n, 4 if n > 10 else n))
    if volume.case.source == realct.INVESALIUS:
        picks = np.linspace(20, n - 15, 6)
    return sorted({int(i) for i in picks.round()})


def tumour_free(volume: realct.RealCtVolume) -> list[int]:
    if volume.tumour is None:
        return list(range(volume.series.n_slices))
    hit = np.nonzero(volume.tumour.reshape(volume.tumour.shape[0], -1).any(axis=1))[0]
    return [i for i in range(volume.series.n_slices) if hit.size == 0 or np.min(np.abs(hit - i)) > TUMOUR_MARGIN]


def subset(series: Series, indices: list[int], tag: str, slices: list[Slice] | None = None) -> Series:
    chosen = slices if slices is not None else [series.slices[i] for i in indices]
    return dataclasses.replace(series, uid=f"{series.uid}:{tag}", slices=chosen)


def analyse(loaded: LoadedPrior, series: Series, indices: list[int], settings: AnalysisSettings, cache: Path,
            key: str) -> list:
    """Results of `indices`, from `cache/<prior>/<key>_<index>.npz` when there."""
    folder = cache / loaded.fingerprint[:16]
    results, todo = {}, []
    for i in indices:
        f = folder / f"{key}_{i:04d}.npz"
        if f.is_file():
            results[i] = load_slice_result(f)
        else:
            todo.append(i)
    if todo:
        for item in analyze_slices(plan_open_series([(series, todo)]), loaded, settings):
            folder.mkdir(parents=True, exist_ok=True)
            write_slice_npz(item.result, folder / f"{key}_{item.index:04d}.npz")
            results[item.index] = item.result
            print(f"  {loaded.name} {key} slice {item.index}: prior fit {item.result.prior_fit_score:.3g}, "
                  f"z {item.result.z_score}", flush=True)
    return [results[i] for i in indices]


def prior_fit_table(loaded: LoadedPrior, volumes: list[realct.RealCtVolume], settings: AnalysisSettings,
                    cache: Path, most: int | None = None) -> list[dict]:
    rows = []
    threshold = loaded.calibration.prior_fit_threshold(settings)
    for v in volumes:
        picks = picks_for(v)
        if most is not None and len(picks) > most:
            picks = [picks[round(k * (len(picks) - 1) / (most - 1))] for k in range(most)]
        results = analyse(loaded, v.series, picks, settings, cache, v.case.case_id.replace("/", "_"))
        scores = [prior_fit_score(r.energy, r.recon_hu, r.settings.sigma_window) for r in results]
        mismatch = None if threshold is None else sum(s > threshold for s in scores)
        rows.append({"case": v.case.case_id, "anatomy": v.case.anatomy, "slices": len(picks),
                     "median_score": float(np.median(scores)), "min_score": float(min(scores)),
                     "max_score": float(max(scores)), "mismatch": mismatch, "threshold": threshold,
                     "study_verdict": None if threshold is None else
                     ("mismatch" if np.median(scores) > threshold else "fits")})
    return rows


def on_prior_grid(result, mask: np.ndarray) -> np.ndarray:
    return result.grid_transform.resample_to_target(mask.astype(np.float32), fill=0.0) > 0.5


def detection_cases(results: list, tumours: list[np.ndarray | None]) -> list[DetectionCase]:
    cases = []
    for k, (r, t) in enumerate(zip(results, tumours)):
        ood = np.zeros(r.recon_hu.shape, bool) if t is None else on_prior_grid(r, t)
        kind = "lesion" if ood.any() else "healthy"
        cases.append(DetectionCase(kind, k, body_mask(r.recon_hu), ood, r.original_hu, r))
    return cases


def detection_numbers(cases: list[DetectionCase], loaded: LoadedPrior, settings: AnalysisSettings) -> dict:
    z = loaded.calibration.z_calibration(settings)
    scores = score_z(cases, z.reference)
    healthy = [c for c in cases if c.kind == "healthy"]
    sick = [c for c in cases if c.kind != "healthy"]
    flagged_healthy = sum(c.result.z_score is not None and c.result.z_score > z.threshold for c in healthy)
    flagged_sick = sum(c.result.z_score is not None and c.result.z_score > z.threshold for c in sick)
    mismatch = sum(c.result.prior_fit is not None and not c.result.prior_fit.fits for c in cases)
    return {"dataset_auroc": scores.dataset_auroc, "localisation_auroc": scores.localisation_auroc,
            "lesion_slices": len(sick), "healthy_slices": len(healthy), "z_threshold": z.threshold,
            "healthy_flagged": flagged_healthy, "lesion_flagged": flagged_sick, "prior_mismatch": mismatch}


def insert_lesion(hu: np.ndarray, spacing: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """A soft round lesion in soft tissue (-100..150 HU, away from air and bone); None when there is no room."""
    tissue = (hu > -100) & (hu < 150)
    radius = rng.uniform(6.0, 14.0) / spacing
    from scipy import ndimage

    room = ndimage.binary_erosion(tissue, iterations=max(1, int(np.ceil(radius))))
    candidates = np.argwhere(room)
    if candidates.size == 0:
        return None
    r0, c0 = candidates[rng.integers(len(candidates))]
    yy, xx = np.mgrid[: hu.shape[0], : hu.shape[1]]
    d = np.hypot(yy - r0, xx - c0) / radius
    profile = np.clip(1.5 - d, 0.0, 1.0) ** 2  # flat core, soft edge
    contrast = rng.choice([-1.0, 1.0]) * rng.uniform(40.0, 80.0)
    return (hu + contrast * profile).astype(np.float32), d <= 1.0


def _load(values) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def _fit_rows(rows: list[dict]) -> list[str]:
    out = ["| source | anatomy | slices | prior fit per body pixel: median (min–max) | threshold | slices over it | study verdict |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        threshold = "–" if r["threshold"] is None else f"{r['threshold']:.3f}"
        out.append(f"| {r['case']} | {r['anatomy']} | {r['slices']} | {r['median_score']:.3f} ({r['min_score']:.3f}–"
                   f"{r['max_score']:.3f}) | {threshold} | {r['mismatch']} | {r['study_verdict']} |")
    return out


def _detection_row(name: str, d: dict) -> str:
    return (f"| {name} | {d['lesion_slices']} / {d['healthy_slices']} | {d['dataset_auroc']:.3f} | "
            f"{d['localisation_auroc']:.3f} | {d['z_threshold']:.3f} | {d['lesion_flagged']} of {d['lesion_slices']} | "
            f"{d['healthy_flagged']} of {d['healthy_slices']} ({d['healthy_flagged'] / max(d['healthy_slices'], 1):.0%}) "
            f"| {d['prior_mismatch']} |")


def write_readme(report: dict, out: Path) -> None:
    """The results as tables, beside results.json."""
    adaptation = report["adaptation"]
    split = adaptation["split"]
    (cal,) = adaptation["report"]["calibration"]
    lines = [
        "# Real-CT benchmark", "",
        f"Command: `{report['command']}` ({report['seconds'] / 60:.0f} min of this run, {report['threads']} torch "
        f"thread(s); load average {_load(report['load_average_start'])} at the start, "
        f"{_load(report['load_average_end'])} at the end; analyses cached by earlier runs were read back, not "
        "redone). Analysis settings: the defaults (`pigdm`, 1 sample, 100 steps, 24 views, noise-free, patch 8, "
        "σ 0.01–0.5). Data: `make data` (docs/real_ct_data.md).", "",
        "## 1. Prior fit under the shipped abdomen-phantom prior", "",
        *_fit_rows(report["prior_fit_base"]), "",
        f"## 2. Adaptation to tumour-free chest CT ({adaptation['mode']}, {adaptation['steps']} steps)", "",
        f"Training took {adaptation['training_seconds'] / 60:.1f} min of wall time over "
        f"{adaptation['training_sessions']} session(s) (a resumed run adds up its sessions), on the shared machine with "
        f"other jobs running (one torch thread, load about 3-5); "
        f"this run's `adapt_prior` call (the rest of training, calibration, report) took "
        f"{adaptation['seconds'] / 60:.1f} min.", "",
        f"Trained on {split['train_slices']} tumour-free slices of {', '.join(split['train_patients'])}; calibrated on "
        f"{split['held_out_slices']} slices of the held-out {', '.join(split['held_out_patients'])} (split by patient).",
        "", "| σ | held-out denoising RMSE, base (HU) | adapted (HU) |", "|---|---|---|",
        *[f"| {d['sigma']:g} | {d['base_rmse_hu']:.1f} | {d['adapted_rmse_hu']:.1f} |"
          for d in adaptation["report"]["denoising"]], "",
        f"Calibration on the held-out patient: nats threshold {cal['nats_threshold']:.1f}, z threshold "
        f"{cal['z_threshold']:.2f}, prior-fit threshold {cal['prior_fit_threshold']:.3f} (held-out scores "
        f"{cal['prior_fit_scores']['min']:.3f}–{cal['prior_fit_scores']['max']:.3f}).", "",
        "Prior fit under the adapted prior (at most 2 slices per scan):", "",
        *_fit_rows(report["prior_fit_adapted"]), "",
        "## 3–4. Detection in the unseen patient (pycerr pat_4) with the adapted prior", "",
        "| lesions | lesion / healthy slices | KL z dataset AUROC | localisation AUROC | z threshold | lesion slices "
        "flagged | healthy slices flagged | prior mismatch |",
        "|---|---|---|---|---|---|---|---|",
        _detection_row("real tumours (RTSTRUCT contours)", report["real_tumours"]),
        _detection_row("synthetic lesions in tumour-free slices", report["synthetic_lesions"]), "",
        "What the numbers say and what limits them: docs/prior_fit.md, section \"Real CT\". `maps_pat_4.png`, "
        "when present, shows four of the unseen patient's KL maps (`benchmarks/plot_real_ct_maps.py`).", "",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/real_ct"))
    p.add_argument("--cache", type=Path, default=Path("/tmp/klviewer-realct-cache"))
    p.add_argument("--steps", type=int, default=300, help="adaptation steps")
    p.add_argument("--mode", default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tables-only", action="store_true", help="rewrite README.md from --out/results.json, no analysis")
    args = p.parse_args(argv)
    if args.tables_only:
        write_readme(json.loads((args.out / "results.json").read_text(encoding="utf-8")), args.out)
        return 0
    torch.set_num_threads(int(os.environ.get("KLVIEWER_THREADS", "2")))
    settings = AnalysisSettings(device="cpu")
    started, load = time.perf_counter(), os.getloadavg()
    missing = realct.missing_sources()
    if missing:
        print(f"real CT missing: {missing}; run `make data`", file=sys.stderr)
        return 2
    volumes = [realct.load_case(c) for c in realct.available_cases()]
    by_patient = {v.case.patient_id: v for v in volumes}
    report: dict = {"command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "load_average_start": load,
                    "settings": settings.to_dict(), "threads": torch.get_num_threads()}

    base = LoadedPrior.load(BASE, "cpu")
    report["prior_fit_base"] = prior_fit_table(base, volumes, settings, args.cache)

    train = [(pid, subset(by_patient[pid].series, tumour_free(by_patient[pid]), "tumour-free"))
             for pid in TRAIN_PATIENTS]
    out = args.cache / f"adapted-{args.mode}-{args.steps}-{args.seed}"
    cfg = AdaptConfig(base=BASE, inputs=[], out=out, mode=args.mode, steps=args.steps, seed=args.seed, device="cpu",
                      settings=[settings], resume=out.exists(), command=report["command"])
    t = time.perf_counter()
    adapted_run = adapt_prior(cfg, progress=lambda pr: print(f"  adapt {pr.stage} {pr.step}/{pr.steps} "
                                                                 f"{pr.loss:.4g}", flush=True) if pr.step % 25 == 0
                              else None, series=train)
    training = json.loads((out / "config.json").read_text(encoding="utf-8"))["training"]
    report["adaptation"] = {"seconds": time.perf_counter() - t, "split": adapted_run.split.describe(),
                            "report": adapted_run.report, "mode": args.mode, "steps": args.steps,
                            "training_seconds": training["seconds"], "training_sessions": len(training["commands"])}
    adapted = LoadedPrior.load(out, "cpu")
    report["prior_fit_adapted"] = prior_fit_table(adapted, volumes, settings, args.cache, most=2)

    test = by_patient[TEST_PATIENT]
    indices = list(range(test.series.n_slices))
    free = set(tumour_free(test))
    tumour_slices = [i for i in indices if test.tumour[i].any()]
    keep = sorted(free | set(tumour_slices[::2]))
    results = analyse(adapted, test.series, keep, settings, args.cache, "pat_4")
    cases = detection_cases(results, [test.tumour[i] if i in tumour_slices else None for i in keep])
    report["real_tumours"] = detection_numbers(cases, adapted, settings)

    # Synthetic lesions in every other tumour-free slice; the slices between stay healthy (their analyses are
    # the ones above).
    rng = np.random.default_rng(args.seed + 16)
    free_list = sorted(free)
    healthy_at, lesion_at = free_list[0::2], free_list[1::2]
    synthetic, masks = [], []
    spacing = float(test.series.pixel_spacing_mm[0])
    for i in lesion_at:
        made = insert_lesion(test.series.slices[i].hu, spacing, rng)
        if made is not None:
            synthetic.append(dataclasses.replace(test.series.slices[i], hu=made[0]))
            masks.append(made[1])
    lesion_series = subset(test.series, [], f"synthetic-{args.seed}", synthetic)
    sick = analyse(adapted, lesion_series, list(range(len(synthetic))), settings, args.cache,
                   f"pat_4_synthetic_{args.seed}")
    healthy = analyse(adapted, test.series, healthy_at, settings, args.cache, "pat_4")
    report["synthetic_lesions"] = detection_numbers(detection_cases(healthy + sick, [None] * len(healthy) + masks),
                                                    adapted, settings)
    report["seconds"] = time.perf_counter() - started
    report["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    write_readme(report, args.out)
    print(json.dumps({k: report[k] for k in ("real_tumours", "synthetic_lesions")}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
