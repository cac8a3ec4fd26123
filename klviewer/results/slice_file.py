"""The per-slice results file `<case>/<slice>.npz`: written and read here, never unpickled.

Arrays: recon_hu, posterior_std_hu, fbp_hu, residual_backprojection, original_hu (image inputs),
energy (bins x H x W nats) with sigma_edges, kl_map with its patch starts, kl_z_map with its window
starts (when the prior has a healthy reference), score, total_kl, and `metadata` (JSON: settings,
scores, the flag rule and its threshold, notes, `grid_transform` from the source grid to the
prior's and the `geometry_warnings`).
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from klviewer import __version__
from klviewer.errors import KlviewerInputError
from klviewer.inference.energy import EnergyField, KLMap
from klviewer.inference.prior_fit import PriorFit
from klviewer.inference.result import SliceResult
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.safe_write import atomic_write
from klviewer.physics.grid import GridTransform


def write_slice_npz(result: SliceResult, path: Path, overwrite: bool = False) -> Path:
    """Write `result` to `path` atomically; an existing file is kept unless `overwrite`."""
    arrays: dict[str, Any] = {
        "recon_hu": result.recon_hu,
        "posterior_std_hu": result.posterior_std_hu,
        "fbp_hu": result.fbp_hu,
        "residual_backprojection": result.residual_backprojection,
        "energy": result.energy.energy,
        "sigma_edges": result.energy.sigma_edges,
        "kl_map": result.kl_map.values.astype(np.float32),
        "kl_map_row_starts": result.kl_map.row_starts,
        "kl_map_col_starts": result.kl_map.col_starts,
        "score": np.float64(result.score),
        "total_kl": np.float64(result.total_kl),
        "metadata": np.array(json.dumps(slice_metadata(result))),
    }
    if result.original_hu is not None:
        arrays["original_hu"] = result.original_hu
    if result.z_map is not None:
        # Patches off the body have no z-score: NaN in the file, -inf in memory (so max() skips them).
        arrays["kl_z_map"] = np.where(np.isfinite(result.z_map.values), result.z_map.values, np.nan).astype(np.float32)
        arrays["kl_z_map_row_starts"] = result.z_map.row_starts
        arrays["kl_z_map_col_starts"] = result.z_map.col_starts
    return atomic_write(path, lambda f: np.savez_compressed(f, **arrays), overwrite=overwrite)


def slice_metadata(result: SliceResult) -> dict[str, Any]:
    """The npz's `metadata` entry: settings, scores and verdict as JSON."""
    return {
        "klviewer_version": __version__,
        "prior": result.prior_name,
        "settings": result.settings.to_dict(),
        "patch": result.kl_map.patch,
        "stride": result.kl_map.stride,
        "sigma_window": list(result.kl_map.sigma_window),
        "score": result.score,
        "total_kl": result.total_kl,
        "total_kl_all_sigma": result.total_kl_all_sigma,
        "flagged": result.flagged,
        "flag_threshold": result.flag_threshold,
        "pixel_spacing_mm": result.pixel_spacing_mm,
        "samples": result.energy.samples,
        "seconds": result.seconds,
        "notes": result.notes,
        "z_score": result.z_score,
        "z_window": None if result.z_map is None else result.z_map.patch,
        "z_threshold": result.z_threshold,
        "flag_rule": result.flag_rule,
        "grid_transform": None if result.grid_transform is None else result.grid_transform.to_dict(),
        "geometry_warnings": result.geometry_warnings,
        "prior_fit_score": result.prior_fit_score,
        "prior_fit": None if result.prior_fit is None else result.prior_fit.to_dict(),
    }


def load_slice_result(path: Path) -> SliceResult:
    """Read a per-slice npz written by `write_slice_npz` (never unpickles)."""
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
            grid_transform=None if meta.get("grid_transform") is None else GridTransform.from_dict(meta["grid_transform"]),
            geometry_warnings=[str(w) for w in meta.get("geometry_warnings", [])],
            prior_fit_score=None if meta.get("prior_fit_score") is None else float(meta["prior_fit_score"]),
            prior_fit=None if meta.get("prior_fit") is None else PriorFit.from_dict(meta["prior_fit"], path),
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
