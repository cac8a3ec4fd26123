"""How long one denoiser call takes: the posterior sampler calls it about 100 times per sample.

    python -m klviewer.priors.timing [PRIOR] [--size 256] [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from klviewer.priors.base import Prior


@dataclass
class DenoiserTiming:
    size: int
    batch: int
    threads: int
    median_ms: float
    min_ms: float
    max_ms: float


def time_denoiser(prior: Prior, size: int = 256, batch: int = 1, repeats: int = 20, warmup: int = 3,
                  threads: int | None = None, sigma: float = 0.1) -> DenoiserTiming:
    """Wall time of ``prior.denoise`` on a (batch, C, size, size) input without autograd."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        x = torch.randn(batch, prior.config.channels, size, size, device=prior.device)
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                prior.denoise(x, sigma)
                if x.device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(1000 * (time.perf_counter() - start))
        return DenoiserTiming(size, batch, torch.get_num_threads(), statistics.median(times), min(times), max(times))
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    from klviewer.priors.checkpoint import DEFAULT_PRIOR, load_prior

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prior", nargs="?", default=DEFAULT_PRIOR)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    t = time_denoiser(load_prior(args.prior), args.size, args.batch, args.repeats, threads=args.threads)
    print(f"{args.prior}: {t.size}x{t.size} batch {t.batch}, {t.threads} threads: median {t.median_ms:.1f} ms "
          f"(min {t.min_ms:.1f}, max {t.max_ms:.1f}) over {args.repeats} calls")


if __name__ == "__main__":
    main()
