"""Hounsfield units <-> linear attenuation (1/mm): ``mu = mu_water * (1 + HU / 1000)``."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

# Liquid water, density 1.0 g/cm^3, at 70 keV (the usual effective energy of a 120 kVp CT
# spectrum): mu/rho = 0.1929 cm^2/g from NIST XCOM (total attenuation with coherent scattering,
# https://physics.nist.gov/PhysRefData/Xcom/html/xcom1.html) -> 0.1929 /cm = 0.01929 /mm.
# Sanity check: the Hubbell & Seltzer table (NIST SRD 126) lists 0.2059 at 60 keV and 0.1837 at
# 80 keV, which log-log interpolate to 0.194, so the value is within 0.5 % of the tables.
MU_WATER_PER_MM: float = 0.01929

ArrayLike = TypeVar("ArrayLike", np.ndarray, torch.Tensor)


def hu_to_mu(hu: ArrayLike, mu_water: float = MU_WATER_PER_MM) -> ArrayLike:
    """Linear attenuation in 1/mm from HU; keeps the container type (numpy or torch)."""
    return mu_water * (1.0 + hu / 1000.0)


def mu_to_hu(mu: ArrayLike, mu_water: float = MU_WATER_PER_MM) -> ArrayLike:
    """HU from linear attenuation in 1/mm; keeps the container type (numpy or torch)."""
    return (mu / mu_water - 1.0) * 1000.0
