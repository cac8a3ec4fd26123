"""Write an HU volume as a CT Image Storage series (one file per slice), e.g. phantoms.

Files are explicit VR little endian with int16 pixels and RescaleSlope 1, so integer HU
round-trip exactly. Non-integer HU are rounded to the nearest integer (half to even): CT
stores integers, and a fraction of a HU is far below CT noise.

Geometry: axial slices (ImageOrientationPatient 1\\0\\0\\0\\1\\0), centred on x = y = 0, the
k-th slice at z = k * slice_thickness_mm, so reading the files back keeps the array order.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid
from pydicom.valuerep import DSfloat

from klviewer import __version__
from klviewer.errors import OVERWRITE_HINT, KlviewerInputError
from klviewer.io.safe_write import atomic_write

_INT16 = np.iinfo(np.int16)
# The usual CT convention (stored = HU + 1024); another intercept is used only when the HU
# range would not fit in int16 with it.
_DEFAULT_INTERCEPT = -1024


def write_ct_series(
    volume_hu: np.ndarray,
    out_dir: Path,
    *,
    pixel_spacing_mm: float | tuple[float, float],
    slice_thickness_mm: float,
    patient_id: str,
    patient_name: str,
    study_description: str,
    series_description: str,
    window: tuple[float, float] = (40, 400),
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    image_comments: Sequence[str] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write `volume_hu` ((S, H, W) or (H, W), HU) as IM0001.dcm ... in `out_dir`; return the paths.

    `pixel_spacing_mm` is one value or (row, column) spacing. `window` is (center, width) in HU.
    Refuses (KlviewerInputError) to replace existing files unless `overwrite` is True; each file
    appears complete or not at all.
    """
    out_dir = Path(out_dir)
    stored, intercept = _to_stored(volume_hu)
    spacing = _spacing_pair(pixel_spacing_mm)
    _require_positive("slice_thickness_mm", slice_thickness_mm)
    _require_positive("window width", window[1])
    comments = _comments(image_comments, stored.shape[0])
    paths = _target_paths(out_dir, stored.shape[0], overwrite)

    now = dt.datetime.now()
    shared = _series_dataset(
        patient_id=patient_id,
        patient_name=patient_name,
        study_description=study_description,
        series_description=series_description,
        study_uid=study_uid or generate_uid(),
        series_uid=series_uid or generate_uid(),
        series_number=series_number,
        spacing=spacing,
        slice_thickness_mm=slice_thickness_mm,
        window=window,
        intercept=intercept,
        now=now,
    )
    origin = (-spacing[1] * (stored.shape[2] - 1) / 2, -spacing[0] * (stored.shape[1] - 1) / 2)
    for index, path in enumerate(paths):
        ds = _slice_dataset(shared, stored[index], index, origin, slice_thickness_mm, comments[index])
        atomic_write(path, lambda handle, ds=ds: _save(ds, handle), overwrite=overwrite)
    return paths


def _to_stored(volume_hu: np.ndarray) -> tuple[np.ndarray, int]:
    """int16 stored values and the RescaleIntercept that maps them back to the (rounded) HU."""
    volume = np.asarray(volume_hu)
    if volume.ndim == 2:
        volume = volume[None]
    if volume.ndim != 3 or volume.size == 0:
        raise KlviewerInputError(None, f"volume must be (S, H, W) or (H, W) and non-empty, got shape {volume.shape}")
    if volume.dtype.kind not in "iuf":
        raise KlviewerInputError(None, f"volume dtype {volume.dtype} is not numeric")
    if not np.all(np.isfinite(volume)):
        raise KlviewerInputError(None, "volume contains NaN or infinite values")
    hu = np.rint(volume.astype(np.float64))
    low, high = float(hu.min()), float(hu.max())
    if high - low > _INT16.max - _INT16.min:
        raise KlviewerInputError(None, f"HU range {low:.0f}..{high:.0f} is wider than 16-bit storage allows")
    intercept = _DEFAULT_INTERCEPT
    if low - intercept < _INT16.min or high - intercept > _INT16.max:
        intercept = int(low) - int(_INT16.min)
    return (hu - intercept).astype(np.int16), intercept


