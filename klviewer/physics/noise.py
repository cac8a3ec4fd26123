"""Noise models on line integrals, with explicit generators and per-measurement variances.

``sample`` draws a noisy measurement from clean line integrals; ``variance`` gives the
per-measurement variance the posterior sampler weights its likelihood with. Same generator
state, same device -> identical draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

ZERO_COUNT_FLOOR = 0.5
"""Counts below this are read as this many counts before taking the log, because log(0) has no
value. Half a count sits between the two smallest possible observations (0 and 1), caps a line
integral at log(2 * I0); raw-count sinograms are read through ``from_counts`` too."""


class NoiseModel(Protocol):
    def sample(self, p_clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...

    def variance(self, y_or_p: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict: ...


def from_counts(counts: torch.Tensor, i0: float) -> torch.Tensor:
    """Line integrals ``-log(counts / I0)`` from photon counts, with zero counts floored (ZERO_COUNT_FLOOR)."""
    return -torch.log(counts.clamp(min=ZERO_COUNT_FLOOR) / i0)


@dataclass(frozen=True)
class GaussianNoise:
    """Additive white Gaussian noise of standard deviation ``sigma`` on the line integrals.

    ``sigma = 0`` is noise-free: ``sample`` returns the clean data without drawing, and the
    variance is 0, which consumers must treat as exact data (no division by it).
    """

    sigma: float

    def __post_init__(self) -> None:
        if not (self.sigma >= 0 and self.sigma != float("inf")):
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma}")

    def sample(self, p_clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.sigma == 0:
            return p_clean.clone()
        noise = torch.randn(p_clean.shape, generator=generator, device=p_clean.device, dtype=p_clean.dtype)
        return p_clean + self.sigma * noise

    def variance(self, y_or_p: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y_or_p, self.sigma**2)

    def describe(self) -> dict:
        return {"model": "gaussian", "sigma": self.sigma}


@dataclass(frozen=True)
class PoissonNoise:
    """Photon-counting noise: ``counts ~ Poisson(I0 * exp(-p))``, measured as ``-log(counts / I0)``.

    ``i0`` is the expected unattenuated count per ray (the dose knob). ``variance`` is the
    delta-method variance of the log measurement, ``1 / (I0 exp(-p))`` (one over the expected
    counts), evaluated at whatever line integrals it is given: the clean ones when known, else
    the measured ones as a plug-in estimate. A floored zero count gives variance 2, so such rays
    carry little weight.
    """

    i0: float

    def __post_init__(self) -> None:
        if not (self.i0 > 0 and self.i0 != float("inf")):
            raise ValueError(f"i0 must be a finite number > 0, got {self.i0}")

    def expected_counts(self, p: torch.Tensor) -> torch.Tensor:
        return self.i0 * torch.exp(-p)

    def sample_counts(self, p_clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.poisson(self.expected_counts(p_clean), generator=generator)

    def sample(self, p_clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return from_counts(self.sample_counts(p_clean, generator), self.i0)

    def variance(self, y_or_p: torch.Tensor) -> torch.Tensor:
        return 1.0 / self.expected_counts(y_or_p)

    def describe(self) -> dict:
        return {"model": "poisson", "i0": self.i0, "zero_count_floor": ZERO_COUNT_FLOOR}
