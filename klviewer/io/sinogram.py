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
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klviewer.errors import KlviewerInputError, SidecarMismatchError, brief
from klviewer.io.arrays import load_numeric_array, require_finite
from klviewer.io.input_files import link_problem, open_input, path_problem
from klviewer.io.json_input import Fields
from klviewer.io.sidecar import MAX_COUNT, MAX_GRID_SIDE, MAX_SPACING_MM, MAX_TEXT, read_json_sidecar, sidecar_fields, spacing_pair
from klviewer.io.study import Catalog, Patient, Series, Sinogram, Study
from klviewer.physics.noise import from_counts

SCHEMA_KEY = "klviewer_sinogram"
DATA_SUFFIXES = (".npy", ".npz", ".raw", ".bin")
RAW_SUFFIXES = (".raw", ".bin")
NPZ_SINOGRAM_KEYS = ("sinogram", "line_integrals", "counts")
RAW_DTYPES = {"float32", "float64", "uint16", "int16", "uint32", "int32"}
TOP_LEVEL_KEYS = {SCHEMA_KEY, "geometry", "angles", "detector", "data", "grid", "description", "patient_id"}
MAX_LINE_INTEGRAL = 1e4
"""mu times mm: water over a metre gives about 19; anything past this is not a CT measurement."""
MAX_I0 = 1e15


def is_sinogram_sidecar(doc: dict[str, Any]) -> bool:
    return SCHEMA_KEY in doc


def _choice(fields: Fields, key: str, allowed: tuple[str, ...], default: Any = None) -> str:
    value = fields.get(key, default)
    if value not in allowed:
        raise fields.refuse(key, f"must be {' or '.join(repr(a) for a in allowed)}, found {brief(value)}")
    return value


def _angles(fields: Fields) -> np.ndarray:
    section = fields.section("angles")
    unit = _choice(section, "unit", ("deg", "rad"))
    if "values" in section:
        angles = np.array(section.numbers("values", lo=-1e6, hi=1e6, max_items=MAX_COUNT))
        if not angles.size:
            raise section.refuse("values", "must be a non-empty list")
    else:
        start = section.number("start", lo=-1e6, hi=1e6)
        stop = section.number("stop", lo=-1e6, hi=1e6)
        count = section.integer("count", lo=1, hi=MAX_COUNT)
        angles = start + (stop - start) * np.arange(count) / count
    return np.deg2rad(angles) if unit == "deg" else angles


