"""DICOM RT Structure Sets: named contours (ROIs), rasterised onto a CT series' pixel grid.

An RTSTRUCT holds, per ROI, planar polygons in patient coordinates (mm). `roi_masks` turns one
ROI into a boolean volume on the referenced series' grid, using the series' slice positions,
orientation and pixel spacing.

Decisions worth knowing:
- A polygon lands on the slice its ContourImageSequence names (ReferencedSOPInstanceUID) or,
  when it names none, on the slice whose plane it lies in. A polygon off every slice plane by
  more than a quarter of the slice spacing, or naming a slice the series does not hold, is an
  error: moving an expert outline silently would corrupt a ground truth.
- A pixel is inside when its centre is (even-odd rule; a centre on a polygon's left or top edge
  counts in, on its right or bottom edge out), so abutting polygons never share a pixel.
  Polygons of one ROI on the same slice combine by XOR, which is how structure sets encode holes.
- Only CLOSED_PLANAR contours enclose an area; POINT and OPEN_* contours are kept on the ROI but
  add nothing to its mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import RTStructureSetStorage

from klviewer.errors import KlviewerInputError
from klviewer.io.dicom import sniff_dicom
from klviewer.io.study import Series

MAX_RTSTRUCT_BYTES = 256 << 20
MAX_CONTOUR_POINTS = 10_000_000
CLOSED_PLANAR = "CLOSED_PLANAR"
# Fraction of the slice spacing a contour may sit off its slice's plane (DS values carry ~6 digits).
PLANE_TOLERANCE = 0.25


@dataclass(frozen=True)
class Contour:
    """One polygon: (N, 3) points in patient coordinates (mm), in drawing order."""

    points_mm: np.ndarray
    geometric_type: str
    referenced_sop_instance_uid: str | None = None


@dataclass
class Roi:
    """One structure of a structure set, with every contour drawn for it."""

    number: int
    name: str
    source: Path
    contours: list[Contour] = field(default_factory=list)
    interpreted_type: str = ""
    """RTROIInterpretedType (GTV, ORGAN, EXTERNAL, ...), empty when the file gives none."""
    frame_of_reference_uid: str | None = None
    referenced_series_uid: str | None = None


def read_rtstruct(path: str | Path) -> list[Roi]:
    """Every ROI of an RT Structure Set file, in the file's order of StructureSetROISequence."""
    path = Path(path)
    ds = _read_dataset(path)
    series_by_frame = _referenced_series(ds)
    rois: dict[int, Roi] = {}
    for item in ds.get("StructureSetROISequence", []):
        number = _roi_number(path, item.get("ROINumber"))
        frame = str(item.get("ReferencedFrameOfReferenceUID", "") or "") or None
        only_series = next(iter(series_by_frame.values())) if len(series_by_frame) == 1 else None
        rois[number] = Roi(
            number=number,
            name=str(item.get("ROIName", "") or f"ROI {number}"),
            source=path,
            frame_of_reference_uid=frame,
            referenced_series_uid=series_by_frame.get(frame or "", only_series),
        )
    for item in ds.get("RTROIObservationsSequence", []):
        roi = rois.get(_roi_number(path, item.get("ReferencedROINumber")))
        if roi is not None:
            roi.interpreted_type = str(item.get("RTROIInterpretedType", "") or "")
    total_points = 0
    for item in ds.get("ROIContourSequence", []):
        number = _roi_number(path, item.get("ReferencedROINumber"))
        if number not in rois:
            raise KlviewerInputError(path, f"ROIContourSequence refers to ROI {number}, which StructureSetROISequence does not define")
        for contour_item in item.get("ContourSequence", []):
            contour = _contour(path, rois[number].name, contour_item)
            total_points += len(contour.points_mm)
            if total_points > MAX_CONTOUR_POINTS:
                raise KlviewerInputError(path, f"structure set holds more than {MAX_CONTOUR_POINTS} contour points")
            rois[number].contours.append(contour)
    return list(rois.values())


