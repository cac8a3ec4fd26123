"""Small synthetic DICOM files for reader tests, built directly with pydicom (not klviewer's writer)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

STUDY_UID = "1.2.826.0.1.3680043.8.498.100"
SERIES_UID = "1.2.826.0.1.3680043.8.498.101"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def ct_dataset(
    stored: np.ndarray,
    *,
    instance_number: int | None = 1,
    position: Sequence[float] | None = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | None = AXIAL,
    series_uid: str = SERIES_UID,
    sop_uid: str | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    unsigned: bool = False,
    bits_stored: int = 16,
) -> Dataset:
    """A single-frame CT image whose pixels are `stored` (before the rescale)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.PatientID = "SYN1"
    ds.PatientName = "Synthetic^Case"
    ds.StudyInstanceUID = STUDY_UID
    ds.StudyDescription = "synthetic study"
    ds.StudyDate = "20240102"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = "synthetic series"
    ds.SeriesNumber = 3
    ds.Modality = "CT"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.102"
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    if position is not None:
        ds.ImagePositionPatient = list(position)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.5, 0.75]
    ds.SliceThickness = 2.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0 if unsigned else 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2" if unsigned else "<i2").tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    """Write `ds` as a DICOM file (explicit VR little endian) with a matching file meta header."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", MediaStorageDirectoryStorage)
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dicomdir(file_ids: Sequence[Sequence[str]]) -> Dataset:
    """A minimal DICOMDIR dataset: one IMAGE record per referenced file ID."""
    ds = Dataset()
    ds.FileSetID = "TEST"
    records = []
    for parts in file_ids:
        record = Dataset()
        record.DirectoryRecordType = "IMAGE"
        record.ReferencedFileID = list(parts)
        records.append(record)
    ds.DirectoryRecordSequence = records
    return ds


def folder_state(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under `folder`, to prove reading changed nothing."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
