"""Unconditional sampling from a prior with EDM's deterministic Heun ODE sampler.

Used to look at what a prior has learned (training reports); posterior sampling with a
measurement lives in ``klviewer.inference``.
"""

from __future__ import annotations

import torch

from klviewer.priors.base import Prior


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """``steps`` noise levels from sigma_max down to sigma_min (Karras rho schedule), then a final 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def sample_heun(prior: Prior, n: int, steps: int = 32, generator: torch.Generator | None = None,
                image_size: tuple[int, int] | None = None, sigma_min: float | None = None,
                sigma_max: float | None = None) -> torch.Tensor:
    """(n, C, H, W) samples in prior units. The noise is drawn on the CPU from ``generator``."""
    cfg = prior.config
    h, w = image_size or cfg.image_size
    sigmas = karras_sigmas(steps, sigma_min or cfg.sigma_min, sigma_max or cfg.sigma_max).tolist()
    x = torch.randn((n, cfg.channels, h, w), generator=generator).to(prior.device) * sigmas[0]
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = (x - prior.denoise(x, s_cur)) / s_cur
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:
            d_next = (x_next - prior.denoise(x_next, s_next)) / s_next
            x_next = x + (s_next - s_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x
