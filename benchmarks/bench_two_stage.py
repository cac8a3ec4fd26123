"""Two-stage screening as built (issue 20): detection and cost of `analyze --escalate` on the benchmark's splits.

    python benchmarks/bench_two_stage.py --splits 1 0 5 --out TABLE.md [--options "--profile screening"] [--escalate 4] [--rate 0.5]

Each split is the phantom set of `klviewer evaluate detect --n-id N --n-ood N --seed S` (healthy phantoms, then
lesion phantoms), analysed as one series through `analyze_slices` with the escalation, with the shipped prior's
calibration for both stages: exactly what `klviewer analyze --escalate` does. Nothing is fitted here. A slice's
score is its final KL z-score (stage 2's when escalated, else stage 1's); its flag is the product's.

Cost: seconds per healthy and per lesion slice (each slice's share of its batch's sampling plus its maps, from
the results), chains per slice, and 100 bare forward passes of the prior timed in the same process (3 before the
splits and 3 after; the ratio is to their median, because they drift by up to 40 % within one process here).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_screening import bare_forwards_seconds, settings_of  # noqa: E402

from klviewer.evaluation.detection import DetectionCase, localisation_auroc, split_plan  # noqa: E402
from klviewer.evaluation.metrics import auroc  # noqa: E402
from klviewer.inference.escalation import Escalation, escalation_rule  # noqa: E402
from klviewer.inference.pipeline import LoadedPrior, analyze_slices  # noqa: E402
from klviewer.inference.plan import plan_open_series  # noqa: E402
from klviewer.io.study import Series, Slice  # noqa: E402
from klviewer.phantoms import make_phantom  # noqa: E402
from klviewer.priors.checkpoint import DEFAULT_PRIOR  # noqa: E402


def split_phantoms(seed: int, n: int, size: int) -> list:
    """The phantoms of `evaluate detect --n-id n --n-ood n --seed seed`, in its order."""
    return [make_phantom(kind, size, phantom_seed) for kind, phantom_seed in split_plan(seed, n, n)]


def run_split(loaded: LoadedPrior, settings, escalation: Escalation, seed: int, n: int) -> dict:
    phantoms = split_phantoms(seed, n, loaded.prior.config.image_size[0])
    spacing = phantoms[0].pixel_spacing_mm
    volume = Series(uid=f"split-{seed}", modality="CT", source_kind="array", description=f"split {seed}",
                    slices=[Slice(hu=p.hu) for p in phantoms], pixel_spacing_mm=(spacing, spacing))
    plan = plan_open_series([(volume, range(len(phantoms)))])
    start = time.perf_counter()
    results = [item.result for item in analyze_slices(plan, loaded, settings, escalation=escalation)]
    seconds = time.perf_counter() - start
    cases = [DetectionCase.of(p, r) for p, r in zip(phantoms, results)]
    lesion = np.array([c.kind == "lesion" for c in cases])
    z = np.array([c.result.z_score for c in cases], np.float64)
    escalated = np.array([c.result.settings.samples > settings.samples for c in cases])
    flagged = np.array([c.result.flagged for c in cases])
    per_slice = np.array([c.result.seconds for c in cases])
    chains = np.array([c.result.settings.samples for c in cases], np.float64)
    localisation = [localisation_auroc(c.result.z_map, c) for c in cases if c.kind == "lesion"]
    return {
        "split": seed, "dataset_auroc": auroc(z, lesion), "localisation_auroc": float(np.nanmean(localisation)),
        "escalated_healthy": float(escalated[~lesion].mean()), "escalated_lesion": float(escalated[lesion].mean()),
        "flagged_healthy": int(flagged[~lesion].sum()), "flagged_lesion": int(flagged[lesion].sum()),
        "chains_healthy": float(chains[~lesion].mean()), "chains_mix": float(chains.mean()),
        "seconds_healthy": float(per_slice[~lesion].mean()), "seconds_lesion": float(per_slice[lesion].mean()),
        "seconds_series": seconds, "slices": len(cases),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", type=int, nargs="+", default=[1, 0, 5])
    p.add_argument("--n", type=int, default=20, help="healthy and lesion phantoms per split (default 20 + 20)")
    p.add_argument("--options", default="--profile screening", help="stage 1's `klviewer analyze` sampler options")
    p.add_argument("--escalate", type=int, default=4, help="chains in all for an escalated slice")
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--prior", default=DEFAULT_PRIOR)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="markdown table; the numbers also go to its .json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = LoadedPrior.load(args.prior, "cpu")
    settings = settings_of(args.options)
    escalation = Escalation(args.escalate, args.rate)
    rule = escalation_rule(loaded.calibration, settings, escalation)
    load_start = os.getloadavg()
    before = [bare_forwards_seconds(loaded.prior) for _ in range(3)]
    rows = []
    for seed in args.splits:
        rows.append(run_split(loaded, settings, escalation, seed, args.n))
        print(json.dumps(rows[-1]), flush=True)
    after = [bare_forwards_seconds(loaded.prior) for _ in range(3)]
    forwards = statistics.median(before + after)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    doc = {"command": command, "settings": settings.to_dict(), "escalation": rule.to_dict(),
           "load_start": load_start, "load_end": os.getloadavg(), "bare_100_forwards_seconds": before + after,
           "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    lines = [
        "# Two-stage screening as built: `klviewer analyze --escalate`",
        "",
        f"Command: `{command}`; CPU, {args.threads} torch threads, prior {loaded.name}; load average "
        f"{' '.join(f'{v:.2f}' for v in load_start)} at the start, {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
        f"at the end. Stage 1: {settings.describe_sampling()}. {rule.describe()[0].upper()}{rule.describe()[1:]} "
        f"(rate {args.rate}). Each split: {args.n} healthy then {args.n} lesion phantoms as one series. 100 bare "
        f"forward passes took {forwards:.2f} s (median of {', '.join(f'{t:.2f}' for t in before + after)} s).",
        "",
        "| split | dataset AUROC | localisation AUROC | escalated healthy / lesion | flagged healthy / lesion "
        "| chains per slice: healthy / mix | s / healthy slice (× 100 forwards) | s / lesion slice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['split']} | {r['dataset_auroc']:.3f} | {r['localisation_auroc']:.3f} | "
            f"{r['escalated_healthy']:.2f} / {r['escalated_lesion']:.2f} | {r['flagged_healthy']} / {r['flagged_lesion']} "
            f"of {args.n} | {r['chains_healthy']:.2f} / {r['chains_mix']:.2f} | "
            f"{r['seconds_healthy']:.2f} ({r['seconds_healthy'] / forwards:.2f}×) | {r['seconds_lesion']:.2f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
