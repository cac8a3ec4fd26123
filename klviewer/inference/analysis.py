"""Analysing one slice: measurement -> posterior run -> KL map, score and flag.

The GUI, the CLI, batch runs and evaluation all go through `prepare_slice` and
`analyze_prepared`, so every caller gets the same numbers for the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klviewer import __version__
from klviewer.errors import KlviewerInputError
from klviewer.inference.energy import EnergyField, KLMap
from klviewer.inference.healthy_reference import ZCalibration, slice_z_score, z_map_fits
from klviewer.inference.likelihood import MeasurementModel
from klviewer.inference.sampler import PosteriorRun, SamplerSettings, posterior_sample
from klviewer.io.safe_write import atomic_write
from klviewer.io.study import Series
from klviewer.physics.acquisition import (
    DEFAULT_SINOGRAM_SIGMA,
    Acquisition,
    acquisition_from_sinogram,
    simulate_measurement,
)
from klviewer.physics.units import MU_WATER_PER_MM
from klviewer.priors.data import resize_square

MEASUREMENT_SIGMA_FLOOR = DEFAULT_SINOGRAM_SIGMA
"""Smallest line-integral noise std the likelihood assumes. Even a noise-free simulation has
model error (discretisation, interpolation), and a zero variance would make the likelihood
infinitely sharp."""


@dataclass
class AnalysisSettings:
    """Acquisition, sampler and map settings of one analysis, as recorded in every output."""

    views: int = 24
    dose_i0: float | None = None
    noise_sigma: float | None = None
    steps: int = 100
    samples: int = 1
    patch: int = 8
    sigma_window: tuple[float, float] | None = (0.01, 0.5)
    seed: int = 0
    device: str = "auto"
    guidance: str = "pigdm"
    dps_step: float = SamplerSettings.dps_step
    """Step size of `dps` guidance (see SamplerSettings)."""
    flag_threshold: float | None = None
    """Image score (nats) above which a slice is flagged; None = the prior's calibrated value."""

    def sampler(self, slice_seed: int) -> SamplerSettings:
        return SamplerSettings(steps=self.steps, samples=self.samples, seed=slice_seed, guidance=self.guidance,  # type: ignore[arg-type]
                               dps_step=self.dps_step)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sigma_window"] = None if self.sigma_window is None else list(self.sigma_window)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AnalysisSettings":
        d = dict(d)
        if d.get("sigma_window") is not None:
            d["sigma_window"] = tuple(d["sigma_window"])
        return cls(**d)


MAP_ONLY_KEYS = ("patch", "sigma_window", "flag_threshold")


def sampling_key(settings: AnalysisSettings) -> tuple[tuple[str, Any], ...]:
    """The settings that need a new sampling run when they change."""
    d = settings.to_dict()
    return tuple(sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in d.items() if k not in MAP_ONLY_KEYS))


@dataclass
class PreparedSlice:
    """A slice on the prior's grid, with its measurement, ready to sample."""

    acquisition: Acquisition
    original_hu: np.ndarray | None
    """The input image resampled to the prior's grid (None for sinogram inputs)."""
    pixel_spacing_mm: float
    slice_seed: int
    notes: list[str] = field(default_factory=list)


