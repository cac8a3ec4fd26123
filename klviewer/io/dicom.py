"""Read DICOM files (and the DICOMDIRs among them) into a Catalog of HU series.

Every file either contributes slices or lands in `Catalog.skipped` with the reason. Nothing a
file contains, and no exception a decoder raises, stops the other files from loading.

Decisions worth knowing:
- Only single-channel grayscale images load. Colour images (RGB, YBR, palette) and derived
  objects that carry pixel data without being images to read (SEG, Parametric Map, RT Dose)
  are skipped with the reason: showing a segmentation or a heat map as if it were anatomy would
  mislead, and klviewer writes its own heat maps as Parametric Maps.
- A series whose images differ in size keeps the most common size (ties: the larger image);
  the other files are skipped with the reason. A localizer filed into an axial series is the
  usual cause, and one series must stack into one volume.
- The same SOPInstanceUID and frame seen twice (a copied file) keeps the first and skips the
  copy. Distinct instances at the same position are all kept, with a warning on the series.
- Slices are ordered along the slice normal, ascending. Without usable positions they are
  ordered by InstanceNumber, and the series says so in `Series.warnings`.
- `Slice.frame` is the 0-based frame index for multi-frame files (DICOM frame number - 1),
  None for single-frame files.
"""

from __future__ import annotations

import io
import os
import traceback
from collections import Counter, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_partial, read_preamble
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    ParametricMapStorage,
    RTDoseStorage,
    RTStructureSetStorage,
    SegmentationStorage,
    UID,
)

from klviewer.errors import KlviewerInputError, shorten
from klviewer.io.arrays import MAX_ARRAY_BYTES, require_image_sides, require_plausible_hu
from klviewer.io.input_files import inside, open_input, path_problem, read_input_bytes
from klviewer.io.study import Catalog, Patient, Series, SkippedFile, Slice, Study

_NOT_IMAGES = {
    SegmentationStorage: "a DICOM Segmentation (SEG), not an image",
    UID("1.2.840.10008.5.1.4.1.1.66.7"): "a DICOM Label Map Segmentation, not an image",
    ParametricMapStorage: "a DICOM Parametric Map (derived values, not an image)",
    RTDoseStorage: "an RT Dose grid, not an image",
    RTStructureSetStorage: "an RT Structure Set (contours, read by klviewer.io.rtstruct), not an image",
}
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# DS values carry about 6 significant digits, so geometry is compared with tolerances.
_ORIENTATION_TOL = 1e-3
_POSITION_TOL_MM = 1e-3
_SPACING_VARIATION = 0.1
MAX_DICOM_BYTES = 2 << 30
"""The largest file parsed: an enhanced CT series of a thousand 512x512 frames is about 0.5 GiB."""
HEADER_BYTES = 1 << 20
"""What a header-only read reads: the attributes before the pixel data, which are rarely past a few KiB."""
MAX_ELEMENTS = 100_000
"""Top-level data elements parsed per file; a CT image has a few hundred."""


class _Skip(Exception):
    """A file cannot be used; the message is the reason the user sees."""


