"""Choose the KLIP patch size and sigma window on a tuning split and report them on the test split.

Usage: python benchmarks/select_detection_settings.py TUNE.json TEST.json [--out FILE.md]

Both files come from `klviewer evaluate detect` with the same settings and different `--seed`
(the seed moves the phantom set, so the two splits share no slice). Each criterion picks its
cell on TUNE alone; the TEST row is what that choice gives on unseen slices. Runs made with a
healthy reference (`--reference N`) get a second table for the KL z-scores (`klip_z`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CRITERIA = {
    "dataset AUROC": lambda r, z: r[z + "dataset_auroc"],
    "localisation AUROC": lambda r, z: r[z + "localisation_auroc"],
    "localisation above the centre control":
        lambda r, z: r[z + "localisation_auroc"] - r.get("centre_control_localisation", 0.0),
    "sum of both AUROCs": lambda r, z: r[z + "dataset_auroc"] + r[z + "localisation_auroc"],
}


def _cell(report: dict, patch: int, window: str) -> dict:
    return next(r for r in report["sweep"] if r["patch"] == patch and r["sigma_window"] == window)


def _best_baseline(report: dict, patch: int) -> str:
    """The measurement-based baseline with the highest localisation AUROC at `patch` (runs that
    predate the per-patch baselines have none)."""
    rows = [r for r in report.get("baselines", []) if r["patch"] == patch and r["method"] != "centre_distance"]
    if not rows:
        return "-"
    best = max(rows, key=lambda r: r["localisation_auroc"])
    return f"{best['method']} {best['dataset_auroc']:.3f} / {best['localisation_auroc']:.3f}"


def selection_table(tune: dict, test: dict) -> str:
    if tune["settings"] | {"seed": 0} != test["settings"] | {"seed": 0}:
        raise SystemExit("the two runs differ in more than --seed; compare like with like")
    s = test["settings"]
    lines = [
        f"### guidance `{s['guidance']}`, {s['samples']} sample(s), {s['steps']} steps, {s['views']} views",
        "",
        f"Tune: `{tune['command']}`  ",
        f"Test: `{test['command']}`",
    ]
    prefixes = [("KLIP (largest patch KL)", "")]
    if "z_dataset_auroc" in tune["sweep"][0] and "z_dataset_auroc" in test["sweep"][0]:
        prefixes.append(("KLIP z-score against the healthy reference (`klip_z`)", "z_"))
    for title, z in prefixes:
        lines += ["", f"{title}:", "",
                  "| chosen on tune by | patch | sigma window | tune dataset | tune localisation | test dataset | test localisation | test centre control | test best baseline (dataset / localisation) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += _rows(tune, test, z)
    return "\n".join(lines) + "\n"


def _rows(tune: dict, test: dict, z: str) -> list[str]:
    s = test["settings"]
    lines = []
    for name, key in CRITERIA.items():
        if "centre control" in name and "centre_control_localisation" not in tune["sweep"][0]:
            continue  # a tuning run made before the control existed
        best = max(tune["sweep"], key=lambda r: key(r, z))
        t = _cell(test, best["patch"], best["sigma_window"])
        control = t.get("centre_control_localisation")
        lines.append(f"| {name} | {best['patch']} | {best['sigma_window']} | {best[z + 'dataset_auroc']:.3f} | "
                     f"{best[z + 'localisation_auroc']:.3f} | {t[z + 'dataset_auroc']:.3f} | {t[z + 'localisation_auroc']:.3f} | "
                     f"{'-' if control is None else f'{control:.3f}'} | {_best_baseline(test, best['patch'])} |")
    d = _cell(test, s["patch"], "-".join(f"{v:g}" for v in s["sigma_window"]) if s["sigma_window"] else "all")
    lines.append(f"| (default: patch {s['patch']}) | {s['patch']} | {d['sigma_window']} | - | - | "
                 f"{d[z + 'dataset_auroc']:.3f} | {d[z + 'localisation_auroc']:.3f} | "
                 f"{d.get('centre_control_localisation', float('nan')):.3f} | {_best_baseline(test, s['patch'])} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", type=Path, help="TUNE.json TEST.json, repeated for more settings")
    parser.add_argument("--out", type=Path, help="write the markdown here as well")
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error("give the files in TUNE TEST pairs")
    parts = ["# KLIP settings chosen on a tuning split, reported on the test split", ""]
    for tune, test in zip(args.pairs[::2], args.pairs[1::2]):
        parts.append(selection_table(json.loads(tune.read_text()), json.loads(test.read_text())))
    text = "\n".join(parts)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
