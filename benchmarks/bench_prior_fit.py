"""Which whole-image statistic says "this prior does not describe this study"? (issue 16; docs/prior_fit.md)

    make data
    python benchmarks/bench_prior_fit.py run --cache /tmp/prior-fit-cache      # analyses, cached per slice
    python benchmarks/bench_prior_fit.py report --cache /tmp/prior-fit-cache --out benchmarks/results/prior_fit.md

`run` analyses slices of several sets with the shipped prior at the default settings and appends each slice's
candidate statistics to CACHE/stats.jsonl:
- healthy_cal: healthy phantoms from the calibration seeds (the threshold is set on these);
- healthy_test, lesion: held-out healthy and lesion phantoms (a prior fit verdict must say "fits" for them: a
  lesion is local, the prior still describes the study);
- thorax, enhanced: phantoms of other anatomy and of the portal-venous phase;
- real:*: the real CT that `make data` fetches (pydicom-data, pycerr, InVesalius), a few slices of each scan.
Candidates, all from the same run (no extra sampling): KL in the run's sigma window per body pixel, KL over all
noise levels per body pixel, the noise-whitened data residual of the posterior mean, and the mean KL z-score over
body windows (the healthy reference's global statistic). `report` writes the table behind the choice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from klviewer.evaluation.calibrate import PRIOR_FIT_MARGIN, threshold_at_fpr
from klviewer.evaluation.detection import CALIBRATION_SEED_BASE, EVAL_SEED_BASE, series_from_phantom
from klviewer.evaluation.metrics import auroc
from klviewer.inference.healthy_reference import body_mask
from klviewer.inference.measurements import ct_measurement_model, prepare_slice
from klviewer.inference.pipeline import LoadedPrior, analyze_prepared
from klviewer.inference.settings import AnalysisSettings
from klviewer.io import realct
from klviewer.phantoms import make_phantom
from klviewer.results.slice_file import load_slice_result, write_slice_npz

CANDIDATES = {
    "kl_window_density": "KL in the run's sigma window per body pixel (nats)",
    "kl_all_density": "KL over all noise levels per body pixel (nats)",
    "dc_residual": "whitened RMS data residual of the posterior mean",
    "z_mean": "mean KL z-score over body windows",
}
FITTING_SETS = ("healthy_test", "lesion")
"""Sets the prior describes: a verdict must say fits."""


def phantoms(set_name: str, kind: str, seeds: range, **params):
    for s in seeds:
        yield set_name, f"{kind}_{s}", series_from_phantom(make_phantom(kind, 256, s, **params)), 0


def real_slices():
    for case in realct.available_cases():
        volume = realct.load_case(case)
        n = volume.series.n_slices
        picks = np.linspace(0, n - 1, min(n, 4 if n > 10 else n)).round().astype(int)
        if case.source == realct.INVESALIUS:
            picks = np.linspace(20, n - 15, 6).round().astype(int)
        for i in sorted(set(picks.tolist())):
            yield f"real:{case.source}", f"{case.case_id.replace('/', '_')}_{i}", volume.series, i


SETS = {
    "thorax": lambda: phantoms("thorax", "shift", range(EVAL_SEED_BASE + 46_000, EVAL_SEED_BASE + 46_006)),
    "real": real_slices,
    "healthy_cal": lambda: phantoms("healthy_cal", "healthy", range(CALIBRATION_SEED_BASE, CALIBRATION_SEED_BASE + 20)),
    "lesion": lambda: phantoms("lesion", "lesion", range(EVAL_SEED_BASE + 45_000, EVAL_SEED_BASE + 45_008)),
    "healthy_test": lambda: phantoms("healthy_test", "healthy", range(EVAL_SEED_BASE + 40_000, EVAL_SEED_BASE + 40_012)),
    "enhanced": lambda: phantoms("enhanced", "shift", range(EVAL_SEED_BASE + 47_000, EVAL_SEED_BASE + 47_004),
                                 anatomy="enhanced"),
}


def statistics(loaded: LoadedPrior, result, prepared) -> dict:
    body = body_mask(result.recon_hu)
    n = max(int(body.sum()), 1)
    model = ct_measurement_model(prepared.acquisition, loaded.prior)
    x = loaded.prior.hu_to_x(torch.from_numpy(result.recon_hu)).reshape(1, 1, *result.recon_hu.shape)
    with torch.no_grad():
        whitened = model.residual(x.to(model.y.device)) / model.variance.sqrt()
    z = result.z_map.values if result.z_map is not None else np.array([])
    z = z[np.isfinite(z)]
    return {"kl_window_density": float(result.total_kl / n), "kl_all_density": float(result.energy.energy.sum() / n),
            "dc_residual": float(whitened.pow(2).mean().sqrt()), "z_mean": float(z.mean()) if z.size else None,
            "z_score": result.z_score, "body_px": n, "geometry_warnings": result.geometry_warnings}


def run(cache: Path, sets: list[str]) -> None:
    settings = AnalysisSettings(device="cpu")
    loaded = LoadedPrior.load("abdomen-phantom-256", "cpu")
    nats, z = loaded.calibration.nats_threshold(settings), loaded.calibration.z_calibration(settings)
    with (cache / "stats.jsonl").open("a") as out:
        for name in sets:
            for set_name, key, series, index in SETS[name]():
                f = cache / set_name / f"{key}.npz"
                started = time.perf_counter()
                prepared = prepare_slice(series, index, loaded.prior, settings, loaded.device)
                if f.is_file():
                    result = load_slice_result(f)
                else:
                    result = analyze_prepared(prepared, loaded.prior, settings, prior_name=loaded.name,
                                              flag_threshold=nats, z_calibration=z)
                    f.parent.mkdir(parents=True, exist_ok=True)
                    write_slice_npz(result, f)
                row = {"set": set_name, "key": key, **statistics(loaded, result, prepared),
                       "seconds": time.perf_counter() - started, "load": os.getloadavg()[0]}
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(set_name, key, f"{row['kl_window_density']:.4g}", flush=True)


def report(cache: Path, out: Path) -> None:
    rows = {}
    for line in (cache / "stats.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[(r["set"], r["key"])] = r  # a re-run's line replaces the earlier one
    by_set: dict[str, list[dict]] = defaultdict(list)
    for r in rows.values():
        by_set[r["set"]].append(r)
    healthy = by_set["healthy_cal"]
    shifted = [r for s, rs in by_set.items() if s in ("thorax",) or s.startswith("real:") for r in rs]
    lines = ["# Prior-fit candidates (shipped prior, default settings)", "",
             "Command: `python benchmarks/bench_prior_fit.py run` then `report` (see the script's docstring).", "",
             f"Slices: {', '.join(f'{s} {len(v)}' for s, v in sorted(by_set.items()))}.", "",
             "| candidate | healthy (calibration) median [min, max] | threshold | healthy test fits | lesion fits | "
             "thorax + real CT mismatch | AUROC healthy vs thorax + real |",
             "|---|---|---|---|---|---|---|"]
    for key, label in CANDIDATES.items():
        values = np.array([r[key] for r in healthy if r[key] is not None])
        if values.size == 0:
            continue
        threshold = PRIOR_FIT_MARGIN * threshold_at_fpr(values, 0.05)

        def fraction(rs: list[dict], above: bool) -> str:
            v = [r[key] for r in rs if r[key] is not None]
            hits = sum((x > threshold) == above for x in v)
            return f"{hits}/{len(v)}"

        pooled = [r for r in healthy + shifted if r[key] is not None]
        area = auroc(np.array([r[key] for r in pooled]), np.array([r in shifted for r in pooled]))
        lines.append(f"| {label} | {np.median(values):.3g} [{values.min():.3g}, {values.max():.3g}] | {threshold:.3g} | "
                     f"{fraction(by_set['healthy_test'], False)} | {fraction(by_set['lesion'], False)} | "
                     f"{fraction(shifted, True)} | {area:.3f} |")
    lines += ["", f"Thresholds: {PRIOR_FIT_MARGIN:g} x the healthy calibration value at a false-positive rate of 0.05, "
              "as `klviewer calibrate` sets them.", "", "## Per set (KL in the window per body pixel)", "",
              "| set | slices | median | min | max |", "|---|---|---|---|---|"]
    for s, rs in sorted(by_set.items()):
        v = np.array([r["kl_window_density"] for r in rs])
        lines.append(f"| {s} | {len(v)} | {np.median(v):.3g} | {v.min():.3g} | {v.max():.3g} |")
    load = [r["load"] for r in rows.values() if "load" in r]
    if load:
        lines += ["", f"Load average during the runs: {min(load):.1f} to {max(load):.1f} (2 cores; timings not reported)."]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("run", "report"))
    p.add_argument("--cache", type=Path, default=Path("/tmp/klviewer-prior-fit-cache"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/prior_fit.md"))
    p.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    args = p.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        run(args.cache, args.sets)
    else:
        report(args.cache, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
