"""Single-file NIfTI-1 volumes (.nii, .nii.gz) of CT in HU, read with numpy alone.

NIfTI stores voxels x fastest and maps voxel indices to RAS+ millimetres with an affine (the
sform when its code is set, else the qform). The reader turns the volume into klviewer's
DICOM-like axial stack: columns run to the patient's left, rows to the back, slices upwards
(LPS), so a NIfTI and the DICOM it came from look the same. Slice positions and the
orientation come from the affine, so masks map back exactly.

Refused, with the reason: NIfTI-2 and .hdr/.img pairs, 4-D series with more than one volume,
complex and RGB voxels, oblique affines (more than about 8 degrees off the axes: those need
resampling, not a reorder), and files whose size does not match the declared shape.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from klviewer.errors import KlviewerInputError
from klviewer.io.arrays import MAX_ARRAY_BYTES, hu_range_warnings, require_plausible_hu
from klviewer.io.input_files import open_input, read_up_to
from klviewer.io.study import Catalog, Patient, Series, Slice, Study

NIFTI_SUFFIXES = (".nii", ".nii.gz")
HEADER_BYTES = 348
_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4"}
# |cos| of a voxel axis against its nearest patient axis; below this the volume is oblique.
_AXIS_ALIGNED = 0.99
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: Path) -> Catalog:
    """One NIfTI-1 file as one axial CT series in its own study."""
    try:
        with open_input(path) as raw, (gzip.open(raw, "rb") if path.name.lower().endswith(".gz") else raw) as handle:
            header = handle.read(HEADER_BYTES)
            endian, shape, dtype, offset = _layout(path, header)
            volume = _read_voxels(path, handle, header, shape, dtype, offset)
    except (OSError, EOFError, zlib.error) as exc:
        raise KlviewerInputError(path, f"not a readable NIfTI file, truncated or corrupt ({exc})") from exc
    slope, inter = struct.unpack(endian + "2f", header[112:120])
    if slope != 0 and math.isfinite(slope) and math.isfinite(inter):
        volume = volume * np.float32(slope) + np.float32(inter)
    require_plausible_hu(path, volume, "the volume")
    affine, warnings = _affine(path, header, endian)
    return _catalog(path, header, volume, affine, warnings)


def _layout(path: Path, header: bytes) -> tuple[str, tuple[int, int, int], np.dtype, int]:
    """(byte order, (nz, ny, nx), voxel dtype, data offset), checked for size before any allocation."""
    if len(header) < HEADER_BYTES:
        raise KlviewerInputError(path, f"file is shorter than a NIfTI-1 header ({len(header)} of {HEADER_BYTES} bytes)")
    endian = next((e for e in "<>" if struct.unpack(e + "i", header[:4])[0] == HEADER_BYTES), None)
    if endian is None:
        raise KlviewerInputError(path, "not a NIfTI-1 file (header size field is not 348; NIfTI-2 is not supported)")
    magic = header[344:348]
    if magic != b"n+1\x00":
        raise KlviewerInputError(path, f"NIfTI magic is {magic!r}; only single-file NIfTI-1 (.nii) is read")
    dim = struct.unpack(endian + "8h", header[40:56])
    ndim = dim[0]
    if not 2 <= ndim <= 7 or any(n < 1 for n in dim[1 : ndim + 1]):
        raise KlviewerInputError(path, f"NIfTI dimensions {list(dim)} are not a 2-D or 3-D image")
    if any(n != 1 for n in dim[4 : ndim + 1]):
        raise KlviewerInputError(path, f"NIfTI holds {list(dim[1:ndim + 1])} voxels: a series of volumes; only one volume is read")
    code = struct.unpack(endian + "h", header[70:72])[0]
    if code not in _DTYPES:
        raise KlviewerInputError(path, f"NIfTI datatype code {code} is not a scalar integer or float type")
    dtype = np.dtype(endian + _DTYPES[code])
    shape = (dim[3] if ndim >= 3 else 1, dim[2], dim[1])
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise KlviewerInputError(path, f"NIfTI declares {list(shape)} voxels, {nbytes} bytes, over the {MAX_ARRAY_BYTES} limit")
    offset = struct.unpack(endian + "f", header[108:112])[0]
    if not (math.isfinite(offset) and HEADER_BYTES <= offset <= 1 << 24):
        raise KlviewerInputError(path, f"NIfTI vox_offset {offset} is not a valid data offset")
    return endian, shape, dtype, int(offset)


def _read_voxels(
    path: Path, handle: BinaryIO, header: bytes, shape: tuple[int, int, int], dtype: np.dtype, offset: int
) -> np.ndarray:
    read_up_to(handle, offset - len(header))  # header extensions, unread
    nbytes = math.prod(shape) * dtype.itemsize
    data = read_up_to(handle, nbytes)
    if len(data) != nbytes:
        raise KlviewerInputError(path, f"NIfTI data is truncated: {len(data)} of the {nbytes} bytes its shape {list(shape)} needs")
    if handle.read(1):
        raise KlviewerInputError(path, f"NIfTI file holds more data than its declared shape {list(shape)}; the header is wrong")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(np.float32)


def _affine(path: Path, header: bytes, endian: str) -> tuple[np.ndarray, list[str]]:
    """The 4x4 voxel (i, j, k) -> RAS mm affine: sform, else qform, else pixdim alone (with a warning)."""
    qform_code, sform_code = struct.unpack(endian + "2h", header[252:256])
    pixdim = struct.unpack(endian + "8f", header[76:108])
    affine = np.eye(4)
    warnings: list[str] = []
    if sform_code > 0:
        affine[:3] = np.array(struct.unpack(endian + "12f", header[280:328]), dtype=np.float64).reshape(3, 4)
    elif qform_code > 0:
        b, c, d, x, y, z = struct.unpack(endian + "6f", header[256:280])
        a = math.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
        rotation = np.array([
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ])
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        affine[:3, :3] = rotation * np.array([pixdim[1], pixdim[2], qfac * pixdim[3]])
        affine[:3, 3] = (x, y, z)
    else:
        affine[:3, :3] = np.diag(pixdim[1:4])
        warnings.append("the NIfTI header gives no orientation (sform and qform codes are 0); assumed RAS axes")
    lengths = np.linalg.norm(affine[:3, :3], axis=0)
    if not (np.isfinite(affine).all() and (lengths > 0).all()):
        raise KlviewerInputError(path, f"NIfTI affine gives voxel sizes {lengths.tolist()}; all must be positive and finite")
    return affine, warnings


def _catalog(path: Path, header: bytes, volume: np.ndarray, affine: np.ndarray, warnings: list[str]) -> Catalog:
    """Reorder the (k, j, i) array to an LPS axial stack and build its series."""
    lps = _RAS_TO_LPS @ affine[:3, :3]
    origin = _RAS_TO_LPS @ affine[:3, 3]
    lengths = np.linalg.norm(lps, axis=0)
    directions = lps / lengths
    axis_of = np.argmax(np.abs(directions), axis=0)  # the patient axis (0 x, 1 y, 2 z) of each voxel axis
    if sorted(axis_of.tolist()) != [0, 1, 2] or (np.abs(directions).max(axis=0) < _AXIS_ALIGNED).any():
        raise KlviewerInputError(path, "NIfTI orientation is oblique; only volumes aligned with the patient axes are read")
    voxel_axis = [int(np.flatnonzero(axis_of == patient)[0]) for patient in (2, 1, 0)]  # for slices, rows, columns
    flips = [directions[axis_of[v], v] < 0 for v in voxel_axis]
    stack = volume.transpose([2 - v for v in voxel_axis])
    stack = np.ascontiguousarray(stack[tuple(slice(None, None, -1) if f else slice(None) for f in flips)])
    sizes = volume.shape[::-1]  # voxels along i, j, k

    def corner(s: int) -> tuple[float, float, float]:
        index = np.zeros(3)
        for out, (v, flipped) in enumerate(zip(voxel_axis, flips)):
            position = s if out == 0 else 0
            index[v] = sizes[v] - 1 - position if flipped else position
        return tuple(float(c) for c in lps @ index + origin)  # type: ignore[return-value]

    signs = [-1.0 if f else 1.0 for f in flips]
    row_dir, col_dir = directions[:, voxel_axis[2]] * signs[2], directions[:, voxel_axis[1]] * signs[1]
    description = header[148:228].split(b"\x00")[0].decode("latin-1").strip()
    uid = f"file:{path.resolve()}"
    series = Series(
        uid=uid,
        modality="CT",
        source_kind="array",
        description=description or path.name,
        slices=[Slice(hu=stack[s], source=path, position=corner(s), instance_number=s + 1) for s in range(stack.shape[0])],
        pixel_spacing_mm=(float(lengths[voxel_axis[1]]), float(lengths[voxel_axis[2]])),
        slice_thickness_mm=float(lengths[voxel_axis[0]]),
        orientation=tuple(float(v) + 0.0 for v in (*row_dir, *col_dir)),  # + 0.0: no -0.0  # type: ignore[arg-type]
        files=[path],
        warnings=warnings + hu_range_warnings(stack) + ["NIfTI carries no modality; read as CT in HU"],
    )
    study = Study(uid=uid, description=path.name, series=[series])
    return Catalog(patients=[Patient(patient_id="(nifti)", studies=[study])])