@dataclass
class SliceResult:
    """Everything one analysed slice produces. Images are (H, W) float32 on the prior's grid."""

    recon_hu: np.ndarray
    posterior_std_hu: np.ndarray
    fbp_hu: np.ndarray
    residual_backprojection: np.ndarray
    """|A^T W (y - A x_hat)| in prior units: where the reconstruction disagrees with the data."""
    energy: EnergyField
    kl_map: KLMap
    score: float
    total_kl: float
    total_kl_all_sigma: float
    flagged: bool
    flag_threshold: float | None
    pixel_spacing_mm: float
    settings: AnalysisSettings
    prior_name: str
    seconds: float
    original_hu: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    z_map: KLMap | None = None
    """KL z-scores against healthy patches with the same edge content, pooled over windows of about
    a lesion's size (see `healthy_reference`); None without a healthy reference calibrated for
    these settings."""
    z_threshold: float | None = None

    @property
    def z_score(self) -> float | None:
        return slice_z_score(self.z_map)

    @property
    def flag_rule(self) -> str | None:
        """What `flagged` compares: "z" (KL z-score against the healthy reference's threshold),
        "nats" (largest patch KL against a threshold in nats), or None (nothing to compare with)."""
        return flag_rule(self.flag_threshold, self.z_threshold, self.settings.flag_threshold)

    def save_npz(self, path: Path, overwrite: bool = False) -> Path:
        """Write atomically; an existing file is kept unless `overwrite`."""
        arrays: dict[str, Any] = {
            "recon_hu": self.recon_hu,
            "posterior_std_hu": self.posterior_std_hu,
            "fbp_hu": self.fbp_hu,
            "residual_backprojection": self.residual_backprojection,
            "energy": self.energy.energy,
            "sigma_edges": self.energy.sigma_edges,
            "kl_map": self.kl_map.values.astype(np.float32),
            "kl_map_row_starts": self.kl_map.row_starts,
            "kl_map_col_starts": self.kl_map.col_starts,
            "score": np.float64(self.score),
            "total_kl": np.float64(self.total_kl),
            "metadata": np.array(json.dumps(self.metadata())),
        }
        if self.original_hu is not None:
            arrays["original_hu"] = self.original_hu
        if self.z_map is not None:
            # Patches off the body have no z-score: NaN in the file, -inf in memory (so max() skips them).
            arrays["kl_z_map"] = np.where(np.isfinite(self.z_map.values), self.z_map.values, np.nan).astype(np.float32)
            arrays["kl_z_map_row_starts"] = self.z_map.row_starts
            arrays["kl_z_map_col_starts"] = self.z_map.col_starts
        return atomic_write(path, lambda f: np.savez_compressed(f, **arrays), overwrite=overwrite)

    def metadata(self) -> dict[str, Any]:
        return {
            "klviewer_version": __version__,
            "prior": self.prior_name,
            "settings": self.settings.to_dict(),
            "patch": self.kl_map.patch,
            "stride": self.kl_map.stride,
            "sigma_window": list(self.kl_map.sigma_window),
            "score": self.score,
            "total_kl": self.total_kl,
            "total_kl_all_sigma": self.total_kl_all_sigma,
            "flagged": self.flagged,
            "flag_threshold": self.flag_threshold,
            "pixel_spacing_mm": self.pixel_spacing_mm,
            "samples": self.energy.samples,
            "seconds": self.seconds,
            "notes": self.notes,
            "z_score": self.z_score,
            "z_window": None if self.z_map is None else self.z_map.patch,
            "z_threshold": self.z_threshold,
            "flag_rule": self.flag_rule,
        }


def recut(result: SliceResult, settings: AnalysisSettings) -> SliceResult:
    """`result` under `settings`, which may differ from its own only in map settings: the KL map,
    score and total are cut again from the energy field, without sampling. KL z-scores stay only
    while patch and sigma window are unchanged, because their reference holds for those alone;
    the flag is left for the caller to decide."""
    if sampling_key(settings) != sampling_key(result.settings):
        raise KlviewerInputError(None, "only map settings (patch, sigma window, flag threshold) can change without sampling")
    kl_map = result.energy.kl_map(settings.patch, settings.sigma_window)
    z = result.z_map
    keep_z = z is not None and z_map_fits(z, kl_map)
    return dataclasses.replace(result, settings=settings, kl_map=kl_map, score=kl_map.score, total_kl=kl_map.total,
                               z_map=z if keep_z else None, z_threshold=result.z_threshold if keep_z else None)


def load_slice_result(path: Path) -> SliceResult:
    """Read a per-slice npz written by `SliceResult.save_npz` (never unpickles)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays["metadata"]))
        energy = EnergyField(arrays["energy"], arrays["sigma_edges"], samples=int(meta["samples"]))
        kl_map = KLMap(
            values=arrays["kl_map"].astype(np.float64), row_starts=arrays["kl_map_row_starts"],
            col_starts=arrays["kl_map_col_starts"], patch=int(meta["patch"]), stride=int(meta["stride"]),
            image_shape=energy.image_shape, sigma_window=tuple(meta["sigma_window"]),
        )
        z_map = None if "kl_z_map" not in arrays else _z_map_of(arrays, meta, kl_map)
        return SliceResult(
            recon_hu=arrays["recon_hu"], posterior_std_hu=arrays["posterior_std_hu"], fbp_hu=arrays["fbp_hu"],
            residual_backprojection=arrays["residual_backprojection"], energy=energy, kl_map=kl_map,
            score=float(meta["score"]), total_kl=float(meta["total_kl"]),
            total_kl_all_sigma=float(meta["total_kl_all_sigma"]), flagged=bool(meta["flagged"]),
            flag_threshold=meta["flag_threshold"], pixel_spacing_mm=float(meta["pixel_spacing_mm"]),
            settings=AnalysisSettings.from_dict(meta["settings"]), prior_name=str(meta["prior"]),
            seconds=float(meta["seconds"]), original_hu=arrays.get("original_hu"), notes=list(meta["notes"]),
            z_map=z_map, z_threshold=None if meta.get("z_threshold") is None else float(meta["z_threshold"]),
        )
    except KlviewerInputError:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise KlviewerInputError(path, f"not a readable klviewer slice result ({exc})") from exc


def _z_map_of(arrays: dict[str, np.ndarray], meta: dict[str, Any], kl_map: KLMap) -> KLMap:
    """The stored z-score map. Its windows step by the KL map's patch; files written before
    z-scores were pooled keep no geometry of their own and share the KL map's."""
    z = arrays["kl_z_map"].astype(np.float64)
    geometry = kl_map
    if "kl_z_map_row_starts" in arrays:
        geometry = dataclasses.replace(kl_map, row_starts=arrays["kl_z_map_row_starts"],
                                       col_starts=arrays["kl_z_map_col_starts"], patch=int(meta["z_window"]),
                                       stride=kl_map.patch)
    if z.shape != (geometry.row_starts.size, geometry.col_starts.size):
        raise ValueError(f"kl_z_map {z.shape} does not match its {geometry.row_starts.size} x "
                         f"{geometry.col_starts.size} windows")
    return dataclasses.replace(geometry, values=np.where(np.isnan(z), -np.inf, z))


