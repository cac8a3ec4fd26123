"""Pseudonymising the source DICOM headers that exported objects copy their patient data from.

De-identification is applied to a copy of each source dataset *before* the export objects are
built from it, so every exported object (Parametric Map, Segmentation, Secondary Capture)
inherits the same pseudonym, shifted dates and replaced UIDs, and their references to the
source images stay consistent with each other.

Within one export (one `Pseudonymizer`):
- a patient (by PatientID, or by name when the ID is empty) gets one pseudonym ANON-0001, ...;
- all of that patient's dates are moved back by the same random number of days, so intervals
  between studies survive but the real dates do not;
- every instance-specific UID (study, series, instance, frame of reference) is replaced by a
  new one, the same original always by the same replacement;
- other person names are emptied, listed identifying attributes and private tags removed.

The mapping is kept in memory only and never written, so the export alone cannot be
re-identified. Burned-in text in source pixels is not inspected.
"""

from __future__ import annotations

import copy
import datetime as dt
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, generate_uid

METHOD = "klviewer: pseudonym, dates shifted per patient, UIDs replaced"
"""DeidentificationMethod (at most 64 characters)."""

_REMOVED = (
    "OtherPatientIDs", "OtherPatientIDsSequence", "IssuerOfPatientID", "PatientAddress", "PatientTelephoneNumbers",
    "PatientComments", "MedicalRecordLocator", "PatientInsurancePlanCodeSequence", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "ImageComments",
    "RequestAttributesSequence", "ReferencedPatientSequence", "AdmissionID", "CurrentPatientLocation",
    "MilitaryRank", "BranchOfService", "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName",
)
_EMPTIED = ("AccessionNumber", "StudyID")
"""Type 2 attributes: required to be present, so emptied rather than removed."""
_MAX_SHIFT_DAYS = 3650


@dataclass(frozen=True)
class Pseudonym:
    patient_id: str
    patient_name: str
    day_shift: int
    """Days every date of this patient is moved back by."""


class Pseudonymizer:
    """Consistent replacements for one export; pass a seeded `random.Random` for reproducible tests."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or secrets.SystemRandom()
        self._patients: dict[str, Pseudonym] = {}
        self._uids: dict[str, str] = {}

    def pseudonym(self, patient_id: str, patient_name: str) -> Pseudonym:
        key = f"id:{patient_id}" if patient_id else f"name:{patient_name}"
        if key not in self._patients:
            number = len(self._patients) + 1
            self._patients[key] = Pseudonym(f"ANON-{number:04d}", f"ANONYMOUS^{number:04d}",
                                            self._rng.randint(1, _MAX_SHIFT_DAYS))
        return self._patients[key]

    def uid(self, original: str) -> str:
        """The replacement of an instance UID; registered UIDs (SOP classes, transfer syntaxes) are kept."""
        if not original or UID(original).name != original:  # a registered UID has a name
            return original
        if original not in self._uids:
            self._uids[original] = generate_uid()
        return self._uids[original]

    def apply(self, source: Dataset) -> Dataset:
        """A de-identified copy of `source` (which is left untouched)."""
        ds = copy.deepcopy(source)
        who = self.pseudonym(str(ds.get("PatientID", "") or ""), str(ds.get("PatientName", "") or ""))
        ds.remove_private_tags()
        for keyword in _REMOVED:
            if keyword in ds:
                delattr(ds, keyword)
        for keyword in _EMPTIED:
            if keyword in ds:
                setattr(ds, keyword, "")

        def rewrite(dataset: Dataset, element: DataElement) -> None:
            if element.VR == "PN":
                element.value = ""
            elif element.VR == "UI":
                element.value = _map_values(element.value, self.uid)
            elif element.VR == "DA":
                element.value = _map_values(element.value, lambda v: _shift_date(v, who.day_shift))
            elif element.VR == "DT":
                element.value = _map_values(element.value, lambda v: _shift_datetime(v, who.day_shift))

        ds.walk(rewrite)
        if getattr(ds, "file_meta", None) is not None:
            ds.file_meta.walk(rewrite)
        ds.PatientName = who.patient_name
        ds.PatientID = who.patient_id
        mark_deidentified(ds)
        return ds


def mark_deidentified(ds: Dataset) -> None:
    """The attributes that tell a receiving system this object was de-identified."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    ds.LongitudinalTemporalInformationModified = "MODIFIED"


def _map_values(value: Any, fn: Callable[[str], str]) -> Any:
    if value is None or value == "":
        return value
    if isinstance(value, (list, tuple, MultiValue)):
        return [fn(str(v)) for v in value]
    return fn(str(value))


def _shift_date(value: str, days: int) -> str:
    try:
        date = dt.datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    return (date - dt.timedelta(days=days)).strftime("%Y%m%d")


def _shift_datetime(value: str, days: int) -> str:
    text = value.strip()
    shifted = _shift_date(text, days)
    return shifted + text[8:] if shifted else ""
