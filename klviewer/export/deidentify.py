"""De-identifying the source DICOM headers that exported objects copy their patient data from.

The rules follow DICOM PS3.15 Annex E, the Basic Application Level Confidentiality Profile, with
the "Retain Longitudinal Temporal Information with Modified Dates" option (dates are shifted, not
removed, so intervals survive). docs/export.md lists how each action of Table E.1-1 is applied.

De-identification is applied to a copy of each source dataset *before* the export objects are
built from it, so every exported object (Parametric Map, Segmentation, Secondary Capture, and the
de-identified copies of the source slices exported beside them) inherits the same pseudonym,
shifted dates and replaced UIDs, and their references to the source images stay consistent.

Within one export (one `Pseudonymizer`):
- a patient (by PatientID, or by name when the ID is empty) gets one pseudonym ANON-0001, ...;
- all of that patient's dates are moved back by the same random number of days (31 to 3650, so
  always into an earlier month),
  including the dates the export objects carry of their own making (ContentDate,
  InstanceCreationDate, ...), so none of them is the real date;
- every instance UID (study, series, instance, frame of reference, and every reference to them)
  is replaced by a new random one, the same original always by the same replacement; registered
  UIDs (SOP classes, transfer syntaxes, coding schemes) are kept;
- other person names are emptied; the attributes the profile removes (X), empties (Z) or replaces
  (D) are removed, emptied or replaced; private groups, overlays and curves are removed.

The UID map and the date shifts are kept in memory only and never written, so the export alone
cannot be re-identified. Burned-in text in source pixels is not inspected: the profile's Clean
Pixel Data option is not claimed, and the BurnedInAnnotation of the sources is kept as it is.
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
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, generate_uid

METHOD = "klviewer: PS3.15 E basic profile, dates shifted per patient"
"""DeidentificationMethod (at most 64 characters)."""
PROFILE_CODES = (("113100", "Basic Application Confidentiality Profile"),
                 ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
"""DeidentificationMethodCodeSequence items (DCM, CID 7050)."""

REMOVED = (
    # Table E.1-1 action X (or X/Z, X/D where removal is allowed) on attributes a CT header can carry.
    "AcquisitionComments", "AdditionalPatientHistory", "AdmissionID", "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription", "Allergies", "Arbitrary", "AuthorObserverSequence", "BranchOfService",
    "ConsultingPhysicianName", "ContributionDescription", "CountryOfResidence", "CurrentPatientLocation",
    "CustodialOrganizationSequence", "DerivationDescription", "DeviceSerialNumber", "DigitalSignaturesSequence",
    "DischargeDiagnosisDescription", "EthnicGroup", "FrameComments", "IconImageSequence", "IdentifyingComments",
    "ImageComments", "ImagePresentationComments", "InstitutionAddress", "InstitutionCodeSequence",
    "InstitutionName", "InstitutionalDepartmentName", "InsurancePlanIdentification", "IssuerOfAdmissionID",
    "IssuerOfPatientID", "LastMenstrualDate", "MedicalAlerts", "MedicalRecordLocator", "MilitaryRank",
    "ModifiedAttributesSequence", "NameOfPhysiciansReadingStudy", "Occupation", "OperatorsName",
    "OperatorIdentificationSequence", "OriginalAttributesSequence", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientAddress", "PatientAge", "PatientBirthName", "PatientBirthTime",
    "PatientComments", "PatientInsurancePlanCodeSequence", "PatientMotherBirthName", "PatientReligiousPreference",
    "PatientSexNeutered", "PatientSize", "PatientState", "PatientTelecomInformation", "PatientTelephoneNumbers",
    "PatientTransportArrangements", "PatientWeight", "PerformedLocation", "PerformedProcedureStepDescription",
    "PerformedProcedureStepID", "PerformingPhysicianIdentificationSequence", "PerformingPhysicianName",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
    "PreMedication", "PregnancyStatus", "ProtocolName", "ReasonForStudy", "ReasonForTheRequestedProcedure",
    "ReferencedPatientAliasSequence", "ReferencedPatientPhotoSequence", "ReferencedPatientSequence",
    "ReferencedStudySequence", "ReferringPhysicianAddress", "ReferringPhysicianIdentificationSequence",
    "ReferringPhysicianTelephoneNumbers", "RegionOfResidence", "RequestAttributesSequence",
    "RequestedContrastAgent", "RequestedProcedureDescription", "RequestedProcedureID", "RequestingPhysician",
    "RequestingService", "ResponsibleOrganization", "ResponsiblePerson", "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription", "SeriesDescription", "ServiceEpisodeDescription", "ServiceEpisodeID",
    "SmokingStatus", "SpecialNeeds", "StationName", "StudyComments", "StudyDescription", "TextComments",
    "TopicAuthor", "TopicKeywords", "TopicSubject", "TopicTitle", "VisitComments",
)
EMPTIED = ("AccessionNumber", "StudyID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName",
           "ContentCreatorName", "FillerOrderNumberImagingServiceRequest", "PlacerOrderNumberImagingServiceRequest")
"""Action Z: Type 2 attributes that must stay present, so they are emptied rather than removed."""
_REMOVED_GROUPS = ((0x5000, 0x50FF), (0x6000, 0x60FF))
"""Curves and overlays (action X): they can hold annotations with names and dates."""
_MIN_SHIFT_DAYS = 31
"""A shift of at least 31 days always lands in an earlier month, so not even the month and year of a
real date survive (a shift of a few days kept them, and a byte scan found the real "YYYY-MM")."""
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
                                            self._rng.randint(_MIN_SHIFT_DAYS, _MAX_SHIFT_DAYS))
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
        _remove_groups(ds)
        for keyword in REMOVED:
            if keyword in ds:
                delattr(ds, keyword)
        for keyword in EMPTIED:
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

    def shift_new_dates(self, obj: Dataset, source: Dataset) -> None:
        """Shift the dates an export object made itself (ContentDate, InstanceCreationDate, ...) by
        its patient's shift; `source` is the de-identified dataset it was built from, whose dates
        (already shifted) it may carry too and which are left alone."""
        who = next((p for p in self._patients.values() if p.patient_id == source.get("PatientID")), None)
        if who is None:
            raise ValueError("the source was not de-identified by this Pseudonymizer")
        # Compared as text: highdicom copies dates as DA objects, which do not equal the same date as a str.
        inherited = {e.keyword: str(e.value) for e in source.iterall() if e.VR in ("DA", "DT")}

        def shift(dataset: Dataset, element: DataElement) -> None:
            if element.VR not in ("DA", "DT") or inherited.get(element.keyword) == str(element.value):
                return
            move = _shift_date if element.VR == "DA" else _shift_datetime
            element.value = _map_values(element.value, lambda v: move(v, who.day_shift))

        obj.walk(shift)


def mark_deidentified(ds: Dataset) -> None:
    """The attributes that tell a receiving system this object was de-identified, and how."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    items = []
    for value, meaning in PROFILE_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = DicomSequence(items)


def _remove_groups(ds: Dataset) -> None:
    for tag in [t for t in ds.keys() if any(lo <= t.group <= hi for lo, hi in _REMOVED_GROUPS)]:
        del ds[tag]


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
