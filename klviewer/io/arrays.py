"""HU images handed in as .npy / .npz arrays, as research pipelines do.

An array is (H, W) or (S, H, W) in Hounsfield units. An optional sidecar `<stem>.json` gives
the pixel spacing and, when present, is checked against the data.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from klviewer.errors import KlviewerInputError, SidecarMismatchError
from klviewer.io.sidecar import number, read_json_sidecar, spacing_pair
from klviewer.io.study import Catalog, Patient, Series, Slice, Study

ARRAY_SUFFIXES = (".npy", ".npz")
NPZ_IMAGE_KEYS = ("hu", "image", "images", "volume")
ARRAY_SIDECAR_KEYS = {
    "pixel_spacing_mm", "slice_thickness_mm", "description", "patient_id", "patient_name",
    "window", "modality", "shape", "units",
}
MAX_ARRAY_BYTES = 4 << 30


def npz_embedded_spacing(path: Path) -> float | None:
    """Pixel spacing from an npz's `meta` JSON string (klviewer phantoms carry one), if any."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "meta" not in archive.files or archive["meta"].dtype.kind != "U" or archive["meta"].ndim != 0:
                return None
            doc = json.loads(str(archive["meta"]))
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    value = doc.get("pixel_spacing_mm") if isinstance(doc, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def load_numeric_array(path: Path, preferred_keys: tuple[str, ...]) -> np.ndarray:
    """Load a numeric array from .npy or .npz without ever unpickling."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = [n for n in archive.files if n != "meta"] if "meta" in archive.files and len(archive.files) > 1 else list(archive.files)
                key = next((k for k in preferred_keys if k in names), None)
                if key is None:
                    if len(names) != 1:
                        raise KlviewerInputError(
                            path, f"npz holds {names or 'no arrays'}; expected one of {list(preferred_keys)} or a single array"
                        )
                    key = names[0]
                array = archive[key]
        else:
            array = np.load(path, allow_pickle=False, mmap_mode="r")
    except KlviewerInputError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "python objects" in str(exc).lower():
            raise KlviewerInputError(path, "array holds Python objects; only numeric arrays are read (pickles never are)") from exc
        raise KlviewerInputError(path, f"not a readable numpy array ({exc})") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise KlviewerInputError(path, f"not a readable numpy array, truncated or corrupt ({exc})") from exc
    if array.dtype.kind not in "iuf":
        raise KlviewerInputError(path, f"array dtype {array.dtype} is not numeric")
    if array.nbytes > MAX_ARRAY_BYTES:
        raise KlviewerInputError(path, f"array is {array.nbytes} bytes, over the {MAX_ARRAY_BYTES} limit")
    try:
        return np.asarray(array)
    except (OSError, ValueError) as exc:
        raise KlviewerInputError(path, f"array data is truncated ({exc})") from exc


def require_finite(path: Path, array: np.ndarray) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise KlviewerInputError(path, f"array holds {bad} NaN/inf values")


def hu_range_warnings(volume: np.ndarray) -> list[str]:
    """A warning when an image's values cannot be Hounsfield units (flat, or far outside -4000..40000)."""
    lo, hi = float(volume.min()), float(volume.max())
    if hi - lo < 10 or lo < -4000 or hi > 40000:
        return [f"values {lo:.4g}..{hi:.4g} do not look like Hounsfield units"]
    return []


def _check_sidecar(data_path: Path, sidecar_path: Path, doc: dict[str, Any], volume: np.ndarray) -> None:
    unknown = set(doc) - ARRAY_SIDECAR_KEYS
    if unknown:
        raise KlviewerInputError(sidecar_path, f"unknown sidecar fields {sorted(unknown)}; allowed: {sorted(ARRAY_SIDECAR_KEYS)}")
    if "shape" in doc and list(doc["shape"]) != list(volume.shape):
        if not (len(doc["shape"]) == 2 and list(doc["shape"]) == list(volume.shape[1:]) and volume.shape[0] == 1):
            raise SidecarMismatchError(sidecar_path, "shape", list(doc["shape"]), list(volume.shape))
    if "units" in doc and str(doc["units"]).upper() != "HU":
        raise KlviewerInputError(sidecar_path, f"sidecar field 'units' is {doc['units']!r}; image arrays must be in HU")


def _find_sidecar(path: Path) -> Path | None:
    candidate = path.with_suffix(".json")
    return candidate if candidate.is_file() else None


def read_array_image(path: Path) -> Catalog:
    """One array file as one series in its own study."""
    array = load_numeric_array(path, NPZ_IMAGE_KEYS)
    if array.ndim not in (2, 3) or min(array.shape) == 0:
        raise KlviewerInputError(path, f"image array must be (H, W) or (S, H, W), found shape {array.shape}")
    volume = (array[None] if array.ndim == 2 else array).astype(np.float32)
    require_finite(path, volume)

    sidecar_path = _find_sidecar(path)
    doc = read_json_sidecar(sidecar_path) if sidecar_path else {}
    if sidecar_path:
        _check_sidecar(path, sidecar_path, doc, volume)
    spacing = spacing_pair(sidecar_path, doc, "pixel_spacing_mm") if "pixel_spacing_mm" in doc else None
    if spacing is None and path.suffix.lower() == ".npz":
        embedded = npz_embedded_spacing(path)
        spacing = None if embedded is None else (embedded, embedded)
    thickness = number(sidecar_path, doc, "slice_thickness_mm") if "slice_thickness_mm" in doc else None
    window = None
    if "window" in doc:
        w = doc["window"]
        if not (isinstance(w, list) and len(w) == 2):
            raise KlviewerInputError(sidecar_path, f"sidecar field 'window' must be [center, width], found {w!r}")
        window = (number(sidecar_path, {"c": w[0]}, "c", positive=False), number(sidecar_path, {"w": w[1]}, "w"))

    series = Series(
        uid=f"file:{path.resolve()}",
        modality=str(doc.get("modality", "CT")),
        source_kind="array",
        description=str(doc.get("description", path.name)),
        slices=[Slice(hu=volume[i], source=path, instance_number=i + 1) for i in range(volume.shape[0])],
        pixel_spacing_mm=spacing,
        slice_thickness_mm=thickness,
        window=window,
        files=[path] + ([sidecar_path] if sidecar_path else []),
    )
    if spacing is None:
        series.warnings.append("no pixel spacing given (add a sidecar with 'pixel_spacing_mm'); the analysis assumes "
                               "the image spans the prior's field of view")
    series.warnings.extend(hu_range_warnings(volume))
    study = Study(uid=f"file:{path.resolve()}", description=path.stem, series=[series])
    patient_id = str(doc.get("patient_id", "(arrays)"))
    return Catalog(patients=[Patient(patient_id=patient_id, name=str(doc.get("patient_name", "")), studies=[study])])
