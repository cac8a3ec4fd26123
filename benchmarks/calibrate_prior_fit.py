"""Add a prior-fit threshold to an existing calibration entry from cached healthy analyses, leaving its other
thresholds as they were calibrated (they came from more slices than the prior-fit benchmark analyses).

    python benchmarks/calibrate_prior_fit.py --cache /tmp/prior-fit-cache/healthy_cal \
        --prior abdomen-phantom-256 [--fpr 0.05]

Every `*.npz` under --cache must be a healthy slice analysed with the prior's current weights; the entry is the
one for their settings. The threshold follows `klviewer calibrate`: PRIOR_FIT_MARGIN x the healthy score at the
false-positive rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from klviewer.evaluation.calibrate import PRIOR_FIT_MARGIN, threshold_at_fpr
from klviewer.inference.calibration import CALIBRATION_FILE, calibration_key, read_calibrations
from klviewer.inference.prior_fit import STATISTIC, prior_fit_score
from klviewer.io.safe_write import atomic_write_text
from klviewer.priors.checkpoint import prior_fingerprint, resolve_prior_path
from klviewer.results.slice_file import load_slice_result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--prior", default="abdomen-phantom-256")
    p.add_argument("--fpr", type=float, default=0.05)
    args = p.parse_args(argv)
    path = resolve_prior_path(args.prior)
    results = [load_slice_result(f) for f in sorted(args.cache.glob("*.npz"))]
    keys = {json.dumps(calibration_key(r.settings), sort_keys=True) for r in results}
    if len(keys) != 1 or any(r.prior_name != path.name for r in results):
        raise SystemExit(f"{args.cache}: needs healthy results of {path.name} at one setting, found {len(keys)}")
    key = calibration_key(results[0].settings)
    scores = np.array([prior_fit_score(r.energy, r.recon_hu, r.settings.sigma_window) for r in results])
    threshold = PRIOR_FIT_MARGIN * threshold_at_fpr(scores, args.fpr)
    entries = read_calibrations(path)
    entry = next((e for e in entries if e.get("settings") == key), None)
    if entry is None or entry.get("prior_sha256") != prior_fingerprint(path):
        raise SystemExit(f"{path / CALIBRATION_FILE}: no entry for {key} with the current weights")
    entry["prior_fit"] = {
        "statistic": STATISTIC, "threshold": threshold, "margin": PRIOR_FIT_MARGIN, "fpr": args.fpr,
        "n_healthy": int(scores.size), "healthy_exceeding": int((scores > threshold).sum()),
        "healthy_scores": {"min": float(scores.min()), "median": float(np.median(scores)), "max": float(scores.max())},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/calibrate_prior_fit.py " + " ".join(sys.argv[1:]),
    }
    atomic_write_text(path / CALIBRATION_FILE, json.dumps({"calibrations": entries}, indent=2) + "\n", overwrite=True)
    print(f"prior-fit threshold {threshold:.4g} nats per body pixel from {scores.size} healthy slices "
          f"({scores.min():.3g} to {scores.max():.3g}) written to {path / CALIBRATION_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
