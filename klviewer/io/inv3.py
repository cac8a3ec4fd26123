"""InVesalius 3 projects (.inv3): the CT volume inside one, as an HU series.

An .inv3 file is a tar archive (gzip-compressed or plain). Its `main.plist` describes the
volume: `matrix` = {filename, shape [slices, rows, cols], dtype}, `spacing` [x, y, z] in mm,
`modality`, `window_level`/`window_width` and the project `name`. The volume file holds raw
little-endian samples (InVesalius writes numpy memmaps on little-endian machines); for CT they
are HU already.

Decisions worth knowing:
- InVesalius keeps each axial image bottom row first (VTK's convention: it reverses the rows
  of every DICOM image it imports). The reader reverses them back, so row 0 is anterior as in
  the DICOM the project came from. Slices keep their stored order (inferior first).
- A project records no patient coordinates, so slice positions are in the volume's own frame:
  the first slice at z = 0, then one slice spacing apart. Masks, surfaces and measurements in
  the project are not read.
- The archive is read in memory and never extracted. Member names that climb out of the
  archive, absolute names, links, oversized members and a volume whose size does not match its
  declared shape refuse the whole file before anything large is allocated. The plist is parsed
  by plistlib (no entities, no pickles).
"""

from __future__ import annotations

import math
import plistlib
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any
from xml.parsers.expat import ExpatError

import numpy as np

from klviewer.errors import KlviewerInputError
from klviewer.io.arrays import MAX_ARRAY_BYTES, hu_range_warnings, require_plausible_hu
from klviewer.io.input_files import open_input, read_up_to
from klviewer.io.study import Catalog, Patient, Series, Slice, Study

INV3_SUFFIX = ".inv3"
MAX_PLIST_BYTES = 1 << 20
MAX_MEMBERS = 10_000
_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "float32", "float64")
_AXIAL = (1, "AXIAL")
_MODALITIES = {"CT": "CT", "MRI": "MR", "MR": "MR"}


def read_inv3(path: Path) -> Catalog:
    """The volume of one InVesalius project as one series in its own study."""
    try:
        with open_input(path) as raw, tarfile.open(fileobj=raw, mode="r:*") as archive:
            members = _regular_members(path, archive)
            plist_member = _main_plist(path, members)
            project = _read_plist(path, archive, plist_member)
            matrix_member, shape, dtype = _matrix_member(path, project, members, plist_member)
            spacing = _spacing(path, project)
            raw = _read_member(path, archive, matrix_member, matrix_member.size)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise KlviewerInputError(path, f"not a readable InVesalius project archive, truncated or corrupt ({exc})") from exc
    # Rows back to top-first order: InVesalius stores them bottom-first (see the module doc).
    volume = np.frombuffer(raw, dtype=dtype).reshape(shape)[:, ::-1, :].astype(np.float32)
    require_plausible_hu(path, volume, "the volume")
    return _catalog(path, project, volume, spacing)


