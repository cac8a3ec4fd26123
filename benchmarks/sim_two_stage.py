"""Two-stage series screening, simulated from finished detection runs (issue 20).

    python benchmarks/sim_two_stage.py --stage1 CACHE1 --stage2 CACHE2 --tune 1 --splits 0 5 --out TABLE.md

Stage 1 analyses every slice with a cheap setting; the slices whose stage-1 KL z-score passes an
escalation threshold get the posterior samples of stage 2, and stage 2 decides their verdict.
Nothing here samples: CACHE1 and CACHE2 are the `--cache` folders of two `klviewer evaluate
detect` runs on the same phantoms (the calibration-range healthy slices included), e.g. 2 and 4
chains of one setting. Chain k of a run follows the random stream (slice seed, k) whatever the
sample count, so a 4-chain run's first two chains are the 2-chain run's (up to bfloat16 rounding)
and a real stage 2 would add only the missing chains.

Every threshold comes from the calibration-range healthy slices, never from the split it scores:
each stage's healthy reference is fitted on them, its flag threshold is the z-score that 5 % of
their cross-fitted scores exceed, and the escalation threshold is the one that a fraction RATE of
them exceed. A slice's final score is its stage-2 z-score when escalated, else its stage-1
z-score (each against its own stage's reference). The rate is chosen on the tuning split only
(the smallest that reaches `--target`);
the table gives every rate on every split so that the choice can be checked.

Cost is counted in chains per slice (stage-1 chains, plus the added chains times the escalated
fraction), separately for the healthy slices (a series without disease) and for the split's mix.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klviewer.evaluation.calibrate import threshold_at_fpr
from klviewer.evaluation.detection import (
    DetectionCase,
    load_cached_cases,
    localisation_auroc,
    split_of,
)
from klviewer.evaluation.metrics import auroc
from klviewer.inference.healthy_reference import HealthySlice, cross_fitted_scores, fit_reference

FPR = 0.05


@dataclass
class Stage:
    """One stage's z-scores of a split's slices, and its thresholds from the calibration slices."""

    chains: int
    z: np.ndarray
    """Each slice's KL z-score (its largest pooled window)."""
    localisation: np.ndarray
    """Each lesion slice's localisation AUROC over its windows (NaN for healthy slices)."""
    flag_threshold: float
    healthy_calibration_z: np.ndarray


def load_stage(cache: Path, split: int, patch: int, window: tuple[float, float]) -> tuple[list[DetectionCase], Stage]:
    cases = load_cached_cases(cache)
    calibration = [HealthySlice(c.result.energy, c.result.recon_hu) for c in cases
                   if split_of(c.seed) is None and c.kind == "healthy"]
    scored = sorted((c for c in cases if split_of(c.seed) == split), key=lambda c: (c.kind, c.seed))
    if not calibration or not scored:
        raise SystemExit(f"{cache}: needs calibration-range healthy slices and split {split}, "
                         f"found {len(calibration)} and {len(scored)}")
    reference = fit_reference(calibration, patch, window)
    healthy_z = cross_fitted_scores(calibration, patch, window)
    z, localisation = [], []
    for case in scored:
        z_map = reference.z_map(case.result.energy, case.result.recon_hu)
        z.append(z_map.score)
        localisation.append(np.nan if case.kind == "healthy" else localisation_auroc(z_map, case))
    chains = int(scored[0].result.settings.samples)
    return scored, Stage(chains, np.array(z), np.array(localisation), threshold_at_fpr(healthy_z, FPR), healthy_z)


@dataclass
class Outcome:
    rate: float
    escalate_above: float
    dataset_auroc: float
    localisation_auroc: float
    escalated_healthy: float
    escalated_lesion: float
    chains_healthy: float
    chains_mix: float
    flagged_healthy: int
    flagged_lesion: int


