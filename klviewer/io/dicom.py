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

import os
from collections import Counter, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    MediaStorageDirectoryStorage,
    ParametricMapStorage,
    RTDoseStorage,
    RTStructureSetStorage,
    SegmentationStorage,
    UID,
)

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


class _Skip(Exception):
    """A file cannot be used; the message is the reason the user sees."""


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
            skipped.append(SkippedFile(path, f"unexpected error reading DICOM: {type(exc).__name__}: {exc}"))
    return _build_catalog(images, skipped)


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
    force = _sniff(path)
    try:
        return pydicom.dcmread(path, force=force)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise _Skip(f"unreadable DICOM file ({type(exc).__name__}: {exc})") from exc


def sniff_dicom(path: Path) -> tuple[str | None, bool]:
    """(why the file is not DICOM, or None; whether pydicom must read it with force=True).

    Reads 132 bytes. Files with the 'DICM' marker read normally. Old files without a preamble
    start directly with a group 0002 or 0008 element; anything else is not DICOM, and forcing
    it would parse noise.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError as exc:
        return f"cannot open file ({exc.strerror or exc})", False
    if len(head) == 132 and head[128:] == b"DICM":
        return None, False
    if head[:2] in (b"\x02\x00", b"\x08\x00"):
        return None, True
    return ("not a DICOM file (no 'DICM' marker and no DICOM header)" if head else "empty file"), False


def _sniff(path: Path) -> bool:
    """Whether the file must be read with force=True; raises _Skip when it is not DICOM at all."""
    reason, force = sniff_dicom(path)
    if reason is not None:
        raise _Skip(reason)
    return force


def _is_dicomdir(path: Path, ds: Dataset) -> bool:
    sop_class = getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
    return path.name.upper() == "DICOMDIR" or sop_class == MediaStorageDirectoryStorage


def _dicomdir_references(dicomdir: Path, ds: Dataset) -> tuple[list[Path], list[SkippedFile]]:
    """Files a DICOMDIR's records point at, and a SkippedFile for each that is not there."""
    root = dicomdir.parent
    found: list[Path] = []
    missing: list[SkippedFile] = []
    for record in ds.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        parts = [file_id] if isinstance(file_id, str) else [str(p) for p in file_id]
        target = _find_case_insensitive(root, parts)
        if target is None:
            missing.append(SkippedFile(root.joinpath(*parts), f"listed in DICOMDIR {dicomdir} but the file is missing"))
        elif not target.resolve().is_relative_to(root.resolve()):
            missing.append(SkippedFile(target, f"DICOMDIR {dicomdir} points outside its own folder; not read"))
        else:
            found.append(target)
    return found, missing


def _find_case_insensitive(root: Path, parts: list[str]) -> Path | None:
    """File IDs are upper case, but media copied to case-sensitive file systems often is not."""
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
    stored = _decode(ds)
    multi_frame = "NumberOfFrames" in ds
    frames = stored.reshape((-1, *stored.shape[-2:]))
    return [_image(path, ds, header, frames[i], i if multi_frame else None) for i in range(frames.shape[0])]


def _check_is_grayscale_image(ds: Dataset) -> None:
    sop_class = ds.get("SOPClassUID")
    if sop_class in _NOT_IMAGES:
        raise _Skip(f"{_NOT_IMAGES[sop_class]}; not loaded")
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise _Skip(_no_pixel_data_reason(ds))
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if samples != 1 or photometric not in _GRAYSCALE:
        raise _Skip(
            f"colour image (PhotometricInterpretation {photometric}, {samples} samples per pixel); "
            "only single-channel grayscale images are loaded"
        )


def _no_pixel_data_reason(ds: Dataset) -> str:
    """Tell a header-only object from a damaged image: pydicom drops what a truncated file cut off."""
    if "Rows" in ds:
        return (
            f"no pixel data: the header declares a {ds.get('Columns')}x{ds.Rows} image but the Pixel Data "
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
    patient_name = str(ds.get("PatientName", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    return _Header(
        patient_id=str(ds.get("PatientID", "") or "") or patient_name or "UNKNOWN",
        patient_name=patient_name,
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        series_number=_int(ds.get("SeriesNumber")),
        modality=str(ds.get("Modality", "") or "") or ("CT" if "CT Image" in UID(sop_class).name else "OT"),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or "") or None,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        sop_class_uid=sop_class,
        instance_number=_int(ds.get("InstanceNumber")),
    )


def _image(path: Path, ds: Dataset, header: _Header, stored: np.ndarray, frame: int | None) -> _Image:
    index = frame or 0
    transform = _functional_item(ds, index, "PixelValueTransformationSequence")
    rescale = transform if transform is not None and "RescaleSlope" in transform else ds
    center = _first(_frame_attr(ds, index, "FrameVOILUTSequence", "WindowCenter"))
    width = _first(_frame_attr(ds, index, "FrameVOILUTSequence", "WindowWidth"))
    spacing = _floats(_frame_attr(ds, index, "PixelMeasuresSequence", "PixelSpacing"), 2)
    position = _floats(_frame_attr(ds, index, "PlanePositionSequence", "ImagePositionPatient"), 3)
    return _Image(
        path=path,
        header=header,
        hu=np.ascontiguousarray(apply_modality_lut(stored, rescale), dtype=np.float32),
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
        (ds.get("PerFrameFunctionalGroupsSequence"), frame),
        (ds.get("SharedFunctionalGroupsSequence"), 0),
    ):
        if groups and index < len(groups):
            items = groups[index].get(sequence)
            if items:
                return items[0]
    return None


def _frame_attr(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """An attribute from the enhanced (functional group) location, else from the top level."""
    item = _functional_item(ds, frame, sequence)
    if item is not None and keyword in item:
        return item.get(keyword)
    return ds.get(keyword)


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
