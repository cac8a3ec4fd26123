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
from pathlib import Path
from typing import Any

import numpy as np

from klviewer import __version__
from klviewer.errors import KlviewerError, KlviewerInputError, brief, shorten
from klviewer.inference.energy import EnergyField, KLMap, patch_starts
from klviewer.inference.escalation import Stage
from klviewer.inference.prior_fit import PriorFit
from klviewer.inference.result import SliceResult
from klviewer.io.arrays import load_npz_arrays
from klviewer.io.json_input import Fields, parse_json
from klviewer.io.safe_write import atomic_write
from klviewer.physics.grid import GridTransform
from klviewer.results.reader import checked_settings


class NonFiniteResultError(KlviewerError):
    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def write_slice_npz(result: SliceResult, path: Path, overwrite: bool = False) -> Path:
    """Write `result` to `path` atomically; an existing file is kept unless `overwrite`.

    A result whose score or KL is not finite is refused: a NaN score would sort, flag and export
    as if it were a number.
    """
    bad = [name for name, value in (("score", result.score), ("total KL", result.total_kl),
                                    ("KL map", float(np.max(result.kl_map.values))), ("z-score", result.z_score))
           if value is not None and not np.isfinite(value)]
    if bad:
        raise NonFiniteResultError(path, f"the analysis produced a non-finite {' and '.join(bad)}; nothing written "
                                         "(is the image in HU, and are the prior's weights sound?)")
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
        "stage": None if result.stage is None else result.stage.to_dict(),
    }


IMAGE_KEYS = ("recon_hu", "posterior_std_hu", "fbp_hu", "residual_backprojection")
MAX_METADATA_CHARS = 1 << 20


def load_slice_result(path: Path) -> SliceResult:
    """Read a per-slice npz written by `write_slice_npz` (never unpickles), checked for consistency:
    every image on one grid, the KL map on the patches its metadata names, all values finite."""
    arrays = load_npz_arrays(path, None)
    try:
        meta_raw = arrays["metadata"]
        if meta_raw.dtype.kind != "U" or meta_raw.ndim != 0 or len(str(meta_raw)) > MAX_METADATA_CHARS:
            raise KlviewerInputError(path, "entry 'metadata' must be one JSON string")
        meta = Fields(parse_json(str(meta_raw), path, "entry 'metadata'"), path, "metadata.", what="field")
        energy_values = _array(path, arrays, "energy", 3)
        shape = energy_values.shape[1:]
        images = {k: _array(path, arrays, k, 2, shape) for k in IMAGE_KEYS}
        original = _array(path, arrays, "original_hu", 2, shape) if "original_hu" in arrays else None
        energy = EnergyField(energy_values, _array(path, arrays, "sigma_edges", 1), samples=meta.integer("samples", lo=1))
        patch, stride = meta.integer("patch", lo=1, hi=max(shape)), meta.integer("stride", lo=1, hi=max(shape))
        window = meta.numbers("sigma_window", length=2, positive=True)
        kl_map = KLMap(
            values=_array(path, arrays, "kl_map", 2).astype(np.float64), row_starts=arrays["kl_map_row_starts"],
            col_starts=arrays["kl_map_col_starts"], patch=patch, stride=stride,
            image_shape=energy.image_shape, sigma_window=(window[0], window[1]),
        )
        for axis, length in enumerate(shape):
            starts = (kl_map.row_starts, kl_map.col_starts)[axis]
            if not np.array_equal(starts, patch_starts(length, patch, stride)) or kl_map.values.shape[axis] != starts.size:
                raise KlviewerInputError(path, f"kl_map does not lie on the {patch}-pixel patches of a {shape} image")
        z_map = None if "kl_z_map" not in arrays else _z_map_of(arrays, meta.doc, kl_map)
        return SliceResult(
            **images, energy=energy, kl_map=kl_map,
            score=meta.number("score"), total_kl=meta.number("total_kl"),
            total_kl_all_sigma=meta.number("total_kl_all_sigma"), flagged=meta.boolean("flagged"),
            flag_threshold=meta.number("flag_threshold", optional=True),
            pixel_spacing_mm=meta.number("pixel_spacing_mm", positive=True, hi=1000),
            settings=checked_settings(meta.get("settings"), path, "metadata.settings."),
            prior_name=meta.text("prior", max_chars=256), seconds=meta.number("seconds", lo=0),
            original_hu=original, notes=[str(n) for n in meta.items("notes", max_items=1000)],
            z_map=z_map, z_threshold=meta.number("z_threshold", None, optional=True),
            grid_transform=None if meta.get("grid_transform", None) is None else GridTransform.from_dict(meta.get("grid_transform")),
            geometry_warnings=[str(w) for w in meta.items("geometry_warnings", [], max_items=100)],
            prior_fit_score=meta.number("prior_fit_score", None, lo=0, optional=True),
            prior_fit=None if meta.get("prior_fit", None) is None else PriorFit.from_dict(meta.get("prior_fit"), path),
            stage=None if meta.get("stage", None) is None else Stage.from_dict(meta.get("stage"), path, "metadata.stage."),
        )
    except KlviewerInputError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise KlviewerInputError(path, f"not a readable klviewer slice result ({type(exc).__name__}: {shorten(str(exc), 300)})") from exc


def _array(path: Path, arrays: dict[str, np.ndarray], key: str, ndim: int,
           shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A stored array with `ndim` axes (the last two equal to `shape` when given), finite and numeric."""
    if key not in arrays:
        raise KlviewerInputError(path, f"has no '{key}' array")
    array = arrays[key]
    if array.dtype.kind not in "iuf" or array.ndim != ndim or 0 in array.shape or (shape is not None and array.shape[-2:] != shape):
        raise KlviewerInputError(path, f"array '{key}' is {array.dtype} of shape {brief(array.shape)}; expected "
                                       f"{ndim} axes of numbers" + (f" on the {shape} grid" if shape else ""))
    if not np.isfinite(array).all():
        raise KlviewerInputError(path, f"array '{key}' holds NaN or infinite values")
    return array


def _z_map_of(arrays: dict[str, np.ndarray], meta: dict[str, Any], kl_map: KLMap) -> KLMap:
    """The stored z-score map. Its windows step by the KL map's patch; files written before
    z-scores were pooled keep no geometry of their own and share the KL map's."""
    z = arrays["kl_z_map"].astype(np.float64)
    geometry = kl_map
    if "kl_z_map_row_starts" in arrays:
        rows, cols = arrays["kl_z_map_row_starts"], arrays["kl_z_map_col_starts"]
        window = meta["z_window"]
        if (isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= max(kl_map.image_shape)
                or not all(np.isin(s, k).all() for s, k in ((rows, kl_map.row_starts), (cols, kl_map.col_starts)))):
            raise ValueError("kl_z_map's windows do not lie on the KL map's patches")
        geometry = dataclasses.replace(kl_map, row_starts=rows, col_starts=cols, patch=window, stride=kl_map.patch)
    if z.ndim != 2 or z.shape != (geometry.row_starts.size, geometry.col_starts.size):
        raise ValueError(f"kl_z_map {z.shape} does not match its {geometry.row_starts.size} x "
                         f"{geometry.col_starts.size} windows")
    return dataclasses.replace(geometry, values=np.where(np.isnan(z), -np.inf, z))