def _read_dataset(path: Path) -> Dataset:
    reason, force = sniff_dicom(path)
    if reason is not None:
        raise KlviewerInputError(path, reason)
    size = path.stat().st_size
    if size > MAX_RTSTRUCT_BYTES:
        raise KlviewerInputError(path, f"file is {size} bytes, over the {MAX_RTSTRUCT_BYTES} allowed for a structure set")
    try:
        ds = pydicom.dcmread(path, force=force)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise KlviewerInputError(path, f"unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    sop_class = ds.get("SOPClassUID") or getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
    if sop_class != RTStructureSetStorage:
        name = sop_class.name if isinstance(sop_class, pydicom.uid.UID) else "no SOP class"
        raise KlviewerInputError(path, f"not an RT Structure Set ({name})")
    return ds


def _referenced_series(ds: Dataset) -> dict[str, str]:
    """Frame of reference UID -> the first CT series the structure set says it was drawn on."""
    found: dict[str, str] = {}
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                uid = str(series.get("SeriesInstanceUID", "") or "")
                if uid:
                    found.setdefault(str(frame.get("FrameOfReferenceUID", "") or ""), uid)
    return found


def _roi_number(path: Path, value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise KlviewerInputError(path, f"ROI number {value!r} is not an integer") from None


def _contour(path: Path, roi_name: str, item: Dataset) -> Contour:
    data = item.get("ContourData")
    try:
        values = np.array([float(v) for v in (data or [])], dtype=np.float64)
    except (TypeError, ValueError):
        raise KlviewerInputError(path, f"ROI '{roi_name}': ContourData holds values that are not numbers") from None
    if values.size == 0 or values.size % 3 or not np.isfinite(values).all():
        raise KlviewerInputError(
            path, f"ROI '{roi_name}': ContourData must be x, y, z triples of finite numbers, found {values.size} values"
        )
    points = values.reshape(-1, 3)
    declared = item.get("NumberOfContourPoints")
    if declared is not None and int(declared) != len(points):
        raise KlviewerInputError(
            path, f"ROI '{roi_name}': NumberOfContourPoints is {int(declared)} but ContourData holds {len(points)} points"
        )
    kind = str(item.get("ContourGeometricType", "") or CLOSED_PLANAR).upper()
    if kind == CLOSED_PLANAR and len(points) < 3:
        raise KlviewerInputError(path, f"ROI '{roi_name}': a closed contour has {len(points)} point(s); it needs at least 3")
    images = item.get("ContourImageSequence") or []
    uid = str(images[0].get("ReferencedSOPInstanceUID", "") or "") if images else ""
    return Contour(points_mm=points, geometric_type=kind, referenced_sop_instance_uid=uid or None)


def roi_masks(roi: Roi, series: Series) -> np.ndarray:
    """The ROI as a boolean volume (n_slices, H, W) on `series`' pixel grid, in its slice order."""
    normal, row_dir, col_dir = _axes(roi, series)
    spacing_row, spacing_col = series.pixel_spacing_mm  # type: ignore[misc]  # _axes checked it
    origins = np.array([s.position for s in series.slices], dtype=np.float64)
    distances = origins @ normal
    tolerance = PLANE_TOLERANCE * _slice_spacing(series, distances)
    by_uid = {s.sop_instance_uid: k for k, s in enumerate(series.slices) if s.sop_instance_uid}
    masks = np.zeros((series.n_slices, *series.image_shape), dtype=bool)
    for contour in roi.contours:
        if contour.geometric_type != CLOSED_PLANAR:
            continue
        k = _slice_of(roi, contour, contour.points_mm @ normal, distances, by_uid, tolerance)
        offset = contour.points_mm - origins[k]
        rows = offset @ col_dir / spacing_row
        cols = offset @ row_dir / spacing_col
        masks[k] ^= polygon_mask(rows, cols, series.image_shape)
    return masks


def _axes(roi: Roi, series: Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit slice normal, row direction and column direction; refuses a series without geometry."""
    where = f"ROI '{roi.name}' onto series '{series.description or series.uid}'"
    if series.sinogram is not None or not series.slices:
        raise KlviewerInputError(roi.source, f"cannot place {where}: the series has no images")
    if (roi.frame_of_reference_uid and series.frame_of_reference_uid
            and roi.frame_of_reference_uid != series.frame_of_reference_uid):
        raise KlviewerInputError(
            roi.source, f"cannot place {where}: the ROI's frame of reference {roi.frame_of_reference_uid} "
            f"is not the series' {series.frame_of_reference_uid}"
        )
    missing = sum(1 for s in series.slices if s.position is None)
    if series.orientation is None or series.pixel_spacing_mm is None or missing:
        raise KlviewerInputError(
            roi.source, f"cannot place {where}: the series lacks slice orientation, pixel spacing or "
            f"positions ({missing} of {series.n_slices} slices have none)"
        )
    return _directions(series.orientation)


def _directions(orientation: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit slice normal, row direction, column direction) from ImageOrientationPatient."""
    row_dir = np.array(orientation[:3], dtype=np.float64)
    col_dir = np.array(orientation[3:], dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    return normal / np.linalg.norm(normal), row_dir, col_dir


def _slice_spacing(series: Series, distances: np.ndarray) -> float:
    gaps = np.diff(np.sort(distances))
    gaps = gaps[gaps > 1e-3]
    if gaps.size:
        return float(gaps.min())
    return series.slice_thickness_mm or 1.0


def _slice_of(
    roi: Roi, contour: Contour, along_normal: np.ndarray, distances: np.ndarray, by_uid: dict[str, int], tolerance: float
) -> int:
    """The index of the slice a contour lies on; refuses contours that lie on none."""
    level = float(along_normal.mean())
    if float(np.ptp(along_normal)) > 2 * tolerance:
        raise KlviewerInputError(
            roi.source, f"ROI '{roi.name}': a contour spans {np.ptp(along_normal):.2f} mm across the slice planes; "
            "it is not parallel to the series' slices"
        )
    uid = contour.referenced_sop_instance_uid
    if uid is not None and uid in by_uid:
        k = by_uid[uid]
    elif uid is not None:
        raise KlviewerInputError(roi.source, f"ROI '{roi.name}': a contour references slice {uid}, which the series does not hold")
    else:
        k = int(np.argmin(np.abs(distances - level)))
    if abs(distances[k] - level) > tolerance:
        raise KlviewerInputError(
            roi.source, f"ROI '{roi.name}': a contour at {level:.2f} mm along the slice normal lies on no slice of the series "
            f"(nearest slice at {distances[k]:.2f} mm)"
        )
    return k


def polygon_mask(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels of an (H, W) grid whose centre lies inside the closed polygon (rows[i], cols[i]).

    Scanline fill with the even-odd rule. An edge counts for the scanline through pixel centres
    at row r when min(r0, r1) <= r < max(r0, r1), so horizontal edges never count and a vertex
    on the scanline counts once; along the scanline a centre c is inside when a <= c < b.
    """
    height, width = shape
    mask = np.zeros(shape, dtype=bool)
    r0, c0 = np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64)
    r1, c1 = np.roll(r0, -1), np.roll(c0, -1)
    low, high = np.minimum(r0, r1), np.maximum(r0, r1)
    for r in range(max(0, math.ceil(r0.min())), min(height - 1, math.floor(r0.max())) + 1):
        crossing = (low <= r) & (r < high)
        xs = np.sort(c0[crossing] + (r - r0[crossing]) * (c1[crossing] - c0[crossing]) / (r1[crossing] - r0[crossing]))
        for a, b in zip(xs[0::2], xs[1::2]):
            start, stop = max(0, math.ceil(a)), min(width, math.ceil(b))
            if start < stop:
                mask[r, start:stop] = True
    return mask


def mask_volume_ml(mask: np.ndarray, series: Series) -> float:
    """The volume of a boolean mask on `series`' grid in millilitres (voxel = pixel area x slice spacing)."""
    if series.pixel_spacing_mm is None:
        raise KlviewerInputError(None, f"series '{series.description or series.uid}' has no pixel spacing")
    positions = [s.position for s in series.slices]
    if series.orientation is not None and all(p is not None for p in positions):
        step = _slice_spacing(series, np.array(positions, dtype=np.float64) @ _directions(series.orientation)[0])
    else:
        step = series.slice_thickness_mm or 1.0
    voxel_mm3 = series.pixel_spacing_mm[0] * series.pixel_spacing_mm[1] * step
    return float(mask.sum()) * voxel_mm3 / 1000.0
