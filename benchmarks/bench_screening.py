"""Screening settings: cost per 256² slice against detection AUROC (issue 20).

    python benchmarks/bench_screening.py cost --out COST.json [--slices 4] NAME="OPTIONS" ...
    python benchmarks/bench_screening.py table --cost COST.json --out TABLE.md NAME=SPLIT:DETECTION.json[@PATCH:LO-HI] ...
    python benchmarks/bench_screening.py series --out SERIES.md [--slices 8] [--batches 1 4] [--device cpu|cuda] [--layouts channels_last contiguous] NAME="OPTIONS" ...

`cost` analyses `--slices` healthy phantoms with each named setting (OPTIONS are `klviewer analyze`
sampler options, e.g. "--profile screening --samples 6") in one process, after timing 100 bare
forward passes of the prior there, and counts the network evaluations of every analysis: denoiser
forward passes and vector-Jacobian products through the denoiser. The load average is recorded at
the start and end. `table` joins those costs with the `klip_z` AUROCs of `klviewer evaluate
detect` runs (their `detection_lesion.json`), one column pair per split. `series` analyses one
series of `--slices` healthy phantoms with each setting and each slice batch (slices whose chains
share a forward pass, `analyze_slices(slice_batch=...)`): series throughput, and how far each
slice's numbers moved from the unbatched run (rounding only, if batching is right). A setting's
OPTIONS may name its own `--prior` (a smaller one, say); the ratio is always to the 100 forward
passes of `series --prior`.
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

import torch

from klviewer.cli.options import (
    add_escalation_options,
    add_measurement_options,
    add_sampler_options,
    escalation_from_args,
    settings_from_args,
)
from klviewer.evaluation.detection import series_from_phantom
from klviewer.inference.escalation import Escalation
from klviewer.inference.measurements import prepare_slice
from klviewer.inference.pipeline import LoadedPrior, analyze_prepared, analyze_slices
from klviewer.inference.plan import plan_open_series
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.study import Series, Slice
from klviewer.phantoms import make_phantom
from klviewer.priors.checkpoint import CPU_MEMORY_FORMAT, DEFAULT_PRIOR

LAYOUTS = {"loaded": torch.preserve_format, "channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
"""Memory orders `series --layouts` can put the network's weights in."""


def parsed_options(options: str, device: str = "cpu") -> argparse.Namespace:
    """These `klviewer analyze` options (sampler, measurement, escalation and `--prior`), parsed."""
    p = argparse.ArgumentParser()
    add_measurement_options(p)
    add_sampler_options(p, flag_help="")
    add_escalation_options(p)
    p.add_argument("--prior")
    return p.parse_args(shlex.split(options) + ["--device", device])


def options_of(options: str, device: str = "cpu") -> tuple[AnalysisSettings, Escalation | None]:
    """The analysis settings and escalation (two stages, or None) that these `klviewer analyze` options give."""
    args = parsed_options(options, device)
    return settings_from_args(args), escalation_from_args(args)


def settings_of(options: str, device: str = "cpu") -> AnalysisSettings:
    """The analysis settings that these `klviewer analyze` options give."""
    return options_of(options, device)[0]


class CountingPrior:
    """Counts the images the denoiser sees, with and without autograd (a pass with autograd is
    followed by one vector-Jacobian product in every guidance that takes one)."""

    def __init__(self, prior) -> None:
        self.prior, self.forward, self.with_grad = prior, 0, 0

    def __getattr__(self, name: str):
        return getattr(self.prior, name)

    def denoise(self, x: torch.Tensor, sigma):
        self.forward += x.shape[0]
        self.with_grad += x.shape[0] if torch.is_grad_enabled() and x.requires_grad else 0
        return self.prior.denoise(x, sigma)


