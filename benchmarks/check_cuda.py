"""The CUDA paths, checked on a machine with a GPU (CI has none, so no test can do this).

Usage: python benchmarks/check_cuda.py [--prior NAME|PATH] [--steps 30] [--samples 2] [--oom]

1. One lesion slice analysed on the CPU and on CUDA with the same seed, `pigdm`, `dc` and `dps`. The
   noise is drawn on the CPU for every device, so the two should differ by rounding only.
   Printed: seconds, score, total KL, the reconstruction difference in HU, the correlation of
   the energy maps, and each PSNR.
2. With `--oom`: 8192 posterior samples per batch, which must run out of GPU memory, halve
   the batch until it fits, and say so in the result's notes (2 steps only).
3. A tiny prior trained on CUDA with AMP for 10 steps, against 5 steps plus a resume of 5:
   the weights must be identical.
4. Four slices analysed as one batch on CUDA (`analyze_prepared_batch`) against each alone: their
   scores should differ by rounding only. Series throughput at larger batches is
   `python benchmarks/bench_screening.py series --device cuda --slices 64 --batches 1 16 32 64 -- NAME="OPTIONS"`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from klviewer.evaluation.detection import series_from_phantom
from klviewer.evaluation.metrics import psnr_hu
from klviewer.inference.measurements import prepare_slice
from klviewer.inference.pipeline import analyze_prepared, analyze_prepared_batch
from klviewer.inference.settings import AnalysisSettings
from klviewer.phantoms import make_phantom
from klviewer.priors import load_prior
from klviewer.priors.train import TrainConfig, train_prior

TINY = {"size": 32, "batch": 4, "n_phantoms": 4, "report": False, "device": "cuda", "checkpoint_every": 5,
        "arch": {"channels": [8, 16], "emb_dim": 32, "fourier_features": 16, "groups": 4, "attention": False,
                 "pos_channels": 2, "stem": 1}}


def cpu_vs_cuda(prior_name: str, steps: int, samples: int) -> None:
    phantom = make_phantom("lesion", 256, 1_000_123)
    series = series_from_phantom(phantom)
    priors = {dev: load_prior(prior_name, device=torch.device(dev)) for dev in ("cpu", "cuda")}
    for guidance in ("pigdm", "dc", "dps"):
        runs = {}
        for dev, prior in priors.items():
            settings = AnalysisSettings(views=24, steps=steps, samples=samples, guidance=guidance, device=dev, seed=3)
            prepared = prepare_slice(series, 0, prior, settings, torch.device(dev))
            start = time.perf_counter()
            runs[dev] = analyze_prepared(prepared, prior, settings, prior_name=prior_name, flag_threshold=None)
            r = runs[dev]
            print(f"{guidance} {dev}: {time.perf_counter() - start:.1f} s, score {r.score:.2f}, total {r.total_kl:.1f}, "
                  f"PSNR {psnr_hu(phantom.hu, r.recon_hu):.2f} dB")
        a, b = runs["cpu"], runs["cuda"]
        diff = np.abs(a.recon_hu - b.recon_hu)
        corr = np.corrcoef(a.energy.energy.ravel(), b.energy.energy.ravel())[0, 1]
        print(f"{guidance} cpu vs cuda: recon |diff| mean {diff.mean():.3f} HU, max {diff.max():.2f} HU; "
              f"score {abs(a.score - b.score) / a.score:.1e} relative; energy correlation {corr:.6f}")


def oom_fallback(prior_name: str) -> None:
    dev = torch.device("cuda")
    prior = load_prior(prior_name, device=dev)
    settings = AnalysisSettings(views=24, steps=2, samples=8192, device="cuda")
    prepared = prepare_slice(series_from_phantom(make_phantom("healthy", 256, 7)), 0, prior, settings, dev)
    r = analyze_prepared(prepared, prior, settings, prior_name=prior_name, flag_threshold=None)
    print(f"8192 samples requested: {r.notes} ({r.seconds:.1f} s)")


def amp_resume() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        whole = train_prior(TrainConfig(out=Path(tmp) / "a", steps=10, **TINY))
        train_prior(TrainConfig(out=Path(tmp) / "b", steps=5, **TINY))
        resumed = train_prior(TrainConfig(out=Path(tmp) / "b", steps=10, resume=True, **TINY))
        wa, wb = load_prior(whole).net.state_dict(), load_prior(resumed).net.state_dict()
        worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    print(f"tiny prior on CUDA with AMP, 10 steps vs 5 + resume 5: largest weight difference {worst:.2e}")


def batched_slices(prior_name: str, steps: int) -> None:
    dev = torch.device("cuda")
    prior = load_prior(prior_name, device=dev)
    settings = AnalysisSettings(views=24, steps=steps, device="cuda")
    prepared = [prepare_slice(series_from_phantom(make_phantom(kind, 256, 1_000_200 + i)), 0, prior, settings, dev)
                for i, kind in enumerate(("healthy", "lesion", "healthy", "lesion"))]
    start = time.perf_counter()
    batched = analyze_prepared_batch(prepared, prior, settings, prior_name=prior_name, flag_threshold=None)
    seconds = time.perf_counter() - start
    alone = [analyze_prepared(p, prior, settings, prior_name=prior_name, flag_threshold=None) for p in prepared]
    moved = max(abs(b.score - a.score) / a.score for b, a in zip(batched, alone))
    print(f"4 slices in one batch: {seconds:.1f} s ({4 / seconds:.2f} slices/s); scores against each alone: "
          f"largest relative change {moved:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default="abdomen-phantom-256")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--oom", action="store_true", help="also check the out-of-memory fallback")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a machine with a GPU")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    cpu_vs_cuda(args.prior, args.steps, args.samples)
    if args.oom:
        oom_fallback(args.prior)
    amp_resume()
    batched_slices(args.prior, args.steps)


if __name__ == "__main__":
    main()