def _spacing_pair(pixel_spacing_mm: float | tuple[float, float]) -> tuple[float, float]:
    pair = (pixel_spacing_mm, pixel_spacing_mm) if np.isscalar(pixel_spacing_mm) else tuple(pixel_spacing_mm)  # type: ignore[arg-type]
    if len(pair) != 2:
        raise KlviewerInputError(None, f"pixel_spacing_mm must be one value or (row, column), got {pixel_spacing_mm!r}")
    for value in pair:
        _require_positive("pixel_spacing_mm", value)
    return float(pair[0]), float(pair[1])


def _require_positive(name: str, value: float) -> None:
    if not (np.isfinite(value) and value > 0):
        raise KlviewerInputError(None, f"{name} must be a positive number, got {value!r}")


def _comments(image_comments: Sequence[str] | None, n_slices: int) -> list[str | None]:
    if image_comments is None:
        return [None] * n_slices
    if isinstance(image_comments, str) or len(image_comments) != n_slices:
        raise KlviewerInputError(None, f"image_comments must be a sequence of {n_slices} strings, one per slice")
    return list(image_comments)


def _target_paths(out_dir: Path, n_slices: int, overwrite: bool) -> list[Path]:
    """IM0001.dcm ...; checked before anything is written so a refusal leaves no partial series."""
    if out_dir.exists() and not out_dir.is_dir():
        raise KlviewerInputError(out_dir, "is not a folder")
    digits = max(4, len(str(n_slices)))
    paths = [out_dir / f"IM{i + 1:0{digits}d}.dcm" for i in range(n_slices)]
    if not overwrite:
        existing = next((p for p in paths if p.exists()), None)
        if existing is not None:
            raise KlviewerInputError(existing, f"already exists; {OVERWRITE_HINT}")
    return paths


def _ds(value: float) -> DSfloat:
    # DS holds at most 16 characters; auto_format picks the most precise form that fits.
    return DSfloat(value, auto_format=True)


def _series_dataset(
    *,
    patient_id: str,
    patient_name: str,
    study_description: str,
    series_description: str,
    study_uid: str,
    series_uid: str,
    series_number: int,
    spacing: tuple[float, float],
    slice_thickness_mm: float,
    window: tuple[float, float],
    intercept: int,
    now: dt.datetime,
) -> Dataset:
    """The attributes every slice of the series shares."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    # Patient and study modules; empty values are the DICOM way to say "unknown" for type 2.
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    # General Series: Laterality is Type 2C (empty: no paired organ is imaged as such), PatientPosition
    # Type 2C for CT; head first supine is what the axial orientation written below assumes.
    ds.Laterality = ""
    ds.PatientPosition = "HFS"
    ds.AcquisitionNumber = 1  # CT Image module, Type 2: the whole series is one acquisition
    ds.Manufacturer = "klviewer"
    ds.SoftwareVersions = __version__
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.KVP = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [_ds(spacing[0]), _ds(spacing[1])]
    ds.SliceThickness = _ds(slice_thickness_mm)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = _ds(window[0])
    ds.WindowWidth = _ds(window[1])
    return ds


def _slice_dataset(
    shared: Dataset,
    stored: np.ndarray,
    index: int,
    origin: tuple[float, float],
    slice_thickness_mm: float,
    comment: str | None,
) -> Dataset:
    ds = Dataset()
    ds.update(shared)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = index + 1
    z = index * slice_thickness_mm
    ds.ImagePositionPatient = [_ds(origin[0]), _ds(origin[1]), _ds(z)]
    ds.SliceLocation = _ds(z)
    if comment is not None:
        ds.ImageComments = comment
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = np.ascontiguousarray(stored, dtype="<i2").tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"KLVIEWER_{__version__}"[:16]
    ds.file_meta = meta
    return ds


def _save(ds: Dataset, handle: BinaryIO) -> None:
    ds.save_as(handle, enforce_file_format=True)