def bare_forwards_seconds(prior, n: int = 100, warmup: int = 3) -> float:
    x = torch.randn(1, prior.config.channels, *prior.config.image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for _ in range(warmup):
            prior.denoise(x, 0.1)
        start = time.perf_counter()
        for _ in range(n):
            prior.denoise(x, 0.1)
    return time.perf_counter() - start


def cost(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    loaded = LoadedPrior.load(args.prior, "cpu")
    size = loaded.prior.config.image_size[0]
    load_start = os.getloadavg()
    forwards = [bare_forwards_seconds(loaded.prior) for _ in range(2)]
    rows = []
    for spec in args.settings:
        name, options = spec.split("=", 1)
        settings = settings_of(options)
        counting = CountingPrior(loaded.prior)
        seconds = []
        for i in range(args.slices):
            phantom = make_phantom("healthy", size, seed=args.phantom_seed + i)
            prepared = prepare_slice(series_from_phantom(phantom), 0, loaded.prior, settings, loaded.device)
            start = time.perf_counter()
            analyze_prepared(prepared, counting, settings, prior_name=loaded.name, flag_threshold=None)
            seconds.append(time.perf_counter() - start)
        rows.append({"name": name, "options": options, "describe": settings.describe_sampling(),
                     "settings": settings.to_dict(), "seconds": seconds, "median_seconds": statistics.median(seconds),
                     "forwards_per_slice": counting.forward / args.slices, "vjps_per_slice": counting.with_grad / args.slices})
        print(f"{name}: {statistics.median(seconds):.2f} s/slice, {rows[-1]['forwards_per_slice']:.0f} forwards, "
              f"{rows[-1]['vjps_per_slice']:.0f} VJPs", flush=True)
    forwards.append(bare_forwards_seconds(loaded.prior))
    doc = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "threads": args.threads,
           "prior": loaded.name, "size": size, "load_start": load_start, "load_end": os.getloadavg(),
           "bare_100_forwards_seconds": forwards, "rows": rows}
    args.out.write_text(json.dumps(doc, indent=2))
    return 0


def series(args: argparse.Namespace) -> int:
    """Series throughput per setting and slice batch, with the largest change of any slice's score and
    total KL against slice batch 1 (the first batch given). A setting may run another prior (`--prior P`
    in its options, e.g. a distilled one); the ratio is always to `--prior`'s forward passes."""
    torch.set_num_threads(args.threads)
    reference = LoadedPrior.load(args.prior, args.device)
    size = reference.prior.config.image_size[0]
    phantoms = [make_phantom("healthy", size, seed=args.phantom_seed + i) for i in range(args.slices)]
    spacing = phantoms[0].pixel_spacing_mm
    volume = Series(uid="phantom-series", modality="CT", source_kind="array", description="healthy phantoms",
                    slices=[Slice(hu=p.hu) for p in phantoms], pixel_spacing_mm=(spacing, spacing))
    plan = plan_open_series([(volume, range(args.slices))])
    load_start = os.getloadavg()
    cpu = reference.device.type == "cpu"
    # 100 forward passes drifted by up to 40 % within one process on this machine, so they are timed before and
    # after the series and the ratio is to the median of all six.
    before = [bare_forwards_seconds(reference.prior) for _ in range(3)] if cpu else []
    rows = []
    for spec in args.settings:
        name, options = spec.split("=", 1)
        parsed = parsed_options(options, args.device)  # once: settings_from_args may print a notice
        settings, escalation = settings_from_args(parsed), escalation_from_args(parsed)
        loaded = LoadedPrior.load(parsed.prior, args.device) if parsed.prior else reference
        first: list | None = None
        for layout in args.layouts:
            loaded.prior.to(memory_format=LAYOUTS[layout])
            for batch in args.batches:
                if loaded.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                results = [item.result for item in analyze_slices(plan, loaded, settings, slice_batch=batch,
                                                                  escalation=escalation)]
                seconds = time.perf_counter() - start
                escalated = (f"{sum(r.settings.samples > settings.samples for r in results)} of {len(results)}"
                             if escalation else "–")
                first = first or results
                moved = max(max(abs(r.score - f.score) / abs(f.score), abs(r.total_kl - f.total_kl) / abs(f.total_kl))
                            for r, f in zip(results, first))
                label = name if args.layouts == ["loaded"] else f"{name} ({layout})"
                rows.append((label, options, batch, seconds, moved, escalated))
                print(f"{label} slice batch {batch}: {seconds:.1f} s for {args.slices} slices, "
                      f"{args.slices / seconds:.2f} slices/s, numbers moved {moved:.1e}, escalated {escalated}",
                      flush=True)
    if cpu:
        reference.prior.to(memory_format=CPU_MEMORY_FORMAT)
    after = [bare_forwards_seconds(reference.prior) for _ in range(3)] if cpu else []
    forwards = statistics.median(before + after) if cpu else None
    device = torch.cuda.get_device_name(0) if reference.device.type == "cuda" else f"CPU, {args.threads} torch threads"
    base = (f"; 100 bare forward passes at batch 1 (weights as loaded) took {forwards:.2f} s (median of 3 before the "
            f"series, {', '.join(f'{t:.2f}' for t in before)} s, and 3 after, {', '.join(f'{t:.2f}' for t in after)} s)"
            if forwards else "")
    lines = [
        "# Series throughput: slices batched into one forward pass",
        "",
        f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`; {device}, prior {reference.name} at {size}²; "
        f"one series of {args.slices} healthy phantoms{base}; load average {' '.join(f'{v:.2f}' for v in load_start)} "
        f"at the start, {' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end. Seconds are the whole series "
        "through `analyze_slices` (measurement, sampling, maps). *Moved* is the largest relative change of any "
        f"slice's score or total KL against slice batch {args.batches[0]}; *escalated*: the slices that a two-stage "
        "setting (`--escalate`) gave more chains"
        + ("." if args.layouts == ["loaded"] else f" with the network's weights {args.layouts[0]}."),
        "",
        "| setting | slice batch | s / series | s / slice | slices / s | " + ("× 100 forwards | " if forwards else "")
        + "moved | escalated |",
        "|---|---|---|---|---|" + ("---|" if forwards else "") + "---|---|",
    ]
    for name, options, batch, seconds, moved, escalated in rows:
        per = seconds / args.slices
        ratio = f"{per / forwards:.2f} | " if forwards else ""
        lines.append(f"| {name} `{options}` | {batch} | {seconds:.1f} | {per:.2f} | {1 / per:.3f} | {ratio}{moved:.1e} "
                     f"| {escalated} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def klip_z_of(spec: str) -> tuple[str, dict[str, float]]:
    """(split, AUROCs) of one `SPLIT:DETECTION.json[@PATCH:LO-HI]`: the run's own `klip_z`, or the
    z-scores of its sweep at another patch and sigma window of the same runs."""
    split, rest = spec.split(":", 1)
    path, _, map_settings = rest.partition("@")
    doc = json.loads(Path(path).read_text())
    if not map_settings:
        z = doc["methods"]["klip_z"]
        return split, {"dataset": z["dataset_auroc"], "localisation": z["localisation_auroc"]}
    patch, window = map_settings.split(":")
    entry = next(e for e in doc["sweep"] if e["patch"] == int(patch) and e["sigma_window"] == window)
    return split, {"dataset": entry["z_dataset_auroc"], "localisation": entry["z_localisation_auroc"],
                   "map": f"patch {patch}, sigma {window}"}


def table(args: argparse.Namespace) -> int:
    """Rows: the cost rows, and a row NAME+MAP for each detection spec that re-cuts a cost row's runs
    at other map settings (same sampling, same cost)."""
    doc = json.loads(args.cost.read_text())
    forwards = statistics.median(doc["bare_100_forwards_seconds"])
    costs = {row["name"]: row for row in doc["rows"]}
    aurocs: dict[str, dict[str, dict[str, float]]] = {}
    for spec in args.detections:
        name, rest = spec.split("=", 1)
        split, z = klip_z_of(rest)
        aurocs.setdefault(name, {})[split] = z
    splits = list(dict.fromkeys(split for by_split in aurocs.values() for split in by_split))
    lines = [
        "# Screening settings: cost per slice against detection AUROC",
        "",
        f"Cost: `{doc['command']}`; {doc['threads']} torch threads, prior {doc['prior']} at {doc['size']}²; "
        f"100 bare forward passes took {', '.join(f'{s:.2f}' for s in doc['bare_100_forwards_seconds'])} s "
        f"(median {forwards:.2f} s); load average {' '.join(f'{v:.2f}' for v in doc['load_start'])} at the start, "
        f"{' '.join(f'{v:.2f}' for v in doc['load_end'])} at the end. Seconds are the median over healthy 256² "
        "phantoms of one whole analysis (measurement, sampling, maps). Network evaluations are per slice.",
        "",
        "AUROCs are the KL z-score's (`klip_z`), dataset / localisation, from `klviewer evaluate detect --n-id 20 "
        "--n-ood 20 --seed S --cache DIR OPTIONS` with its 40-slice healthy reference (tune: `--seed 1`, test: "
        "`--seed 0`). A row `NAME+patch P` re-cuts NAME's runs at another patch and sigma window.",
        "",
        "| setting | forwards | VJPs | s / slice | × 100 forwards | " + " | ".join(splits) + " |",
        "|---|---|---|---|---|" + "---|" * len(splits),
    ]
    for name in list(costs) + [n for n in aurocs if n not in costs]:
        row = costs[name.split("+")[0]]
        recut = next((z["map"] for z in aurocs.get(name, {}).values() if "map" in z and name not in costs), None)
        describe = row["describe"] if recut is None else f"the runs of {name.split('+')[0]}, KL z-scores at {recut}"
        cells = [f"{aurocs[name][s]['dataset']:.3f} / {aurocs[name][s]['localisation']:.3f}"
                 if s in aurocs.get(name, {}) else "–" for s in splits]
        lines.append(f"| {name}: {describe}<br>`{row['options']}` | {row['forwards_per_slice']:.0f} | "
                     f"{row['vjps_per_slice']:.0f} | {row['median_seconds']:.2f} | {row['median_seconds'] / forwards:.2f} | "
                     + " | ".join(cells) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cost")
    c.add_argument("settings", nargs="+", metavar='NAME="OPTIONS"')
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--slices", type=int, default=4)
    c.add_argument("--phantom-seed", type=int, default=1)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--prior", default=DEFAULT_PRIOR)
    c.set_defaults(func=cost)
    r = sub.add_parser("series")
    r.add_argument("settings", nargs="+", metavar='NAME="OPTIONS"')
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--slices", type=int, default=8)
    r.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    r.add_argument("--phantom-seed", type=int, default=1)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    r.add_argument("--layouts", nargs="+", choices=tuple(LAYOUTS), default=["loaded"],
                   help="memory orders of the network's weights to time (loaded: as load_prior leaves them)")
    r.add_argument("--prior", default=DEFAULT_PRIOR)
    r.set_defaults(func=series)
    t = sub.add_parser("table")
    t.add_argument("detections", nargs="+", metavar="NAME=SPLIT:DETECTION.json[@PATCH:LO-HI]")
    t.add_argument("--cost", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.set_defaults(func=table)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
