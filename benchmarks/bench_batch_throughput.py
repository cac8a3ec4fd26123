"""CPU throughput per image against the batch of posterior samples (issue 20: "find the batch at which
CPU throughput per image peaks").

    python benchmarks/bench_batch_throughput.py [--threads 2] [--batches 1 2 4 8] [--repeats 5]
        [--precision float32|bfloat16] [--compile] [--channels-last] [--plain-norm]

For each batch B it times, on the shipped prior at 256²:
- the bare denoiser forward pass (no autograd), as `klviewer.priors.timing` does;
- one `pigdm` guidance step, the default analysis's unit of work: a forward pass with autograd, the
  vector-Jacobian product and the conjugate-gradient data term, on a 24-view phantom measurement.
Times are medians per call, divided by B for the per-image columns. Writes a markdown table.
With `--compile` the same rows follow for the network under `torch.compile` (inductor), in the same
process, each shape compiled during the warm-up calls and the compile time reported. The eager
and compiled rows run the network's weights contiguous; with `--channels-last` the same rows follow
for them in channels-last memory order (the layout
oneDNN's convolutions prefer; each convolution's output then keeps it). `--precision bfloat16`
times both under the sampler's bfloat16 autocast. `--plain-norm` adds the `pigdm` step with the
network's group norms left to autocast (bfloat16 on the CPU) against the shipped float32 ones
(`FloatGroupNorm`), weights as loaded, the two timed call by call in turn.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from klviewer.inference.measurements import ct_measurement_model
from klviewer.inference.sampler import PRECISIONS, SamplerSettings, make_guidance
from klviewer.phantoms import FOV_MM, make_phantom
from klviewer.physics.acquisition import simulate_measurement
from klviewer.priors.checkpoint import CPU_MEMORY_FORMAT, DEFAULT_PRIOR, load_prior
from klviewer.priors.timing import time_denoiser
from klviewer.priors.unet import FloatGroupNorm


def time_guidance_step(prior, model, batch: int, repeats: int, warmup: int = 2, sigma: float = 0.2,
                       precision: str = "float32") -> float:
    """Median wall time (ms) of one `pigdm` step on a batch of `batch` posterior samples."""
    guidance = make_guidance(prior, model, SamplerSettings(precision=precision))
    size = prior.config.image_size
    x = torch.randn(batch, prior.config.channels, *size, generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        guidance(x, sigma, 0.01)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def set_norms(prior, kind: type) -> None:
    """Give every group norm of the network the class `kind` (FloatGroupNorm or nn.GroupNorm; same parameters)."""
    for module in prior.net.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.__class__ = kind


def time_norm_pairs(prior, model, args: argparse.Namespace) -> list[tuple]:
    """`pigdm` steps with the group norms in bfloat16 (nn.GroupNorm under CPU autocast) and in float32
    (FloatGroupNorm), interleaved call by call so that the machine's drift falls on both alike."""
    rows = []
    for batch in args.batches:
        times: dict[type, list[float]] = {torch.nn.GroupNorm: [], FloatGroupNorm: []}
        for i in range(2 + args.repeats):
            for kind, kept in times.items():
                set_norms(prior, kind)
                step = time_guidance_step(prior, model, batch, 1, warmup=0, precision=args.precision)
                if i >= 2:
                    kept.append(step)
        plain, floated = (statistics.median(t) for t in times.values())
        rows.append((batch, plain, floated))
        print(f"batch {batch}: pigdm step {plain:.0f} ms with the norms in {args.precision}, {floated:.0f} ms in float32",
              flush=True)
    set_norms(prior, FloatGroupNorm)
    return rows


