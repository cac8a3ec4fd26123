"""HU images handed in as .npy / .npz arrays, as research pipelines do.

An array is (H, W) or (S, H, W) in Hounsfield units. An optional sidecar `<stem>.json` gives
the pixel spacing and, when present, is checked against the data.
"""

from __future__ import annotations

import math
import tokenize
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from klviewer.errors import KlviewerInputError, SidecarMismatchError, brief, shorten
from klviewer.io.input_files import link_problem, open_input
from klviewer.io.json_input import Fields, parse_json
from klviewer.io.sidecar import MAX_TEXT, read_json_sidecar, sidecar_fields, spacing_pair
from klviewer.io.study import Catalog, Patient, Series, Slice, Study

ARRAY_SUFFIXES = (".npy", ".npz")
NPZ_IMAGE_KEYS = ("hu", "image", "images", "volume")
ARRAY_SIDECAR_KEYS = {
    "pixel_spacing_mm", "slice_thickness_mm", "description", "patient_id", "patient_name",
    "window", "modality", "shape", "units",
}
MAX_ARRAY_BYTES = 4 << 30
MAX_META_CHARS = 1 << 20
MAX_IMAGE_SIDE = 8192
"""Longest image side read: CT slices are at most 2048 pixels, and the analysis pads an image to a
square of its longer side, so a 65535 x 3 image would become 16 GiB."""
HU_LIMIT = 100_000.0
"""No CT value lies beyond +-100,000 HU (metal on an extended scale reaches about 30,000, padding
about -34,000); an image past it is not in HU, and its scores would be numbers without meaning."""


def npz_embedded_spacing(path: Path) -> float | None:
    """Pixel spacing from an npz's `meta` JSON string (klviewer phantoms carry one), if any."""
    try:
        meta = load_npz_arrays(path, ("meta",), required=False).get("meta")
    except KlviewerInputError:
        return None
    if meta is None or meta.dtype.kind != "U" or meta.ndim != 0 or meta.size * meta.itemsize > MAX_META_CHARS * 4:
        return None
    try:
        doc = parse_json(str(meta), path, "the npz's 'meta' entry")
    except KlviewerInputError:
        return None
    value = doc.get("pixel_spacing_mm")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1000
    return float(value) if ok else None


