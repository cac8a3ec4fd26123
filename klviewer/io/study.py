"""The in-memory study model every loader produces: patient -> study -> series -> slice.

Pixel data is held in Hounsfield units (float32). Sinogram inputs carry their measurement
instead of images; the physics layer turns either into an Acquisition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from klviewer.errors import NotAnalyzableError

SourceKind = Literal["dicom", "array", "sinogram"]


@dataclass
class Slice:
    """One 2-D image in HU, with what is needed to reference its source later."""

    hu: np.ndarray
    source: Path | None = None
    position: tuple[float, float, float] | None = None
    instance_number: int | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    frame: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


@dataclass
class Sinogram:
    """A measured parallel-beam sinogram stack, as line integrals (dimensionless, mu * mm)."""

    line_integrals: np.ndarray
    angles_rad: np.ndarray
    detector_spacing_mm: float
    grid_size: tuple[int, int]
    grid_pixel_spacing_mm: tuple[float, float]
    i0: float | None = None
    counts: np.ndarray | None = None

    @property
    def n_slices(self) -> int:
        return int(self.line_integrals.shape[0])

    @property
    def n_angles(self) -> int:
        return int(self.line_integrals.shape[1])

    @property
    def n_detectors(self) -> int:
        return int(self.line_integrals.shape[2])


@dataclass
class Series:
    uid: str
    modality: str
    source_kind: SourceKind
    description: str = ""
    number: int | None = None
    slices: list[Slice] = field(default_factory=list)
    sinogram: Sinogram | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    slice_thickness_mm: float | None = None
    window: tuple[float, float] | None = None
    """Default (center, width) in HU from the source, when it has one."""
    frame_of_reference_uid: str | None = None
    orientation: tuple[float, float, float, float, float, float] | None = None
    """ImageOrientationPatient shared by the slices (row direction, then column direction), when known."""
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """Non-fatal notes from loading (e.g. slices ordered by InstanceNumber)."""

    @property
    def n_slices(self) -> int:
        return self.sinogram.n_slices if self.sinogram is not None else len(self.slices)

    @property
    def image_shape(self) -> tuple[int, int]:
        if self.sinogram is not None:
            return self.sinogram.grid_size
        return self.slices[0].shape if self.slices else (0, 0)

    def volume(self) -> np.ndarray:
        """The slices stacked as (S, H, W) float32 HU, in display order."""
        if not self.slices:
            raise NotAnalyzableError(None, f"series {self.uid} has no images")
        return np.stack([s.hu for s in self.slices]).astype(np.float32, copy=False)

    def hu_range(self) -> tuple[float, float] | None:
        if not self.slices:
            return None
        return (
            float(min(float(s.hu.min()) for s in self.slices)),
            float(max(float(s.hu.max()) for s in self.slices)),
        )

    def analysis_refusal(self) -> str | None:
        """Why this series cannot be analysed, or None when it can."""
        if self.modality.upper() != "CT":
            return f"modality is {self.modality}; the KL analysis needs CT (HU) data"
        if self.sinogram is None and not self.slices:
            return "the series has no images"
        return None

    def require_analyzable(self) -> None:
        reason = self.analysis_refusal()
        if reason is not None:
            source = self.files[0] if self.files else None
            raise NotAnalyzableError(source, f"series '{self.description or self.uid}': {reason}")


@dataclass
class Study:
    uid: str
    description: str = ""
    date: str = ""
    series: list[Series] = field(default_factory=list)


@dataclass
class Patient:
    patient_id: str
    name: str = ""
    studies: list[Study] = field(default_factory=list)


@dataclass
class SkippedFile:
    path: Path
    reason: str


@dataclass
class Catalog:
    """Everything found under the paths a user opened, plus every file that was skipped and why."""

    patients: list[Patient] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def all_series(self) -> list[Series]:
        return [se for p in self.patients for st in p.studies for se in st.series]

    def merge(self, other: "Catalog") -> None:
        """Add another catalog, joining patients and studies that share identifiers."""
        for patient in other.patients:
            mine = next((p for p in self.patients if p.patient_id == patient.patient_id), None)
            if mine is None:
                self.patients.append(patient)
                continue
            for study in patient.studies:
                my_study = next((s for s in mine.studies if s.uid == study.uid), None)
                if my_study is None:
                    mine.studies.append(study)
                else:
                    my_study.series.extend(study.series)
        self.skipped.extend(other.skipped)