def time_rows(prior, model, size: int, args: argparse.Namespace, network: str) -> list[tuple]:
    rows = []
    for batch in args.batches:
        first = time_guidance_step(prior, model, batch, 1, warmup=0, precision=args.precision) / 1000  # compiles this shape
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bfloat16"
                    else contextlib.nullcontext())
        with autocast:
            forward = time_denoiser(prior, size, batch, args.repeats, threads=args.threads).median_ms
        step = time_guidance_step(prior, model, batch, args.repeats, precision=args.precision)
        rows.append((network, batch, forward, forward / batch, step, step / batch, first))
        print(f"{network} batch {batch}: forward {forward:.0f} ms ({forward / batch:.0f}/image), pigdm step {step:.0f} ms "
              f"({step / batch:.0f}/image), first step {first:.1f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the network under torch.compile")
    p.add_argument("--channels-last", action="store_true", help="also time the network with channels-last weights")
    p.add_argument("--plain-norm", action="store_true",
                   help="also time the step with the group norms in the autocast's precision, interleaved with float32 ones")
    p.add_argument("--precision", choices=PRECISIONS, default="float32", help="the denoiser's arithmetic, as the sampler's")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "batch_throughput.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prior = load_prior(DEFAULT_PRIOR)
    size = prior.config.image_size[0]
    phantom = make_phantom("healthy", size, seed=1)
    model = ct_measurement_model(simulate_measurement(phantom.hu, FOV_MM / size, 24, seed=0), prior)
    load_start = os.getloadavg()
    # The baseline runs contiguous weights whatever order `load_prior` leaves them in (channels-last on the CPU).
    prior.net.to(memory_format=torch.contiguous_format)
    rows = time_rows(prior, model, size, args, "eager")
    if args.channels_last:
        prior.net.to(memory_format=torch.channels_last)
        rows += time_rows(prior, model, size, args, "channels_last")
        prior.net.to(memory_format=torch.contiguous_format)
    norm_pairs = []
    if args.plain_norm:
        prior.net.to(memory_format=CPU_MEMORY_FORMAT)
        norm_pairs = time_norm_pairs(prior, model, args)
        prior.net.to(memory_format=torch.contiguous_format)
    if args.compile:
        prior.net = torch.compile(prior.net, dynamic=False)
        rows += time_rows(prior, model, size, args, "torch.compile")
    load_end = os.getloadavg()
    best = min(rows, key=lambda r: r[5])
    command = " ".join(["python benchmarks/bench_batch_throughput.py", *sys.argv[1:]]) if argv is None else ""
    lines = [
        "# CPU throughput per image against the batch of posterior samples", "",
        f"Command: `{command}`; shipped prior, {size}², {args.precision}, {args.threads} torch "
        f"threads; load average {' '.join(f'{v:.2f}' for v in load_start)} at the start, "
        f"{' '.join(f'{v:.2f}' for v in load_end)} at the end. Medians of {args.repeats} calls; the first step of each "
        "shape (with the compile, under torch.compile) is timed apart.", "",
        "| network | batch | denoiser forward (ms) | per image (ms) | `pigdm` step: forward + VJP + CG (ms) | "
        "per image (ms) | step / forward per image | first step (s) |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {n} | {b} | {f:.0f} | {fi:.0f} | {st:.0f} | {si:.0f} | {si / fi:.2f} | {first:.1f} |"
          for n, b, f, fi, st, si, first in rows], "",
        f"Cheapest `pigdm` step per image: {best[0]}, batch {best[1]} ({best[5]:.0f} ms, against {rows[0][5]:.0f} ms "
        "eager at batch 1).",
        "",
    ]
    if norm_pairs:
        lines += [
            f"The `pigdm` step with the group norms in {args.precision} (nn.GroupNorm under autocast) and in float32 "
            f"(FloatGroupNorm, as shipped), weights as loaded on the CPU, the two timed call by call in turn; medians of {args.repeats}:",
            "", f"| batch | norms in {args.precision} (ms) | norms in float32 (ms) | float32 / {args.precision} |",
            "|---|---|---|---|",
            *[f"| {b} | {plain:.0f} | {floated:.0f} | {floated / plain:.2f} |" for b, plain, floated in norm_pairs], "",
        ]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