def _regular_members(path: Path, archive: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Every file in the archive by normalised name; refuses archives no InVesalius would write."""
    members: dict[str, tarfile.TarInfo] = {}
    for count, member in enumerate(archive, start=1):
        if count > MAX_MEMBERS:
            raise KlviewerInputError(path, f"archive holds more than {MAX_MEMBERS} members; not an InVesalius project")
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts or "\\" in member.name:
            raise KlviewerInputError(path, f"archive member {member.name!r} points outside the archive; refused")
        if member.isdir():
            continue
        if not member.isfile():
            raise KlviewerInputError(path, f"archive member {member.name!r} is a link or special file; refused")
        if member.size > MAX_ARRAY_BYTES:
            raise KlviewerInputError(path, f"archive member {member.name!r} is {member.size} bytes, over the {MAX_ARRAY_BYTES} limit")
        members[str(name)] = member
    return members


def _main_plist(path: Path, members: dict[str, tarfile.TarInfo]) -> tarfile.TarInfo:
    found = [m for name, m in members.items() if PurePosixPath(name).name == "main.plist"]
    if len(found) != 1:
        problem = "no main.plist" if not found else f"{len(found)} main.plist files"
        raise KlviewerInputError(path, f"archive holds {problem}; not an InVesalius 3 project")
    if found[0].size > MAX_PLIST_BYTES:
        raise KlviewerInputError(path, f"main.plist is {found[0].size} bytes, over the {MAX_PLIST_BYTES} limit")
    return found[0]


def _read_member(path: Path, archive: tarfile.TarFile, member: tarfile.TarInfo, size: int) -> bytes:
    handle = archive.extractfile(member)
    if handle is None:
        raise KlviewerInputError(path, f"archive member {member.name!r} cannot be read")
    data = read_up_to(handle, size)
    if len(data) != size:
        raise KlviewerInputError(path, f"archive member {member.name!r} is truncated ({len(data)} of {size} bytes)")
    return data


def _read_plist(path: Path, archive: tarfile.TarFile, member: tarfile.TarInfo) -> dict[str, Any]:
    try:
        project = plistlib.loads(_read_member(path, archive, member, member.size))
    except (plistlib.InvalidFileException, ExpatError, ValueError, TypeError, OverflowError) as exc:
        raise KlviewerInputError(path, f"main.plist is not a valid property list ({exc})") from exc
    if not isinstance(project, dict):
        raise KlviewerInputError(path, f"main.plist must hold a dictionary, found {type(project).__name__}")
    return project


def _matrix_member(
    path: Path, project: dict[str, Any], members: dict[str, tarfile.TarInfo], plist_member: tarfile.TarInfo
) -> tuple[tarfile.TarInfo, tuple[int, int, int], np.dtype]:
    """The volume's member, shape and dtype, checked against each other before any allocation."""
    matrix = project.get("matrix")
    if not isinstance(matrix, dict):
        raise KlviewerInputError(path, "main.plist has no 'matrix' entry (a project older than InVesalius 3.0?); not supported")
    filename, shape, dtype_name = matrix.get("filename"), matrix.get("shape"), matrix.get("dtype")
    if not isinstance(filename, str) or not filename or filename in (".", "..") or "/" in filename or "\\" in filename:
        raise KlviewerInputError(path, f"main.plist names the volume file {filename!r}; expected a plain file name")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(n) is int and n > 0 for n in shape)):
        raise KlviewerInputError(path, f"main.plist gives the volume shape {shape!r}; expected [slices, rows, cols] of positive integers")
    if dtype_name not in _DTYPES:
        raise KlviewerInputError(path, f"main.plist gives the volume dtype {dtype_name!r}; expected one of {list(_DTYPES)}")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    declared = math.prod(shape) * dtype.itemsize
    if declared > MAX_ARRAY_BYTES:
        raise KlviewerInputError(path, f"main.plist declares a {shape} {dtype_name} volume of {declared} bytes, over the {MAX_ARRAY_BYTES} limit")
    name = str(PurePosixPath(plist_member.name).parent / filename)
    member = members.get(name)
    if member is None:
        raise KlviewerInputError(path, f"main.plist names the volume file {filename!r}, which the archive does not hold")
    if member.size != declared:
        raise KlviewerInputError(
            path, f"{filename} holds {member.size} bytes but main.plist declares a {shape} {dtype_name} volume of {declared} bytes"
        )
    return member, (shape[0], shape[1], shape[2]), dtype


def _spacing(path: Path, project: dict[str, Any]) -> tuple[float, float, float]:
    spacing = project.get("spacing")
    valid = (
        isinstance(spacing, list) and len(spacing) == 3
        and all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in spacing)
    )
    if not valid:
        raise KlviewerInputError(path, f"main.plist gives the voxel spacing {spacing!r}; expected [x, y, z] in mm, all positive")
    return (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def _window(project: dict[str, Any]) -> tuple[float, float] | None:
    level, width = project.get("window_level"), project.get("window_width")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (level, width))
    return (float(level), float(width)) if numbers and width > 0 else None


def _catalog(path: Path, project: dict[str, Any], volume: np.ndarray, spacing: tuple[float, float, float]) -> Catalog:
    x_mm, y_mm, z_mm = spacing
    name = project.get("name") if isinstance(project.get("name"), str) else ""
    modality = _MODALITIES.get(str(project.get("modality", "CT")).upper(), str(project.get("modality")))
    uid = f"file:{path.resolve()}"
    series = Series(
        uid=uid,
        modality=modality,
        source_kind="array",
        description=f"{name or path.stem} (InVesalius project)",
        slices=[
            Slice(hu=volume[k], source=path, position=(0.0, 0.0, k * z_mm), instance_number=k + 1)
            for k in range(volume.shape[0])
        ],
        pixel_spacing_mm=(y_mm, x_mm),
        slice_thickness_mm=z_mm,
        window=_window(project),
        files=[path],
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    )
    orientation = project.get("orientation", 1)
    if orientation not in _AXIAL and str(orientation).upper() not in _AXIAL:
        series.warnings.append(
            f"the project's original orientation is {orientation!r}; the volume is read as InVesalius stores it, an axial stack"
        )
    if modality == "CT":
        series.warnings.extend(hu_range_warnings(volume))
    series.warnings.append("an InVesalius project records no patient coordinates; slice positions start at z = 0")
    study = Study(uid=uid, description=path.stem, date=str(project.get("date", ""))[:10].replace("-", ""), series=[series])
    return Catalog(patients=[Patient(patient_id=name or f"(InVesalius) {path.stem}", name=name, studies=[study])])
