"""Raw sinogram input: a data file (.npy / .npz / raw binary) plus a JSON sidecar.

Sidecar schema (version 1); every field is checked against the data, and a mismatch
names the field and both values:

    {
      "klviewer_sinogram": 1,
      "geometry": "parallel",
      "angles": {"unit": "deg" | "rad", "values": [...]}
             or {"unit": "deg" | "rad", "start": 0, "stop": 180, "count": 24},   # stop excluded
      "detector": {"count": 363, "spacing_mm": 1.5625},
      "data": {
        "kind": "line_integrals" | "counts",
        "i0": 100000,                       # required for counts: unattenuated counts per ray
        "file": "scan.raw",                 # optional; default: the sidecar's stem with .npy/.npz/.raw/.bin
        "dtype": "float32",                 # required for raw files
        "shape": [slices, angles, detectors] or [angles, detectors],   # required for raw files
        "byte_order": "little" | "big"      # raw files; default little
      },
      "grid": {"size": [256, 256], "pixel_spacing_mm": 1.5625 or [row, col]},
      "description": "...", "patient_id": "..."          # optional
    }

Data axes are always (slice, angle, detector). Line integrals are dimensionless (mu in /mm
times mm).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klviewer.errors import KlviewerInputError, SidecarMismatchError
from klviewer.io.arrays import load_numeric_array, require_finite
from klviewer.io.sidecar import number, read_json_sidecar, spacing_pair
from klviewer.io.study import Catalog, Patient, Series, Sinogram, Study
from klviewer.physics.noise import from_counts

SCHEMA_KEY = "klviewer_sinogram"
DATA_SUFFIXES = (".npy", ".npz", ".raw", ".bin")
RAW_SUFFIXES = (".raw", ".bin")
NPZ_SINOGRAM_KEYS = ("sinogram", "line_integrals", "counts")
RAW_DTYPES = {"float32", "float64", "uint16", "int16", "uint32", "int32"}
TOP_LEVEL_KEYS = {SCHEMA_KEY, "geometry", "angles", "detector", "data", "grid", "description", "patient_id"}


def is_sinogram_sidecar(doc: dict[str, Any]) -> bool:
    return SCHEMA_KEY in doc


def _section(path: Path, doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise KlviewerInputError(path, f"sidecar field '{key}' must be an object, found {value!r}")
    return value


def _count(path: Path, section: dict[str, Any], key: str, label: str) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KlviewerInputError(path, f"sidecar field '{label}' must be a positive integer, found {value!r}")
    return value


def _angles(path: Path, doc: dict[str, Any]) -> np.ndarray:
    section = _section(path, doc, "angles")
    unit = section.get("unit")
    if unit not in ("deg", "rad"):
        raise KlviewerInputError(path, f"sidecar field 'angles.unit' must be 'deg' or 'rad', found {unit!r}")
    if "values" in section:
        values = section["values"]
        if not isinstance(values, list) or not values:
            raise KlviewerInputError(path, "sidecar field 'angles.values' must be a non-empty list")
        angles = np.array([number(path, {"angles.values": v}, "angles.values", positive=False) for v in values])
    else:
        start = number(path, {"angles.start": section.get("start")}, "angles.start", positive=False)
        stop = number(path, {"angles.stop": section.get("stop")}, "angles.stop", positive=False)
        count = _count(path, section, "count", "angles.count")
        angles = start + (stop - start) * np.arange(count) / count
    return np.deg2rad(angles) if unit == "deg" else angles


def _data_file(sidecar_path: Path, data: dict[str, Any]) -> Path:
    if "file" in data:
        name = data["file"]
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise KlviewerInputError(sidecar_path, f"sidecar field 'data.file' must be a file name beside the sidecar, found {name!r}")
        target = sidecar_path.parent / name
        if not target.is_file():
            raise KlviewerInputError(sidecar_path, f"data file '{name}' named in the sidecar does not exist")
        return target
    for suffix in DATA_SUFFIXES:
        candidate = sidecar_path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    raise KlviewerInputError(sidecar_path, f"no data file found beside the sidecar (looked for {sidecar_path.stem} + {'/'.join(DATA_SUFFIXES)})")


def _read_raw(data_path: Path, sidecar_path: Path, data: dict[str, Any]) -> np.ndarray:
    dtype_name = data.get("dtype")
    if dtype_name not in RAW_DTYPES:
        raise KlviewerInputError(sidecar_path, f"sidecar field 'data.dtype' must be one of {sorted(RAW_DTYPES)} for raw files, found {dtype_name!r}")
    shape = data.get("shape")
    if not (isinstance(shape, list) and len(shape) in (2, 3) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise KlviewerInputError(sidecar_path, f"sidecar field 'data.shape' must list 2 or 3 positive integers for raw files, found {shape!r}")
    order = data.get("byte_order", "little")
    if order not in ("little", "big"):
        raise KlviewerInputError(sidecar_path, f"sidecar field 'data.byte_order' must be 'little' or 'big', found {order!r}")
    dtype = np.dtype(dtype_name).newbyteorder("<" if order == "little" else ">")
    expected = math.prod(shape) * dtype.itemsize
    actual = data_path.stat().st_size
    if actual != expected:
        raise SidecarMismatchError(sidecar_path, "data.shape x data.dtype (bytes)", expected, actual)
    return np.fromfile(data_path, dtype=dtype).reshape(shape).astype(np.float64 if dtype.kind == "f" and dtype.itemsize == 8 else np.float32)


def _validate_against_data(sidecar_path: Path, data: dict[str, Any], values: np.ndarray) -> None:
    if "shape" in data and list(data["shape"]) != list(values.shape):
        raise SidecarMismatchError(sidecar_path, "data.shape", data["shape"], list(values.shape))
    if "dtype" in data and str(values.dtype) != data["dtype"]:
        raise SidecarMismatchError(sidecar_path, "data.dtype", data["dtype"], str(values.dtype))


def read_sinogram(sidecar_path: Path) -> Catalog:
    """Read a sinogram described by its sidecar; the sidecar may name its data file."""
    doc = read_json_sidecar(sidecar_path)
    if not is_sinogram_sidecar(doc):
        raise KlviewerInputError(sidecar_path, f"not a sinogram sidecar (no '{SCHEMA_KEY}' field)")
    if doc[SCHEMA_KEY] != 1:
        raise KlviewerInputError(sidecar_path, f"sidecar version {doc[SCHEMA_KEY]!r} is not supported (expected 1)")
    unknown = set(doc) - TOP_LEVEL_KEYS
    if unknown:
        raise KlviewerInputError(sidecar_path, f"unknown sidecar fields {sorted(unknown)}")
    if doc.get("geometry") != "parallel":
        raise KlviewerInputError(sidecar_path, f"sidecar field 'geometry' must be 'parallel', found {doc.get('geometry')!r}")
    angles = _angles(sidecar_path, doc)
    detector = _section(sidecar_path, doc, "detector")
    n_det = _count(sidecar_path, detector, "count", "detector.count")
    det_spacing = number(sidecar_path, {"detector.spacing_mm": detector.get("spacing_mm")}, "detector.spacing_mm")
    grid = _section(sidecar_path, doc, "grid")
    size = grid.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)):
        raise KlviewerInputError(sidecar_path, f"sidecar field 'grid.size' must be [rows, cols], found {size!r}")
    grid_spacing = spacing_pair(sidecar_path, {"grid.pixel_spacing_mm": grid.get("pixel_spacing_mm")}, "grid.pixel_spacing_mm")

    data = _section(sidecar_path, doc, "data")
    kind = data.get("kind")
    if kind not in ("line_integrals", "counts"):
        raise KlviewerInputError(sidecar_path, f"sidecar field 'data.kind' must be 'line_integrals' or 'counts', found {kind!r}")
    i0 = number(sidecar_path, {"data.i0": data.get("i0")}, "data.i0") if kind == "counts" else None

    data_path = _data_file(sidecar_path, data)
    if data_path.suffix.lower() in RAW_SUFFIXES:
        values = _read_raw(data_path, sidecar_path, data)
    else:
        values = load_numeric_array(data_path, NPZ_SINOGRAM_KEYS)
        _validate_against_data(sidecar_path, data, values)
    if values.ndim not in (2, 3):
        raise KlviewerInputError(data_path, f"sinogram must be (angles, detectors) or (slices, angles, detectors), found shape {values.shape}")
    stack = values[None] if values.ndim == 2 else values
    require_finite(data_path, stack)
    if stack.shape[1] != angles.size:
        raise SidecarMismatchError(sidecar_path, "angles (count)", int(angles.size), int(stack.shape[1]))
    if stack.shape[2] != n_det:
        raise SidecarMismatchError(sidecar_path, "detector.count", n_det, int(stack.shape[2]))

    counts = None
    if kind == "counts":
        if (stack < 0).any():
            raise KlviewerInputError(data_path, "counts must not be negative")
        counts = stack.astype(np.float32)
        line_integrals = from_counts(torch.from_numpy(counts), i0).numpy()
    else:
        line_integrals = stack.astype(np.float32)

    sinogram = Sinogram(
        line_integrals=line_integrals,
        angles_rad=angles.astype(np.float64),
        detector_spacing_mm=det_spacing,
        grid_size=(size[0], size[1]),
        grid_pixel_spacing_mm=grid_spacing,
        i0=i0,
        counts=counts,
    )
    series = Series(
        uid=f"file:{sidecar_path.resolve()}",
        modality="CT",
        source_kind="sinogram",
        description=str(doc.get("description", sidecar_path.stem)),
        sinogram=sinogram,
        pixel_spacing_mm=grid_spacing,
        files=[sidecar_path, data_path],
    )
    study = Study(uid=f"file:{sidecar_path.resolve()}", description=sidecar_path.stem, series=[series])
    return Catalog(patients=[Patient(patient_id=str(doc.get("patient_id", "(sinograms)")), studies=[study])])
