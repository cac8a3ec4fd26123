"""The Acquisition of a measured sinogram: the operator rebuilt from the file's geometry.

It lives in io, beside the reader, so that physics never needs to know the Sinogram record.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from klviewer.devices import resolve_device
from klviewer.errors import KlviewerInputError
from klviewer.io.study import Sinogram
from klviewer.physics.acquisition import DEFAULT_SINOGRAM_SIGMA, Acquisition
from klviewer.physics.noise import GaussianNoise, NoiseModel, PoissonNoise
from klviewer.physics.radon import ParallelBeamCT


def acquisition_from_sinogram(
    sino: Sinogram,
    slice_index: int | Sequence[int] | None = None,
    noise_sigma: float | None = None,
    device: torch.device | str = "cpu",
) -> Acquisition:
    """Acquisition for measured slices of ``sino`` (all slices when ``slice_index`` is None).

    Noise: ``noise_sigma`` when given; else Poisson at the file's I0 when it states one; else
    Gaussian with DEFAULT_SINOGRAM_SIGMA. Raw counts were converted with ``from_counts`` on loading.
    """
    rows, cols = sino.grid_pixel_spacing_mm
    if not math.isclose(rows, cols, rel_tol=1e-6):
        raise KlviewerInputError(None, f"grid pixels must be square for the parallel-beam operator, got spacing {rows} x {cols} mm")
    if len(sino.angles_rad) != sino.n_angles:
        raise KlviewerInputError(None, f"sinogram has {sino.n_angles} views but {len(sino.angles_rad)} angles")
    indices = list(range(sino.n_slices)) if slice_index is None else [slice_index] if isinstance(slice_index, int) else list(slice_index)
    if not indices or any(not 0 <= i < sino.n_slices for i in indices):
        raise KlviewerInputError(None, f"slice index {slice_index} is outside the sinogram's {sino.n_slices} slices")

    dev = resolve_device(device)
    y = torch.from_numpy(np.asarray(sino.line_integrals[indices], dtype=np.float32))
    if not bool(torch.isfinite(y).all()):
        raise KlviewerInputError(None, "sinogram contains NaN or infinite values")
    try:
        if noise_sigma is not None:
            noise: NoiseModel = GaussianNoise(float(noise_sigma))
        elif sino.i0 is not None:
            noise = PoissonNoise(float(sino.i0))
        else:
            noise = GaussianNoise(DEFAULT_SINOGRAM_SIGMA)
        operator = ParallelBeamCT(
            tuple(sino.grid_size),
            sino.angles_rad,
            n_detectors=sino.n_detectors,
            detector_spacing_mm=sino.detector_spacing_mm,
            pixel_spacing_mm=float(rows),
            device=dev,
        )
    except ValueError as exc:
        raise KlviewerInputError(None, str(exc)) from None
    return Acquisition(operator=operator, y=y[:, None].to(dev), noise=noise, source="sinogram")