def _get(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """An attribute's value; pydicom converts values when first read, so a malformed one raises
    here, and the reason names the attribute."""
    try:
        return ds.get(keyword, default)
    except Exception as exc:  # noqa: BLE001 - value converters raise many types for damaged values
        raise _Skip(f"attribute {keyword} cannot be read ({type(exc).__name__}: {shorten(str(exc), 300)})") from exc


@dataclass(frozen=True)
class _Header:
    """What places one file in patient -> study -> series."""

    patient_id: str
    patient_name: str
    study_uid: str
    study_description: str
    study_date: str
    series_uid: str
    series_description: str
    series_number: int | None
    modality: str
    frame_of_reference_uid: str | None
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None


@dataclass
class _Image:
    """One decoded 2-D frame with the geometry and display values needed to build a Series."""

    path: Path
    header: _Header
    hu: np.ndarray
    frame: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    window: tuple[float, float] | None
    stack_position: int | None


def read_dicom_files(files: Sequence[Path]) -> Catalog:
    """Read DICOM files into a Catalog; unusable files go to `Catalog.skipped` with the reason.

    DICOMDIRs among `files` add the files they reference (relative to the DICOMDIR's folder).
    A file reached twice (listed and referenced) is read once. Input files are only read.
    """
    images: list[_Image] = []
    skipped: list[SkippedFile] = []
    queue = deque(Path(f) for f in files)
    seen: set[str] = set()
    while queue:
        path = queue.popleft()
        if not _first_visit(path, seen):
            continue
        try:
            ds = _read_dataset(path)
            if _is_dicomdir(path, ds):
                referenced, missing = _dicomdir_references(path, ds)
                queue.extend(referenced)
                skipped.extend(m for m in missing if _first_visit(m.path, seen))
                if not referenced and not missing:
                    raise _Skip("DICOMDIR references no files")
                continue
            images.extend(_images_from_dataset(path, ds))
        except _Skip as exc:
            skipped.append(SkippedFile(path, str(exc)))
        except Exception as exc:  # noqa: BLE001 - any parser or decoder failure skips only this file
            skipped.append(SkippedFile(path, f"unexpected error reading DICOM ({_where(exc)}): {type(exc).__name__}: "
                                             f"{shorten(str(exc), 300)}"))
    return _build_catalog(images, skipped)


def _where(exc: BaseException) -> str:
    """The innermost klviewer function the error passed through, so the reason says which step failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "klviewer" in f.filename]
    return f"in {frames[-1].name}" if frames else "in the reader"


def _first_visit(path: Path, seen: set[str]) -> bool:
    """Record `path`; False when it (or a link to the same file) was already handled."""
    # realpath, unlike Path.resolve on 3.11, does not raise on symlink loops.
    key = os.path.realpath(path)
    if key in seen:
        return False
    seen.add(key)
    return True


# --- reading one file -------------------------------------------------------------------------


def _read_dataset(path: Path) -> Dataset:
    try:
        return read_bounded_dataset(path)
    except KlviewerInputError as exc:
        raise _Skip(exc.problem) from exc


def read_bounded_dataset(path: Path, header_only: bool = False) -> Dataset:
    """Parse one DICOM file, with the work bounded by its size (KlviewerInputError names the file).

    `header_only` reads at most the first HEADER_BYTES and stops before the pixel data: enough for
    the patient, study and series attributes that discovery needs.

    The whole file is read into memory first (at most MAX_DICOM_BYTES) and parsed from there, so no
    declared length can make pydicom read or allocate past the file's end. At the top level, at most MAX_ELEMENTS
    elements are parsed, and command-group (0000,xxxx) elements or one tag twice in a row end the
    parse: a run of zero bytes reads as an endless series of (0000,0000) elements, at about 0.3 s
    per MiB, and no real file holds either.
    """
    reason, force = sniff_dicom(path)
    if reason is not None:
        raise KlviewerInputError(path, reason)
    if header_only:
        with open_input(path) as handle:
            data = handle.read(HEADER_BYTES)
    else:
        data = read_input_bytes(path, MAX_DICOM_BYTES, "DICOM file")
    syntax, first_group = _peek(data, force)
    if syntax == DeflatedExplicitVRLittleEndian:
        raise KlviewerInputError(path, "Deflated Explicit VR Little Endian is not read (its size is known only after inflating it)")
    if first_group == 0:
        # pydicom reads group 0000 as a network command set, element by element and without the guard.
        raise KlviewerInputError(path, "a command group (0000,xxxx) after the file meta: damaged or not a DICOM file "
                                       "(a run of zero bytes?)")
    try:
        return read_partial(io.BytesIO(data), stop_when=_ElementGuard(header_only), force=force)
    except _Skip as exc:
        raise KlviewerInputError(path, str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise KlviewerInputError(path, f"unreadable DICOM file ({type(exc).__name__}: {shorten(str(exc), 300)})") from exc


def _peek(data: bytes, force: bool) -> tuple[str | None, int | None]:
    """(the file meta's TransferSyntaxUID, the group of the first element after the meta); None for
    what cannot be read (the full parse that follows reports why)."""
    handle = io.BytesIO(data)
    try:
        read_preamble(handle, force)
        syntax = str(_read_file_meta_info(handle).get("TransferSyntaxUID", "") or "") or None
    except Exception:  # noqa: BLE001 - a damaged meta is reported by the full parse that follows
        return None, None
    head = handle.read(2)
    return syntax, int.from_bytes(head, "little") if len(head) == 2 else None


class _ElementGuard:
    """pydicom's `stop_when` hook, called before each top-level element's value is read."""

    def __init__(self, stop_at_pixels: bool = False) -> None:
        self.stop_at_pixels = stop_at_pixels
        self.count = 0
        self.previous: int | None = None

    def __call__(self, tag: int, vr: str | None, length: int) -> bool:
        if self.stop_at_pixels and tag >= 0x7FE00000:
            return True
        self.count += 1
        name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if self.count > MAX_ELEMENTS:
            raise _Skip(f"more than {MAX_ELEMENTS} top-level data elements: not a DICOM image (corrupt?)")
        if tag >> 16 == 0:
            raise _Skip(f"element {name} of the command group inside the dataset: damaged or not DICOM "
                        "(a run of zero bytes?)")
        if tag == self.previous:
            raise _Skip(f"element {name} appears twice in a row: damaged file")
        self.previous = tag
        return False


def sniff_dicom(path: Path) -> tuple[str | None, bool]:
    """(why the file is not DICOM, or None; whether pydicom must read it with force=True).

    Reads 132 bytes, of regular files only (a FIFO would block, a device never end). Files with
    the 'DICM' marker read normally. Old files without a preamble start directly with a group
    0002 or 0008 element; anything else is not DICOM, and forcing it would parse noise.
    """
    try:
        with open_input(path) as handle:
            head = handle.read(132)
    except KlviewerInputError as exc:
        return exc.problem, False
    if len(head) == 132 and head[128:] == b"DICM":
        return None, False
    if head[:2] in (b"\x02\x00", b"\x08\x00"):
        return None, True
    return ("not a DICOM file (no 'DICM' marker and no DICOM header)" if head else "empty file"), False


def _is_dicomdir(path: Path, ds: Dataset) -> bool:
    sop_class = getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
    return path.name.upper() == "DICOMDIR" or sop_class == MediaStorageDirectoryStorage


def _dicomdir_references(dicomdir: Path, ds: Dataset) -> tuple[list[Path], list[SkippedFile]]:
    """Files a DICOMDIR's records point at, and a SkippedFile for each that is not there."""
    root = dicomdir.parent
    found: list[Path] = []
    missing: list[SkippedFile] = []
    for record in _get(ds, "DirectoryRecordSequence", []):
        file_id = _get(record, "ReferencedFileID")
        if not file_id:
            continue
        parts = [file_id] if isinstance(file_id, str) else [str(p) for p in file_id]
        target = _find_case_insensitive(root, parts)
        if target is None:
            missing.append(SkippedFile(root.joinpath(*parts), f"listed in DICOMDIR {dicomdir} but the file is missing"))
        elif not inside(target, root):
            missing.append(SkippedFile(target, f"DICOMDIR {dicomdir} points outside its own folder; not read"))
        else:
            found.append(target)
    return found, missing


def _find_case_insensitive(root: Path, parts: list[str]) -> Path | None:
    """File IDs are upper case, but media copied to case-sensitive file systems often is not."""
    if any(path_problem(part) or part in ("", ".", "..") for part in parts):
        return None
    current = root
    for part in parts:
        exact = current / part
        if exact.exists():
            current = exact
            continue
        try:
            current = next(c for c in current.iterdir() if c.name.upper() == part.upper())
        except (StopIteration, OSError):
            return None
    return current if current.is_file() else None


def _images_from_dataset(path: Path, ds: Dataset) -> list[_Image]:
    _check_is_grayscale_image(ds)
    header = _header(ds)
    _check_declared_size(ds)
    stored = _decode(ds)
    multi_frame = "NumberOfFrames" in ds
    frames = stored.reshape((-1, *stored.shape[-2:]))
    return [_image(path, ds, header, frames[i], i if multi_frame else None) for i in range(frames.shape[0])]


def _check_is_grayscale_image(ds: Dataset) -> None:
    sop_class = _get(ds, "SOPClassUID")
    if sop_class in _NOT_IMAGES:
        raise _Skip(f"{_NOT_IMAGES[sop_class]}; not loaded")
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise _Skip(_no_pixel_data_reason(ds))
    samples = _int(_get(ds, "SamplesPerPixel", 1))
    photometric = str(_get(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if samples != 1 or photometric not in _GRAYSCALE:
        raise _Skip(
            f"colour image (PhotometricInterpretation {photometric}, {samples} samples per pixel); "
            "only single-channel grayscale images are loaded"
        )


def _check_declared_size(ds: Dataset) -> None:
    """Refuse, before decoding, an image whose header declares more pixels than any CT holds."""
    rows, columns = _int(_get(ds, "Rows")), _int(_get(ds, "Columns"))
    frames = _int(_get(ds, "NumberOfFrames", 1)) or 1
    bits = _int(_get(ds, "BitsAllocated", 16)) or 16
    if not (rows and columns and rows > 0 and columns > 0 and frames > 0 and 0 < bits <= 64):
        raise _Skip(f"the header declares an impossible image: Rows {rows}, Columns {columns}, "
                    f"NumberOfFrames {frames}, BitsAllocated {bits}")
    try:
        require_image_sides(None, rows, columns)
    except KlviewerInputError as exc:
        raise _Skip(exc.problem) from exc
    declared = rows * columns * frames * max(bits, 8) // 8
    if declared > MAX_ARRAY_BYTES:
        raise _Skip(f"the header declares {frames} frame(s) of {columns}x{rows} pixels, {declared} bytes, over the "
                    f"{MAX_ARRAY_BYTES} limit")


def _no_pixel_data_reason(ds: Dataset) -> str:
    """Tell a header-only object from a damaged image: pydicom drops what a truncated file cut off."""
    if "Rows" in ds:
        return (
            f"no pixel data: the header declares a {_get(ds, 'Columns')}x{_get(ds, 'Rows')} image but the Pixel Data "
            "element is missing or cut off (truncated file?)"
        )
    if "SOPClassUID" in ds:
        return "no pixel data"
    announced = getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
    if isinstance(announced, UID) and announced:
        return f"no pixel data: the file announces a {announced.name} object but its data could not be read (truncated file?)"
    return "no pixel data: not a valid DICOM dataset (no SOP Class UID, no image attributes; corrupt?)"


def _decode(ds: Dataset) -> np.ndarray:
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise arbitrary types
        name = syntax.name if isinstance(syntax, UID) else "unknown transfer syntax"
        raise _Skip(f"cannot decode pixel data ({name}): {type(exc).__name__}: {exc}") from exc


def _header(ds: Dataset) -> _Header:
    patient_name = str(_get(ds, "PatientName", "") or "")
    sop_class = str(_get(ds, "SOPClassUID", "") or "")
    return _Header(
        patient_id=str(_get(ds, "PatientID", "") or "") or patient_name or "UNKNOWN",
        patient_name=patient_name,
        study_uid=str(_get(ds, "StudyInstanceUID", "") or ""),
        study_description=str(_get(ds, "StudyDescription", "") or ""),
        study_date=str(_get(ds, "StudyDate", "") or ""),
        series_uid=str(_get(ds, "SeriesInstanceUID", "") or ""),
        series_description=str(_get(ds, "SeriesDescription", "") or ""),
        series_number=_int(_get(ds, "SeriesNumber")),
        modality=str(_get(ds, "Modality", "") or "") or ("CT" if "CT Image" in UID(sop_class).name else "OT"),
        frame_of_reference_uid=str(_get(ds, "FrameOfReferenceUID", "") or "") or None,
        sop_instance_uid=str(_get(ds, "SOPInstanceUID", "") or ""),
        sop_class_uid=sop_class,
        instance_number=_int(_get(ds, "InstanceNumber")),
    )


def _image(path: Path, ds: Dataset, header: _Header, stored: np.ndarray, frame: int | None) -> _Image:
    index = frame or 0
    transform = _functional_item(ds, index, "PixelValueTransformationSequence")
    rescale = transform if transform is not None and "RescaleSlope" in transform else ds
    center = _first(_frame_attr(ds, index, "FrameVOILUTSequence", "WindowCenter"))
    width = _first(_frame_attr(ds, index, "FrameVOILUTSequence", "WindowWidth"))
    spacing = _floats(_frame_attr(ds, index, "PixelMeasuresSequence", "PixelSpacing"), 2)
    position = _floats(_frame_attr(ds, index, "PlanePositionSequence", "ImagePositionPatient"), 3)
    hu = np.ascontiguousarray(apply_modality_lut(stored, rescale), dtype=np.float32)
    try:
        require_plausible_hu(None, hu, "pixel values (after RescaleSlope/RescaleIntercept)")
    except KlviewerInputError as exc:
        raise _Skip(exc.problem) from exc
    return _Image(
        path=path,
        header=header,
        hu=hu,
        frame=frame,
        position=cast("tuple[float, float, float] | None", position),
        orientation=_floats(_frame_attr(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
        pixel_spacing=cast("tuple[float, float] | None", spacing),
        slice_thickness=_float(_frame_attr(ds, index, "PixelMeasuresSequence", "SliceThickness")),
        window=(center, width) if center is not None and width is not None and width > 0 else None,
        stack_position=_int(_frame_attr(ds, index, "FrameContentSequence", "InStackPositionNumber")),
    )


def _functional_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The functional-group macro item that applies to `frame`: per-frame first, then shared."""
    for groups, index in (
        (_get(ds, "PerFrameFunctionalGroupsSequence"), frame),
        (_get(ds, "SharedFunctionalGroupsSequence"), 0),
    ):
        if groups and index < len(groups):
            items = _get(groups[index], sequence)
            if items:
                return items[0]
    return None


def _frame_attr(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """An attribute from the enhanced (functional group) location, else from the top level."""
    item = _functional_item(ds, frame, sequence)
    if item is not None and keyword in item:
        return _get(item, keyword)
    return _get(ds, keyword)


def _first(value: Any) -> float | None:
    """The first of a multi-valued number (WindowCenter 40\\450 -> 40), or the single value."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else None
    return _float(value)


def _float(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if np.isfinite(result) else None


def _int(value: Any) -> int | None:
    number = _float(value)
    return None if number is None else int(number)


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


# --- building the catalog ---------------------------------------------------------------------


def _build_catalog(images: list[_Image], skipped: list[SkippedFile]) -> Catalog:
    by_series: dict[tuple[str, str, str], list[_Image]] = defaultdict(list)
    for image in images:
        h = image.header
        series_key = h.series_uid or f"no SeriesInstanceUID, folder {image.path.parent}"
        by_series[(h.patient_id, h.study_uid, series_key)].append(image)

    patients: dict[str, Patient] = {}
    studies: dict[tuple[str, str], Study] = {}
    for (patient_id, study_uid, series_key), members in by_series.items():
        series = _build_series(series_key, members, skipped)
        first = members[0].header
        patient = patients.setdefault(patient_id, Patient(patient_id=patient_id, name=first.patient_name))
        study = studies.get((patient_id, study_uid))
        if study is None:
            study = Study(uid=study_uid, description=first.study_description, date=first.study_date)
            studies[(patient_id, study_uid)] = study
            patient.studies.append(study)
        study.series.append(series)

    for study in studies.values():
        study.series.sort(key=lambda s: (s.number is None, s.number or 0, s.description, s.uid))
    for patient in patients.values():
        patient.studies.sort(key=lambda s: (s.date, s.uid))
    return Catalog(patients=sorted(patients.values(), key=lambda p: p.patient_id), skipped=skipped)


def _build_series(uid: str, members: list[_Image], skipped: list[SkippedFile]) -> Series:
    members = _drop_copies(members, skipped)
    members = _keep_majority_size(members, skipped)
    ordered, warnings = _order(members)
    if not members[0].header.series_uid:
        warnings.insert(0, "files have no SeriesInstanceUID; grouped by folder")
    first = ordered[0]
    return Series(
        uid=uid,
        modality=first.header.modality,
        source_kind="dicom",
        description=first.header.series_description,
        number=first.header.series_number,
        slices=[_slice(image) for image in ordered],
        pixel_spacing_mm=first.pixel_spacing,
        slice_thickness_mm=first.slice_thickness,
        window=next((image.window for image in ordered if image.window is not None), None),
        frame_of_reference_uid=first.header.frame_of_reference_uid,
        orientation=cast("tuple[float, float, float, float, float, float] | None", first.orientation)
        if _geometry_problem(members)[1] is not None else None,
        files=list(dict.fromkeys(image.path for image in ordered)),
        warnings=warnings,
    )


def _slice(image: _Image) -> Slice:
    return Slice(
        hu=image.hu,
        source=image.path,
        position=image.position,
        instance_number=image.header.instance_number,
        sop_instance_uid=image.header.sop_instance_uid or None,
        sop_class_uid=image.header.sop_class_uid or None,
        frame=image.frame,
    )


def _drop_copies(members: list[_Image], skipped: list[SkippedFile]) -> list[_Image]:
    """A second file with the same SOPInstanceUID (and frame) is a copy, not another slice."""
    first_seen: dict[tuple[str, int | None], Path] = {}
    kept: list[_Image] = []
    for image in members:
        uid = image.header.sop_instance_uid
        original = first_seen.setdefault((uid, image.frame), image.path) if uid else image.path
        if original == image.path:
            kept.append(image)
        else:
            _skip_once(skipped, image.path, f"duplicate of {original} (same SOPInstanceUID {uid})")
    return kept


def _keep_majority_size(members: list[_Image], skipped: list[SkippedFile]) -> list[_Image]:
    sizes = Counter(image.hu.shape for image in members)
    if len(sizes) == 1:
        return members
    keep = max(sizes, key=lambda shape: (sizes[shape], shape[0] * shape[1]))
    for image in members:
        if image.hu.shape != keep:
            _skip_once(
                skipped,
                image.path,
                f"image size {_size(image.hu.shape)} differs from the {_size(keep)} of most images in series "
                f"{image.header.series_uid}; kept the {_size(keep)} images",
            )
    return [image for image in members if image.hu.shape == keep]


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


def _skip_once(skipped: list[SkippedFile], path: Path, reason: str) -> None:
    # Multi-frame files produce one _Image per frame; the user needs the file named once.
    if not any(s.path == path and s.reason == reason for s in skipped):
        skipped.append(SkippedFile(path, reason))


# --- ordering ---------------------------------------------------------------------------------


def _order(members: list[_Image]) -> tuple[list[_Image], list[str]]:
    """Slices in display order, and the warnings that ordering produced."""
    if len(members) == 1:
        return members, []
    problem, normal = _geometry_problem(members)
    if normal is None:
        ordered = sorted(members, key=_instance_key)
        return ordered, [f"slice positions unusable ({problem}); slices ordered by InstanceNumber"]
    distance = {id(image): float(np.dot(normal, image.position)) for image in members}  # type: ignore[arg-type]  # _geometry_problem checked positions
    ordered = sorted(members, key=lambda image: (distance[id(image)], _instance_key(image)))
    return ordered, _spacing_warnings([distance[id(image)] for image in ordered])


def _geometry_problem(members: list[_Image]) -> tuple[str, np.ndarray | None]:
    """(why positions cannot order the slices, None) or ("", the unit slice normal)."""
    missing = sum(1 for image in members if image.position is None or image.orientation is None)
    if missing:
        return f"{missing} of {len(members)} slices lack ImagePositionPatient/ImageOrientationPatient", None
    orientations = np.array([image.orientation for image in members])
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOL:
        return "slices have different ImageOrientationPatient", None
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    length = float(np.linalg.norm(normal))
    if length < 0.5:
        return "ImageOrientationPatient rows and columns are not orthogonal unit vectors", None
    return "", normal / length


def _instance_key(image: _Image) -> tuple[bool, int, int, str]:
    number = image.header.instance_number
    within_file = image.stack_position if image.stack_position is not None else (image.frame or 0)
    return (number is None, number or 0, within_file, str(image.path))


def _spacing_warnings(distances: list[float]) -> list[str]:
    gaps = np.diff(distances)
    warnings: list[str] = []
    repeats = int(np.sum(gaps < _POSITION_TOL_MM))
    if repeats:
        warnings.append(f"{repeats} slice(s) share a position with another slice; all were kept")
    steps = gaps[gaps >= _POSITION_TOL_MM]
    if steps.size and steps.max() - steps.min() > _SPACING_VARIATION * steps.min():
        warnings.append(
            f"slice spacing is not uniform ({steps.min():.3g} to {steps.max():.3g} mm); slices may be missing"
        )
    return warnings
