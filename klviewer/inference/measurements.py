"""Measurements on a prior's grid: prepare one slice, its linear model in prior units, and sets of them.

Image inputs are resampled to the prior's grid and their measurement is simulated; sinogram
inputs keep their measurement. `collect_measurements` and `measure_plan` prepare every slice of a
plan, for `shift`, `align`, `compare` and the app's prior-fit and alignment jobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from klviewer.errors import KlviewerInputError
from klviewer.inference.likelihood import MeasurementModel
from klviewer.inference.plan import SeriesPlan, as_plan
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.sinogram_acquisition import acquisition_from_sinogram
from klviewer.io.study import Series
from klviewer.physics.acquisition import DEFAULT_SINOGRAM_SIGMA, Acquisition, simulate_measurement
from klviewer.physics.units import MU_WATER_PER_MM
from klviewer.priors.base import Prior
from klviewer.priors.data import resize_square

MEASUREMENT_SIGMA_FLOOR = DEFAULT_SINOGRAM_SIGMA
"""Smallest line-integral noise std the likelihood assumes. Even a noise-free simulation has
model error (discretisation, interpolation), and a zero variance would make the likelihood
infinitely sharp."""


@dataclass
class PreparedSlice:
    """A slice on the prior's grid, with its measurement, ready to sample."""

    acquisition: Acquisition
    original_hu: np.ndarray | None
    """The input image resampled to the prior's grid (None for sinogram inputs)."""
    pixel_spacing_mm: float
    slice_seed: int
    notes: list[str] = field(default_factory=list)


def _resampled(hu: np.ndarray, size: tuple[int, int], spacing: float, notes: list[str]) -> tuple[np.ndarray, float]:
    """The slice on the prior's grid, prepared exactly as training slices are (`resize_square`)."""
    if hu.shape == size:
        return hu.astype(np.float32), spacing
    notes.append(f"resampled {hu.shape[0]}x{hu.shape[1]} to the prior's {size[0]}x{size[1]} grid")
    out = resize_square(torch.from_numpy(hu.astype(np.float32))[None], size[0])[0]
    return out.numpy(), spacing * max(hu.shape) / size[0]


def prepare_slice(series: Series, index: int, prior: Prior, settings: AnalysisSettings, device: torch.device) -> PreparedSlice:
    """The measurement for slice `index` of `series` on the prior's grid.

    Image inputs are resampled to the prior's grid and their measurement is simulated with the
    settings' views and noise. Sinogram inputs keep their measurement; the operator is built on
    the prior's grid over the sidecar's field of view.
    """
    series.require_analyzable()
    if not 0 <= index < series.n_slices:
        raise KlviewerInputError(series.files[0] if series.files else None, f"slice {index} is outside 0..{series.n_slices - 1}")
    size = prior.config.image_size
    notes: list[str] = []
    slice_seed = settings.slice_seed(index)
    if series.sinogram is not None:
        sino = series.sinogram
        fov = sino.grid_size[0] * sino.grid_pixel_spacing_mm[0]
        if sino.grid_size[0] != sino.grid_size[1]:
            raise KlviewerInputError(series.files[0], f"reconstruction grid {sino.grid_size} must be square")
        spacing = fov / size[0]
        if tuple(sino.grid_size) != size:
            notes.append(f"reconstructing on the prior's {size[0]}x{size[1]} grid instead of {sino.grid_size[0]}x{sino.grid_size[1]}")
        on_grid = dataclasses.replace(sino, grid_size=size, grid_pixel_spacing_mm=(spacing, spacing))
        acq = acquisition_from_sinogram(on_grid, index, noise_sigma=settings.noise_sigma, device=device)
        return PreparedSlice(acq, None, spacing, slice_seed, notes)
    if series.pixel_spacing_mm is None:
        notes.append("no pixel spacing known: assuming 1 mm pixels")
    rows, cols = series.pixel_spacing_mm or (1.0, 1.0)
    if not np.isclose(rows, cols, rtol=1e-3):
        notes.append(f"non-square pixels {rows}x{cols} mm: using {rows} mm")
    hu, spacing = _resampled(series.slices[index].hu, size, float(rows), notes)
    acq = simulate_measurement(hu, spacing, settings.views, i0=settings.dose_i0, noise_sigma=settings.noise_sigma,
                               seed=slice_seed, device=device)
    return PreparedSlice(acq, hu, spacing, slice_seed, notes)


def ct_measurement_model(acq: Acquisition, prior: Prior) -> MeasurementModel:
    """The CT measurement as a linear model in prior units.

    mu = mu_w (1 + HU/1000) and HU = hu_scale x + hu_offset give mu = c0 + c1 x, so
    y - A(c0) = c1 A(x) + noise.
    """
    cfg = prior.config
    if cfg.channels != 1:
        raise KlviewerInputError(None, f"prior '{cfg.name}' has {cfg.channels} channels; CT analysis needs a single-channel prior")
    mu_w = acq.mu_water_per_mm
    c0 = mu_w * (1.0 + cfg.hu_offset / 1000.0)
    c1 = mu_w * cfg.hu_scale / 1000.0
    ones = torch.ones((1, 1, *acq.operator.image_size), device=acq.device)
    y = acq.y - c0 * acq.operator.A(ones)
    variance = acq.noise.variance(acq.y).clamp_min(MEASUREMENT_SIGMA_FLOOR**2).expand_as(acq.y)
    return MeasurementModel(operator=acq.operator, y=y, gain=c1, variance=variance)


def mu_to_hu_image(mu: torch.Tensor, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    return ((mu / mu_water - 1.0) * 1000.0).squeeze().cpu().numpy().astype(np.float32)


@dataclass
class MeasuredSlice:
    case: str
    source: str
    index: int
    prepared: PreparedSlice


@dataclass
class MeasurementSet:
    """Measurements of the picked slices, on one prior's grid."""

    slices: list[MeasuredSlice]
    skipped: list[dict[str, str]]

    def __len__(self) -> int:
        return len(self.slices)


def measure_plan(plan: SeriesPlan, prior: Prior, settings: AnalysisSettings,
                 device: torch.device | None = None) -> MeasurementSet:
    """Prepare every planned slice's measurement on `prior`'s grid.

    Image inputs get a simulated measurement with the settings' views and noise (and their
    resampled image is kept as the reference); sinogram inputs are used as given.
    """
    device = device or torch.device("cpu")
    measured = [
        MeasuredSlice(p.case, p.source, index, prepare_slice(p.series, index, prior, settings, device))
        for p in plan.series for index in p.indices
    ]
    return MeasurementSet(measured, plan.skipped)


def collect_measurements(
    inputs: Sequence[str | Path] | SeriesPlan,
    prior: Prior,
    settings: AnalysisSettings,
    *,
    slices: str = "all",
    device: torch.device | None = None,
) -> MeasurementSet:
    """Load `inputs` (or take the series of a plan as they are) and prepare each picked slice's measurement on
    `prior`'s grid (see `measure_plan`)."""
    return measure_plan(as_plan(inputs, slices), prior, settings, device)
