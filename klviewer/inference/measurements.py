"""Measurements on a prior's grid: prepare one slice, its linear model in prior units, and sets of them.

Image inputs are resampled to the prior's grid and their measurement is simulated; sinogram
inputs keep their measurement. `collect_measurements` and `measure_plan` prepare every slice of a
plan, for `shift`, `align`, `compare` and the app's prior-fit and alignment jobs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from klviewer.errors import KlviewerInputError
from klviewer.inference.likelihood import MeasurementModel
from klviewer.inference.plan import SeriesPlan, as_plan
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.sidecar import MAX_SPACING_MM, MIN_SPACING_MM
from klviewer.io.sinogram_acquisition import acquisition_from_sinogram
from klviewer.io.study import Series
from klviewer.physics.acquisition import AIR_HU, DEFAULT_SINOGRAM_SIGMA, Acquisition, simulate_measurement
from klviewer.physics.grid import GridTransform
from klviewer.physics.units import MU_WATER_PER_MM
from klviewer.priors.base import Prior

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
    grid: GridTransform | None = None
    """How the source grid (the image's, or a sinogram sidecar's reconstruction grid) maps onto the prior's."""
    geometry_warnings: list[str] = field(default_factory=list)
    """Where the source's spacing or field of view lies far from what the prior saw (also in `notes`)."""


COARSE_FACTOR = 1.5
"""Source pixels this many times the prior's, or coarser, lack detail the prior expects."""
SMALL_FOV = 0.75
"""A field of view below this fraction of the prior's leaves most of its grid filled with air."""
TISSUE_HU = -500.0
CUT_EDGE_FRACTION = 0.1
"""An image edge that is tissue over this fraction of its length cuts through the body."""
CROPPED_TISSUE_FRACTION = 0.01


def target_spacing(prior: Prior, source_fov_mm: float, notes: list[str]) -> float:
    """The prior's pixel spacing; a prior that records none gets the source's field of view over its grid."""
    size = max(prior.config.image_size)
    if prior.config.pixel_spacing_mm is not None:
        return float(prior.config.pixel_spacing_mm)
    notes.append(f"the prior records no pixel spacing: the slice's {source_fov_mm:.0f} mm field of view fills its "
                 f"{size}-pixel grid")
    return source_fov_mm / size


def source_spacing(series: Series, hu_shape: tuple[int, int], prior: Prior,
                   notes: list[str]) -> tuple[tuple[float, float], bool]:
    """The slice's (row, column) pixel spacing in mm, and whether it is an assumption.

    A spacing that is zero, negative or not a number is refused; a missing one is assumed to make
    the image span the prior's field of view, and the notes say so.
    """
    source = series.files[0] if series.files else None
    if series.pixel_spacing_mm is not None:
        rows, cols = (float(v) for v in series.pixel_spacing_mm)
        if not (math.isfinite(rows) and math.isfinite(cols) and rows > 0 and cols > 0):
            raise KlviewerInputError(source, f"pixel spacing {rows} x {cols} mm is not a positive size; fix the "
                                             "file's PixelSpacing (or the sidecar's pixel_spacing_mm)")
        if not all(MIN_SPACING_MM <= v <= MAX_SPACING_MM for v in (rows, cols)):
            raise KlviewerInputError(source, f"pixel spacing {rows:.3g} x {cols:.3g} mm lies outside "
                                             f"{MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm, which no CT has; fix the "
                                             "file's PixelSpacing (or the sidecar's pixel_spacing_mm)")
        return (rows, cols), False
    if prior.config.pixel_spacing_mm is None:
        notes.append("no pixel spacing known, and the prior records none: the image fills the prior's grid")
        spacing = 1.0
    else:
        fov = prior.config.pixel_spacing_mm * max(prior.config.image_size)
        spacing = fov / max(hu_shape)
        notes.append(f"no pixel spacing known: assuming the image spans the prior's {fov:.0f} mm field of view "
                     f"({spacing:.3g} mm pixels)")
    return (spacing, spacing), True


