"""How close each guidance's summed KL energy comes to the closed-form KL, for a correlated Gaussian prior.

Usage: python benchmarks/bench_guidance_gaussian.py [--samples 32] [--steps 200] [--out FILE.md]

A 16x16 Gaussian prior with a squared-exponential covariance (length 2 px), measured by 40 random
projections or by inpainting 30 % of the pixels, noise variance 0.05. `exact` uses the exact
likelihood score, so its energy converges to KL(p(x|y) || p(x)); `dc` and `pigdm` approximate
p(x0 | x_sigma) by an isotropic Gaussian, and differ only in the Jacobian dD/dx they use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_inference_math import N, RandomProjections, _closed_form_kl, _measure, _smooth_gaussian_prior  # noqa: E402

from klviewer.inference.sampler import SamplerSettings, posterior_sample  # noqa: E402
from klviewer.io.safe_write import atomic_write_text  # noqa: E402
from klviewer.physics.inpainting import Inpainting, random_mask  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "guidance_gaussian.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prior = _smooth_gaussian_prior()
    operators = {
        "40 random projections": RandomProjections(40, seed=1),
        "inpainting, 30 % of pixels": Inpainting(random_mask((1, 1, N, N), 0.3, torch.Generator().manual_seed(2))),
    }
    lines = ["# Summed KL energy against the closed form (correlated Gaussian prior)", "",
             f"Command: `python benchmarks/bench_guidance_gaussian.py --samples {args.samples} --steps {args.steps}`", "",
             f"{N}x{N} Gaussian prior, squared-exponential covariance (length 2 px, variance 0.25), noise variance 0.05; "
             f"{args.steps} steps, {args.samples} posterior samples, sigma 20 to 0.002, 20 CG iterations.", "",
             "| measurement | closed-form KL (nats) | exact | pigdm | dc |", "|---|---|---|---|---|"]
    for name, operator in operators.items():
        model = _measure(prior, operator, noise_var=0.05)
        expected = _closed_form_kl(prior, model)
        cells = []
        for guidance in ("exact", "pigdm", "dc"):
            settings = SamplerSettings(steps=args.steps, samples=args.samples, guidance=guidance, sigma_max=20.0,
                                       seed=5, cg_iters=20)
            total = posterior_sample(prior, model, settings).energy.total()
            cells.append(f"{total:.1f} ({total / expected:.2f}×)")
        lines.append(f"| {name} | {expected:.1f} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out, text, overwrite=True)
    print(text)


if __name__ == "__main__":
    main()