def _declared(path: Path, name: str, header: tuple[tuple[int, ...], bool, np.dtype], stored: int, offset: int) -> None:
    """Refuse an npy header whose shape promises more data than the file holds, or than we allow."""
    shape, _, dtype = header
    if dtype.hasobject:
        raise KlviewerInputError(path, f"array {name!r} holds Python objects; only numeric arrays are read (pickles never are)")
    if any(n < 0 for n in shape):
        raise KlviewerInputError(path, f"array {name!r} declares a negative shape {brief(shape)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise KlviewerInputError(path, f"array {name!r} declares shape {brief(shape)}, {nbytes} bytes, over the {MAX_ARRAY_BYTES} limit")
    if nbytes > stored - offset:
        raise KlviewerInputError(path, f"array {name!r} declares shape {brief(shape)} ({nbytes} bytes) but the file "
                                       f"holds {max(stored - offset, 0)} bytes of data (truncated or lying header)")


def _npy_header(handle: Any) -> tuple[tuple[tuple[int, ...], bool, np.dtype], int]:
    """(shape, fortran order, dtype) and where the data starts. numpy parses the header's Python-literal
    dict with the tokenizer and ast, which raise more than ValueError for damaged text."""
    try:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        header = read(handle)
    except (ValueError, SyntaxError, TypeError, tokenize.TokenError, RecursionError, MemoryError) as exc:
        raise ValueError(f"the npy header cannot be parsed ({type(exc).__name__}: {shorten(str(exc), 200)})") from exc
    return header, handle.tell()


def load_npz_arrays(path: Path, keys: tuple[str, ...] | None, required: bool = True) -> dict[str, np.ndarray]:
    """Arrays of an .npz (all, or those of `keys` that it has), each checked against its declared
    size before it is read: the zip directory's sizes bound every member, so no header can make
    the reader allocate more than the archive really holds."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with open_input(path) as handle, zipfile.ZipFile(handle) as archive:
            members = {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}
            wanted = list(members) if keys is None else [k for k in keys if k in members]
            if required and keys is not None and not wanted:
                raise KlviewerInputError(path, f"npz holds {brief(sorted(members))}; expected one of {list(keys)}")
            for name in wanted:
                info = members[name]
                with archive.open(info) as member:
                    header, offset = _npy_header(member)
                _declared(path, name, header, info.file_size, offset)
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    except KlviewerInputError:
        raise
    except MemoryError as exc:
        raise KlviewerInputError(path, "array does not fit in memory") from exc
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise KlviewerInputError(path, f"not a readable numpy array: the npz archive is truncated or corrupt ({type(exc).__name__}: "
                                       f"{shorten(str(exc), 300)})") from exc
    return arrays


def _load_npy(path: Path) -> np.ndarray:
    try:
        with open_input(path) as handle:
            header, offset = _npy_header(handle)
            _declared(path, "npy", header, handle.seek(0, 2), offset)
            handle.seek(0)
            return np.lib.format.read_array(handle, allow_pickle=False)
    except KlviewerInputError:
        raise
    except MemoryError as exc:
        raise KlviewerInputError(path, "array does not fit in memory") from exc
    except (OSError, EOFError, ValueError) as exc:
        raise KlviewerInputError(path, f"not a readable numpy array, truncated or corrupt ({type(exc).__name__}: "
                                       f"{shorten(str(exc), 300)})") from exc


def load_numeric_array(path: Path, preferred_keys: tuple[str, ...]) -> np.ndarray:
    """Load a numeric array from .npy or .npz without ever unpickling, its size checked before reading."""
    if path.suffix.lower() == ".npz":
        arrays = load_npz_arrays(path, None)
        names = [n for n in arrays if n != "meta"] if "meta" in arrays and len(arrays) > 1 else list(arrays)
        key = next((k for k in preferred_keys if k in names), None)
        if key is None:
            if len(names) != 1:
                raise KlviewerInputError(
                    path, f"npz holds {brief(names) if names else 'no arrays'}; expected one of {list(preferred_keys)} or a single array"
                )
            key = names[0]
        array = arrays[key]
    else:
        array = _load_npy(path)
    if array.dtype.kind not in "iuf":
        raise KlviewerInputError(path, f"array dtype {array.dtype} is not numeric")
    return array


def require_image_sides(path: Path | None, rows: int, columns: int) -> None:
    if not (0 < rows <= MAX_IMAGE_SIDE and 0 < columns <= MAX_IMAGE_SIDE):
        raise KlviewerInputError(path, f"image of {columns} x {rows} pixels: sides must lie in 1..{MAX_IMAGE_SIDE}")


def require_finite(path: Path, array: np.ndarray) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise KlviewerInputError(path, f"array holds {bad} NaN/inf values")


def require_plausible_hu(path: Path | None, volume: np.ndarray, where: str = "image") -> None:
    """Refuse values that cannot be Hounsfield units: NaN, infinite, or beyond +-HU_LIMIT."""
    finite = np.isfinite(volume)
    if not finite.all():
        raise KlviewerInputError(path, f"{where} holds {int(finite.size - finite.sum())} NaN/inf values")
    lo, hi = float(volume.min()), float(volume.max())
    if lo < -HU_LIMIT or hi > HU_LIMIT:
        raise KlviewerInputError(path, f"{where} values {lo:.4g}..{hi:.4g} HU are not CT values "
                                       f"(beyond +-{HU_LIMIT:.0f} HU); not read")


def hu_range_warnings(volume: np.ndarray) -> list[str]:
    """A warning when an image's values cannot be Hounsfield units (flat, or far outside -4000..40000)."""
    lo, hi = float(volume.min()), float(volume.max())
    if hi - lo < 10 or lo < -4000 or hi > 40000:
        return [f"values {lo:.4g}..{hi:.4g} do not look like Hounsfield units"]
    return []


def _check_sidecar(fields: Fields, volume: np.ndarray) -> None:
    sidecar_path = fields.source
    unknown = set(fields.doc) - ARRAY_SIDECAR_KEYS
    if unknown:
        raise KlviewerInputError(sidecar_path, f"unknown sidecar fields {brief(sorted(unknown))}; allowed: {sorted(ARRAY_SIDECAR_KEYS)}")
    if "shape" in fields:
        shape = fields.numbers("shape", length=(2, 3), integer=True, lo=0)
        if shape != list(volume.shape) and not (len(shape) == 2 and shape == list(volume.shape[1:]) and volume.shape[0] == 1):
            raise SidecarMismatchError(sidecar_path, "shape", shape, list(volume.shape))
    if "units" in fields and fields.text("units", max_chars=16).upper() != "HU":
        raise KlviewerInputError(sidecar_path, f"sidecar field 'units' is {brief(fields.doc['units'])}; image arrays must be in HU")


def _find_sidecar(path: Path) -> Path | None:
    candidate = path.with_suffix(".json")
    if not (candidate.is_file() or candidate.is_symlink()):
        return None
    problem = link_problem(candidate, path.parent)
    if problem is not None:
        raise KlviewerInputError(candidate, problem)
    return candidate


def read_array_image(path: Path) -> Catalog:
    """One array file as one series in its own study."""
    array = load_numeric_array(path, NPZ_IMAGE_KEYS)
    if array.ndim not in (2, 3) or min(array.shape) == 0:
        raise KlviewerInputError(path, f"image array must be (H, W) or (S, H, W), found shape {brief(array.shape)}")
    require_image_sides(path, array.shape[-2], array.shape[-1])
    try:
        volume = (array[None] if array.ndim == 2 else array).astype(np.float32)
    except MemoryError as exc:
        raise KlviewerInputError(path, "array does not fit in memory as float32") from exc
    require_plausible_hu(path, volume, "array")

    sidecar_path = _find_sidecar(path)
    fields = sidecar_fields(sidecar_path, read_json_sidecar(sidecar_path)) if sidecar_path else None
    if fields is not None:
        _check_sidecar(fields, volume)
    spacing = spacing_pair(fields, "pixel_spacing_mm") if fields is not None and "pixel_spacing_mm" in fields else None
    if spacing is None and path.suffix.lower() == ".npz":
        embedded = npz_embedded_spacing(path)
        spacing = None if embedded is None else (embedded, embedded)
    thickness = fields.number("slice_thickness_mm", positive=True, hi=1000.0) if fields and "slice_thickness_mm" in fields else None
    window = None
    if fields is not None and "window" in fields:
        center, width = fields.numbers("window", length=2, lo=-HU_LIMIT, hi=HU_LIMIT)
        if not width > 0:
            raise fields.refuse("window", f"must be [center, width] with a positive width, found {brief(fields.doc['window'])}")
        window = (center, width)

    def text(key: str, default: str) -> str:
        return fields.text(key, default, max_chars=MAX_TEXT) if fields is not None else default

    series = Series(
        uid=f"file:{path.resolve()}",
        modality=text("modality", "CT"),
        source_kind="array",
        description=text("description", path.name),
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
    return Catalog(patients=[Patient(patient_id=text("patient_id", "(arrays)"), name=text("patient_name", ""), studies=[study])])