def two_stage(first: Stage, second: Stage, lesion: np.ndarray, rate: float) -> Outcome:
    """The final scores and verdicts when the fraction `rate` of healthy calibration slices would escalate."""
    above = float(np.quantile(first.healthy_calibration_z, 1 - rate)) if rate < 1 else -np.inf
    escalated = first.z > above
    final = np.where(escalated, second.z, first.z)
    localisation = np.where(escalated, second.localisation, first.localisation)[lesion]
    flagged = escalated & (second.z > second.flag_threshold)
    added = second.chains - first.chains
    return Outcome(rate, above, auroc(final, lesion), float(np.nanmean(localisation)),
                   float(escalated[~lesion].mean()), float(escalated[lesion].mean()),
                   first.chains + added * float(escalated[~lesion].mean()), first.chains + added * float(escalated.mean()),
                   int(flagged[~lesion].sum()), int(flagged[lesion].sum()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage1", type=Path, required=True)
    p.add_argument("--stage2", type=Path, required=True)
    p.add_argument("--tune", type=int, required=True, help="the split the rate is chosen on")
    p.add_argument("--splits", type=int, nargs="*", default=[], help="splits scored with the rate chosen on --tune")
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--target", type=float, default=0.90,
                   help="the rate chosen is the smallest whose tuning dataset AUROC reaches this (else the largest)")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--sigma-window", type=float, nargs=2, default=(0.01, 0.05))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    window = tuple(args.sigma_window)
    rows, chosen = [], None
    for split in [args.tune, *args.splits]:
        cases, first = load_stage(args.stage1, split, args.patch, window)
        cases2, second = load_stage(args.stage2, split, args.patch, window)
        if [c.seed for c in cases] != [c.seed for c in cases2]:
            raise SystemExit(f"split {split}: the two caches hold different phantoms")
        lesion = np.array([c.kind != "healthy" for c in cases])
        alone = [(f"stage 1 alone ({first.chains} chain(s))", auroc(first.z, lesion), np.nanmean(first.localisation[lesion])),
                 (f"stage 2 alone ({second.chains} chain(s))", auroc(second.z, lesion), np.nanmean(second.localisation[lesion]))]
        outcomes = [two_stage(first, second, lesion, r) for r in args.rates]
        if chosen is None:
            reaching = [o.rate for o in outcomes if o.dataset_auroc >= args.target]
            chosen = min(reaching) if reaching else max(args.rates)
        rows.append((split, alone, outcomes, first, second))
    lines = ["# Two-stage screening, simulated from cached runs", "",
             f"Command: `python benchmarks/sim_two_stage.py --stage1 {args.stage1} --stage2 {args.stage2} --tune {args.tune} "
             f"--splits {' '.join(map(str, args.splits))} --target {args.target:g} --rates {' '.join(f'{r:g}' for r in args.rates)} --out {args.out}`", "",
             f"Patch {args.patch}, sigma window {window[0]:g}-{window[1]:g}. Rate: the fraction of the calibration-range healthy "
             f"slices whose stage-1 KL z-score passes the escalation threshold. Chosen on split {args.tune} (the smallest rate "
             f"whose dataset AUROC reaches {args.target:g}, else the largest): **{chosen:g}**. Flags: escalated slices whose stage-2 z-score passes "
             f"stage 2's threshold (5 % of its cross-fitted healthy calibration scores).", "",
             "| split | rate | escalate above z | dataset AUROC | localisation AUROC | escalated healthy / lesion | "
             "chains per slice, healthy / mix | flagged healthy / lesion |", "|---|---|---|---|---|---|---|---|"]
    for split, alone, outcomes, first, second in rows:
        for name, ds, loc in alone:
            threshold = first.flag_threshold if name.startswith("stage 1") else second.flag_threshold
            lines.append(f"| {split} | {name} | – | {ds:.3f} | {loc:.3f} | – | – | flag above z {threshold:.2f} |")
        for o in outcomes:
            mark = "**" if o.rate == chosen else ""
            lines.append(f"| {split} | {mark}{o.rate:g}{mark} | {o.escalate_above:.2f} | {mark}{o.dataset_auroc:.3f}{mark} | "
                         f"{o.localisation_auroc:.3f} | {o.escalated_healthy:.2f} / {o.escalated_lesion:.2f} | "
                         f"{o.chains_healthy:.2f} / {o.chains_mix:.2f} | {o.flagged_healthy} / {o.flagged_lesion} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
