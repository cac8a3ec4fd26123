"""An Acquisition is what the inference layer consumes: operator A, measurement y, noise model.

It comes either from an HU image (simulated here: HU -> mu -> A -> noise, one call) or from a
measured sinogram (`klviewer.io.sinogram_acquisition` builds the operator from the file's geometry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from klviewer.devices import resolve_device
from klviewer.errors import KlviewerInputError
from klviewer.physics.noise import GaussianNoise, NoiseModel, PoissonNoise
from klviewer.physics.radon import ParallelBeamCT, sparse_view_angles
from klviewer.physics.units import MU_WATER_PER_MM, hu_to_mu

AIR_HU = -1000.0

DEFAULT_SINOGRAM_SIGMA = 0.01
"""Gaussian noise assumed for a line-integral sinogram that states no dose: the standard deviation
of a line integral near zero attenuation at I0 = 1e4 photons per ray (sqrt(1 / 1e4))."""


@dataclass
class Acquisition:
    """A measurement ``y`` of shape (B, 1, n_views, n_detectors) and how it was taken."""

    operator: ParallelBeamCT
    y: torch.Tensor
    noise: NoiseModel
    reference_mu: torch.Tensor | None = None
    """(B, 1, H, W) attenuation (1/mm) the measurement was simulated from; None for measured data."""
    seed: int | None = None
    source: str = "simulated"
    mu_water_per_mm: float = MU_WATER_PER_MM

    @property
    def pixel_spacing_mm(self) -> float:
        return self.operator.pixel_spacing_mm

    @property
    def angles_rad(self) -> torch.Tensor:
        return self.operator.angles_rad

    @property
    def device(self) -> torch.device:
        return self.y.device

    def describe(self) -> dict:
        """Settings as plain JSON types, for provenance."""
        return {
            "source": self.source,
            "n_slices": int(self.y.shape[0]),
            **self.operator.describe(),
            "noise": self.noise.describe(),
            "seed": self.seed,
            "mu_water_per_mm": self.mu_water_per_mm,
        }


def simulate_measurement(
    hu: np.ndarray,
    pixel_spacing_mm: float,
    n_views: int = 24,
    i0: float | None = None,
    noise_sigma: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    arc_deg: float = 180.0,
) -> Acquisition:
    """Sparse-view measurement of an HU slice ``(H, W)`` or stack ``(S, H, W)``.

    HU below -1000 (scanner padding outside the field of view) is read as air, because negative
    attenuation has no physical meaning and would give negative line integrals. ``i0`` gives
    Poisson noise at that many unattenuated photons per ray, ``noise_sigma`` Gaussian noise on the
    line integrals; neither gives a noise-free measurement.
    """
    hu = np.asarray(hu)
    if hu.ndim not in (2, 3) or min(hu.shape[-2:]) < 2:
        raise KlviewerInputError(None, f"HU image must be (H, W) or (S, H, W) with H, W >= 2, got shape {hu.shape}")
    if not np.issubdtype(hu.dtype, np.number) or np.issubdtype(hu.dtype, np.complexfloating):
        raise KlviewerInputError(None, f"HU image must be real numbers, got dtype {hu.dtype}")
    if not np.isfinite(hu).all():
        raise KlviewerInputError(None, "HU image contains NaN or infinite values")
    if not (math.isfinite(pixel_spacing_mm) and pixel_spacing_mm > 0):
        raise KlviewerInputError(None, f"pixel spacing must be a positive number of mm, got {pixel_spacing_mm}")
    if n_views < 1:
        raise KlviewerInputError(None, f"n_views must be at least 1, got {n_views}")
    if i0 is not None and noise_sigma is not None:
        raise KlviewerInputError(None, "give either i0 (Poisson noise) or noise_sigma (Gaussian noise), not both")
    try:
        noise: NoiseModel = PoissonNoise(float(i0)) if i0 is not None else GaussianNoise(float(noise_sigma or 0.0))
    except ValueError as exc:
        raise KlviewerInputError(None, str(exc)) from None

    dev = resolve_device(device)
    stack = hu.reshape(-1, 1, *hu.shape[-2:]).astype(np.float32)
    mu = hu_to_mu(torch.from_numpy(np.maximum(stack, AIR_HU)).to(dev))
    operator = ParallelBeamCT(hu.shape[-2:], sparse_view_angles(n_views, arc_deg), pixel_spacing_mm=pixel_spacing_mm, device=dev)
    generator = torch.Generator(device=dev).manual_seed(seed)
    y = noise.sample(operator.A(mu), generator)
    return Acquisition(operator=operator, y=y, noise=noise, reference_mu=mu, seed=seed, source="simulated")