def geometry_warnings(grid: GridTransform, hu: np.ndarray | None) -> list[str]:
    """What a reader of the results must know when the source's spacing or field of view is far from the prior's."""
    warnings = []
    coarse = max(grid.source_spacing_mm) / min(grid.target_spacing_mm)
    if coarse >= COARSE_FACTOR and not grid.spacing_assumed:
        warnings.append(f"source pixels ({max(grid.source_spacing_mm):.3g} mm) are {coarse:.1f}x the prior's "
                        f"({min(grid.target_spacing_mm):.3g} mm): detail finer than that is missing")
    source_fov, target_fov = grid.source_fov_mm, grid.target_fov_mm
    if min(s / t for s, t in zip(source_fov, target_fov)) < SMALL_FOV:
        warnings.append(f"field of view {source_fov[0]:.0f} x {source_fov[1]:.0f} mm is much smaller than the prior's "
                        f"{target_fov[0]:.0f} mm; the rest of its grid is air")
        if hu is not None:
            edge = np.concatenate([hu[0], hu[-1], hu[:, 0], hu[:, -1]])
            tissue = float((edge > TISSUE_HU).mean())
            if tissue > CUT_EDGE_FRACTION:
                warnings.append(f"the image edge cuts through the body ({tissue:.0%} of it is tissue): the cut is an "
                                "edge the prior never saw")
    if hu is not None and max(s / t for s, t in zip(source_fov, target_fov)) > 1.0:
        rows, cols = np.meshgrid(np.arange(hu.shape[0]), np.arange(hu.shape[1]), indexing="ij")
        r, c = grid.to_target(rows, cols)
        outside = (r < -0.5) | (r > grid.target_shape[0] - 0.5) | (c < -0.5) | (c > grid.target_shape[1] - 0.5)
        cropped = float((outside & (hu > TISSUE_HU)).sum()) / hu.size
        if cropped > CROPPED_TISSUE_FRACTION:
            warnings.append(f"the prior's {target_fov[0]:.0f} mm field of view leaves out tissue at the edges of this "
                            f"{source_fov[0]:.0f} x {source_fov[1]:.0f} mm image ({cropped:.0%} of its pixels)")
    return warnings


def prepare_slice(series: Series, index: int, prior: Prior, settings: AnalysisSettings, device: torch.device) -> PreparedSlice:
    """The measurement for slice `index` of `series` on the prior's physical grid.

    Image inputs are resampled by their pixel spacing in mm onto the prior's grid (centred, the rest
    air), and their measurement is simulated with the settings' views and noise. Sinogram inputs keep
    their measurement; the operator reconstructs on the prior's grid at its pixel spacing.
    """
    series.require_analyzable()
    source = series.files[0] if series.files else None
    if not 0 <= index < series.n_slices:
        raise KlviewerInputError(source, f"slice {index} is outside 0..{series.n_slices - 1}")
    size = prior.config.image_size
    notes: list[str] = []
    slice_seed = settings.slice_seed(index)
    if series.sinogram is not None:
        sino = series.sinogram
        fov = max(n * s for n, s in zip(sino.grid_size, sino.grid_pixel_spacing_mm))
        spacing = target_spacing(prior, fov, notes)
        grid = GridTransform.centred(tuple(sino.grid_size), tuple(sino.grid_pixel_spacing_mm), size, (spacing, spacing))
        if not grid.is_identity():
            notes.append(f"reconstructing on the prior's {size[0]}x{size[1]} grid ({spacing:.3g} mm pixels) instead of "
                         f"the sidecar's {sino.grid_size[0]}x{sino.grid_size[1]}")
        on_grid = dataclasses.replace(sino, grid_size=size, grid_pixel_spacing_mm=(spacing, spacing))
        acq = acquisition_from_sinogram(on_grid, index, noise_sigma=settings.noise_sigma, device=device)
        warnings = geometry_warnings(grid, None)
        return PreparedSlice(acq, None, spacing, slice_seed, notes + warnings, grid, warnings)
    hu = np.maximum(np.asarray(series.slices[index].hu, np.float32), AIR_HU)  # scanner padding below air is air
    pixel, assumed = source_spacing(series, hu.shape, prior, notes)
    spacing = target_spacing(prior, max(n * s for n, s in zip(hu.shape, pixel)), notes)
    grid = GridTransform.centred(hu.shape, pixel, size, (spacing, spacing), spacing_assumed=assumed)
    on_grid = hu if grid.is_identity() else grid.resample_to_target(hu)
    if not grid.is_identity():
        notes.append(f"resampled {hu.shape[0]}x{hu.shape[1]} at {pixel[0]:.3g} x {pixel[1]:.3g} mm onto the prior's "
                     f"{size[0]}x{size[1]} grid at {spacing:.3g} mm")
    warnings = geometry_warnings(grid, hu)
    acq = simulate_measurement(on_grid, spacing, settings.views, i0=settings.dose_i0, noise_sigma=settings.noise_sigma,
                               seed=slice_seed, device=device)
    return PreparedSlice(acq, on_grid, spacing, slice_seed, notes + warnings, grid, warnings)


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