def flag_rule(flag_threshold: float | None, z_threshold: float | None, forced_nats: float | None) -> str | None:
    """The one flagging rule of every caller (see SliceResult.flag_rule).

    The KL z-score rule wins whenever the prior has a healthy reference for the settings: on
    lesion phantoms the largest patch KL does not separate healthy from lesion slices, because
    healthy anatomy carries as much KL (see docs/detection.md). A threshold in nats that the
    user sets forces the nats rule.
    """
    if forced_nats is None and z_threshold is not None:
        return "z"
    return "nats" if flag_threshold is not None else None


def is_flagged(score: float, flag_threshold: float | None, z_score: float | None, z_threshold: float | None,
               forced_nats: float | None = None) -> bool:
    rule = flag_rule(flag_threshold, z_threshold, forced_nats)
    if rule == "z":
        return z_score is not None and z_score > z_threshold
    return rule == "nats" and score > flag_threshold


def _resampled(hu: np.ndarray, size: tuple[int, int], spacing: float, notes: list[str]) -> tuple[np.ndarray, float]:
    """The slice on the prior's grid, prepared exactly as training slices are (`resize_square`)."""
    if hu.shape == size:
        return hu.astype(np.float32), spacing
    notes.append(f"resampled {hu.shape[0]}x{hu.shape[1]} to the prior's {size[0]}x{size[1]} grid")
    out = resize_square(torch.from_numpy(hu.astype(np.float32))[None], size[0])[0]
    return out.numpy(), spacing * max(hu.shape) / size[0]


def prepare_slice(series: Series, index: int, prior, settings: AnalysisSettings, device: torch.device) -> PreparedSlice:
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
    slice_seed = settings.seed * 100_003 + index
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


def ct_measurement_model(acq: Acquisition, prior) -> MeasurementModel:
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


def analyze_prepared(
    prepared: PreparedSlice,
    prior,
    settings: AnalysisSettings,
    *,
    prior_name: str,
    flag_threshold: float | None,
    z_calibration: ZCalibration | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> SliceResult:
    """Sample the posterior of one prepared slice and cut its maps; `z_calibration` (the
    prior's healthy reference for these settings) adds the KL z-score map."""
    start = time.perf_counter()
    acq = prepared.acquisition
    model = ct_measurement_model(acq, prior)
    run: PosteriorRun = posterior_sample(prior, model, settings.sampler(prepared.slice_seed), device=acq.device,
                                         progress=progress, cancel=cancel)
    mean = torch.from_numpy(run.mean)[None, None].to(acq.device)
    residual = model.adjoint(model.residual(mean) / model.variance).abs().squeeze().cpu().numpy().astype(np.float32)
    fbp = acq.operator.fbp(acq.y, filter="shepp-logan")
    kl_map = run.energy.kl_map(settings.patch, settings.sigma_window)
    score = kl_map.score
    threshold = settings.flag_threshold if settings.flag_threshold is not None else flag_threshold
    recon_hu = np.asarray(prior.x_to_hu(run.mean), np.float32)
    z_map = None if z_calibration is None else z_calibration.reference.z_map(run.energy, recon_hu)
    z_threshold = None if z_calibration is None else z_calibration.threshold
    result = SliceResult(
        recon_hu=recon_hu,
        posterior_std_hu=np.asarray(run.std * abs(prior.config.hu_scale), np.float32),
        fbp_hu=mu_to_hu_image(fbp, acq.mu_water_per_mm),
        residual_backprojection=residual,
        energy=run.energy,
        kl_map=kl_map,
        score=score,
        total_kl=kl_map.total,
        total_kl_all_sigma=run.energy.total(),
        flagged=False,
        flag_threshold=threshold,
        pixel_spacing_mm=prepared.pixel_spacing_mm,
        settings=settings,
        prior_name=prior_name,
        seconds=time.perf_counter() - start,
        original_hu=prepared.original_hu,
        notes=prepared.notes + run.notes,
        z_map=z_map,
        z_threshold=z_threshold,
    )
    result.flagged = is_flagged(score, threshold, result.z_score, z_threshold, settings.flag_threshold)
    return result