def _data_file(sidecar_path: Path, data: Fields) -> Path:
    if "file" in data:
        name = data.text("file", max_chars=255)
        if (not name or path_problem(name) or Path(name).is_absolute() or ".." in Path(name).parts
                or Path(name).name != name):
            raise data.refuse("file", f"must be a file name beside the sidecar, found {brief(name)}")
        target = sidecar_path.parent / name
        if not (target.is_file() or target.is_symlink()):
            raise KlviewerInputError(sidecar_path, f"data file {brief(name)} named in the sidecar does not exist")
        candidates = [target]
    else:
        candidates = [sidecar_path.with_suffix(suffix) for suffix in DATA_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file() or candidate.is_symlink():
            problem = link_problem(candidate, sidecar_path.parent)
            if problem is not None:
                raise KlviewerInputError(candidate, problem)
            return candidate
    raise KlviewerInputError(sidecar_path, f"no data file found beside the sidecar (looked for {sidecar_path.stem} + {'/'.join(DATA_SUFFIXES)})")


def _read_raw(data_path: Path, data: Fields) -> np.ndarray:
    dtype_name = _choice(data, "dtype", tuple(sorted(RAW_DTYPES)))
    shape = data.numbers("shape", length=(2, 3), integer=True, positive=True, hi=MAX_COUNT)
    order = _choice(data, "byte_order", ("little", "big"), "little")
    dtype = np.dtype(dtype_name).newbyteorder("<" if order == "little" else ">")
    expected = math.prod(shape) * dtype.itemsize
    with open_input(data_path) as handle:
        actual = os.fstat(handle.fileno()).st_size
        if actual != expected:
            raise SidecarMismatchError(data.source, "data.shape x data.dtype (bytes)", expected, actual)
        values = np.fromfile(handle, dtype=dtype, count=math.prod(shape))
    return values.reshape(shape).astype(np.float64 if dtype.kind == "f" and dtype.itemsize == 8 else np.float32)


def _validate_against_data(data: Fields, values: np.ndarray) -> None:
    if "shape" in data:
        shape = data.numbers("shape", length=(2, 3), integer=True, lo=0, hi=MAX_COUNT)
        if shape != list(values.shape):
            raise SidecarMismatchError(data.source, "data.shape", shape, list(values.shape))
    if "dtype" in data and str(values.dtype) != data.get("dtype"):
        raise SidecarMismatchError(data.source, "data.dtype", data.get("dtype"), str(values.dtype))


def read_sinogram(sidecar_path: Path) -> Catalog:
    """Read a sinogram described by its sidecar; the sidecar may name its data file."""
    doc = read_json_sidecar(sidecar_path)
    fields = sidecar_fields(sidecar_path, doc)
    if not is_sinogram_sidecar(doc):
        raise KlviewerInputError(sidecar_path, f"not a sinogram sidecar (no '{SCHEMA_KEY}' field)")
    if doc[SCHEMA_KEY] != 1 or isinstance(doc[SCHEMA_KEY], bool):
        raise KlviewerInputError(sidecar_path, f"sidecar version {brief(doc[SCHEMA_KEY])} is not supported (expected 1)")
    unknown = set(doc) - TOP_LEVEL_KEYS
    if unknown:
        raise KlviewerInputError(sidecar_path, f"unknown sidecar fields {brief(sorted(unknown))}")
    _choice(fields, "geometry", ("parallel",))
    angles = _angles(fields)
    detector = fields.section("detector")
    n_det = detector.integer("count", lo=1, hi=MAX_COUNT)
    det_spacing = detector.number("spacing_mm", positive=True, hi=MAX_SPACING_MM)
    grid = fields.section("grid")
    size = grid.numbers("size", length=2, integer=True, positive=True, hi=MAX_GRID_SIDE)
    grid_spacing = spacing_pair(grid, "pixel_spacing_mm")

    data = fields.section("data")
    kind = _choice(data, "kind", ("line_integrals", "counts"))
    i0 = data.number("i0", positive=True, hi=MAX_I0) if kind == "counts" else None

    data_path = _data_file(sidecar_path, data)
    if data_path.suffix.lower() in RAW_SUFFIXES:
        values = _read_raw(data_path, data)
    else:
        values = load_numeric_array(data_path, NPZ_SINOGRAM_KEYS)
        _validate_against_data(data, values)
    if values.ndim not in (2, 3) or min(values.shape) == 0:
        raise KlviewerInputError(data_path, f"sinogram must be (angles, detectors) or (slices, angles, detectors), found shape {brief(values.shape)}")
    stack = values[None] if values.ndim == 2 else values
    require_finite(data_path, stack)
    if stack.shape[1] != angles.size:
        raise SidecarMismatchError(sidecar_path, "angles (count)", int(angles.size), int(stack.shape[1]))
    if stack.shape[2] != n_det:
        raise SidecarMismatchError(sidecar_path, "detector.count", n_det, int(stack.shape[2]))
    if kind == "line_integrals" and float(np.abs(stack).max()) > MAX_LINE_INTEGRAL:
        raise KlviewerInputError(data_path, f"line integrals reach {float(np.abs(stack).max()):.4g}, beyond the "
                                            f"{MAX_LINE_INTEGRAL:g} of any CT measurement (wrong units?)")
    if kind == "counts" and float(stack.max()) > MAX_I0:
        raise KlviewerInputError(data_path, f"counts reach {float(stack.max()):.4g}, beyond {MAX_I0:g}")

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
        description=fields.text("description", sidecar_path.stem, max_chars=MAX_TEXT),
        sinogram=sinogram,
        pixel_spacing_mm=grid_spacing,
        files=[sidecar_path, data_path],
    )
    study = Study(uid=f"file:{sidecar_path.resolve()}", description=sidecar_path.stem, series=[series])
    return Catalog(patients=[Patient(patient_id=fields.text("patient_id", "(sinograms)", max_chars=MAX_TEXT), studies=[study])])
