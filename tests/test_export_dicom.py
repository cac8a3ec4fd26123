"""Exported DICOM objects read back with pydicom and highdicom, carry the right numbers and references,
and are pseudonymised consistently under de-identification."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from export_fixtures import ResultsFixture, make_results, threshold_between

from klviewer.export import export_results
from klviewer.export.dicom_objects import DicomSkip, load_sources
from klviewer.export.geometry import to_source_grid
from klviewer.results.reader import read_results
from klviewer.results.slice_file import load_slice_result


@pytest.fixture(scope="module")
def fx(tiny_prior: Path, tmp_path_factory: pytest.TempPathFactory) -> ResultsFixture:
    return make_results(tmp_path_factory.mktemp("export-dicom"), tiny_prior)


@pytest.fixture(scope="module")
def threshold(fx: ResultsFixture) -> float:
    return threshold_between([r["score"] for r in fx.summary["rows"] if r["source_kind"] == "dicom"])


@pytest.fixture(scope="module")
def exported(fx: ResultsFixture, threshold: float, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("exports") / "plain"
    return export_results(fx.results, out, flagged_only=False, formats=("dicom", "csv"), flag_threshold=threshold)


def _rows(fx: ResultsFixture, case: str) -> list[dict]:
    return [r for r in fx.summary["rows"] if r["case"] == case]


def _expected_map(fx: ResultsFixture, row: dict, shape: tuple[int, int]) -> np.ndarray:
    result = load_slice_result(fx.results / row["file"])
    return to_source_grid(result.kl_map.to_pixels().astype(np.float32), result.grid_for(shape))


def test_parametric_map_reads_back_on_the_source_grid(fx: ResultsFixture, exported) -> None:
    case = "S002-abdomen"
    rows = _rows(fx, case)
    sources = [pydicom.dcmread(r["source_file"]) for r in rows]
    path = exported.out / case / "dicom" / "parametric_map.dcm"
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(path))
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert (pm.Rows, pm.Columns) == (40, 48) == (sources[0].Rows, sources[0].Columns)
    assert pm.StudyInstanceUID == sources[0].StudyInstanceUID and pm.PatientID == "P-111"
    assert pm.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    referenced = pm.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == rows[0]["series_uid"]
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {r["sop_instance_uid"] for r in rows}

    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "{nat}"
    assert (mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept) == (1.0, 0.0)
    values = pm.get_pixels_by_source_instance([r["sop_instance_uid"] for r in rows])
    for frame, row in zip(values, rows):
        # Nearest placement keeps every patch value, so the frame's maximum is the slice's score.
        assert frame.max() == pytest.approx(row["score"], rel=1e-5)
        np.testing.assert_allclose(frame, _expected_map(fx, row, (40, 48)), rtol=1e-6)


def test_segmentation_marks_the_patches_above_the_threshold(fx: ResultsFixture, exported, threshold: float) -> None:
    case = "S002-abdomen"
    rows = _rows(fx, case)
    seg = hd.seg.segread(exported.out / case / "dicom" / "segmentation.dcm")
    assert seg.SegmentationType == "BINARY" and seg.get_segment_numbers() == [1]
    description = seg.get_segment_description(1)
    assert description.segment_label == "KL above threshold"
    assert description.algorithm_identification[0].AlgorithmName == "klviewer KLIP"
    masks = seg.get_pixels_by_source_instance([r["sop_instance_uid"] for r in rows],
                                              assert_missing_frames_are_empty=True)[..., 0]
    for mask, row in zip(masks, rows):
        expected = _expected_map(fx, row, (40, 48)) > threshold
        np.testing.assert_array_equal(mask.astype(bool), expected)
    assert masks.any(), "the top slice is above the threshold, so some patch is"


def _pictured(rows: list[dict], threshold: float) -> list[dict]:
    """Slices that get pictures: the flagged ones, or the top-scoring one when none is."""
    return [r for r in rows if r["score"] > threshold] or [max(rows, key=lambda r: r["score"])]


def test_secondary_captures_read_back_and_reference_their_source(fx: ResultsFixture, exported, threshold: float) -> None:
    for case in ("S002-abdomen", "S003-abdomen_late", "S004-chest"):
        rows = _rows(fx, case)
        pictured = _pictured(rows, threshold)
        made = sorted(p.name for p in (exported.out / case / "dicom").glob("secondary_capture_*.dcm"))
        assert made == [f"secondary_capture_{r['slice_index']:04d}.dcm" for r in pictured]
        for row in pictured:
            path = exported.out / case / "dicom" / f"secondary_capture_{row['slice_index']:04d}.dcm"
            ds = pydicom.dcmread(path)
            image = hd.imread(path)
            assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
            assert image.pixel_array.ndim == 3 and image.pixel_array.shape[2] == 3
            assert ds.PhotometricInterpretation == "RGB" and ds.BurnedInAnnotation == "YES"
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == row["sop_instance_uid"]
            source = pydicom.dcmread(row["source_file"])
            assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
            assert list(ds.PatientOrientation) == ["L", "P"]
            # Nothing but the colour bar and caption differ in colour from grey: the overlay is there.
            pixels = ds.pixel_array.astype(int)
            assert (np.ptp(pixels, axis=2) > 30).any()


def test_every_exported_dicom_file_reads_back(fx: ResultsFixture, exported, threshold: float) -> None:
    files = [p for case in exported.cases for p in case.files if p.suffix == ".dcm"]
    dicom_rows = [r for r in fx.summary["rows"] if r["source_kind"] == "dicom"]
    cases = {r["case"] for r in dicom_rows}
    above = {r["case"] for r in dicom_rows if r["score"] > threshold}
    pictured = sum(len(_pictured(_rows(fx, c), threshold)) for c in cases)
    # Secondary Captures of the pictured slices, one Parametric Map per case, a Segmentation where a patch is flagged
    assert len(files) == pictured + len(cases) + len(above)
    for path in files:
        ds = pydicom.dcmread(path)
        image = hd.imread(path)
        assert image.SOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_array_sources_are_skipped_with_a_reason(exported) -> None:
    by_case = {c.case: c for c in exported.cases}
    arrays = by_case["stack.npy"]
    assert arrays.error is None and not any(p.suffix == ".dcm" for p in arrays.files)
    assert any("array image" in reason for reason in arrays.skipped)
    assert not (exported.out / "stack.npy" / "dicom").exists()
    with open(exported.out / "cases.csv") as f:
        table = {row["case"]: row for row in csv.DictReader(f)}
    assert "array image" in table["stack.npy"]["skipped"]


def test_cases_below_the_threshold_get_no_segmentation(fx: ResultsFixture, exported, threshold: float) -> None:
    below = [c for c in exported.cases if c.case.startswith("S0") and max(r["score"] for r in _rows(fx, c.case)) <= threshold]
    assert below, "the threshold splits the DICOM cases"
    for case in below:
        assert not (case.folder / "dicom" / "segmentation.dcm").exists()
        assert any("no patch above the flag threshold" in s for s in case.skipped)
        assert (case.folder / "dicom" / "parametric_map.dcm").is_file()


def _all_values(ds: pydicom.Dataset) -> str:
    text: list[str] = []
    ds.walk(lambda _d, elem: text.append(str(elem.value)) if elem.VR not in ("OB", "OW", "OF", "OD", "UN") else None)
    return " ".join(text)


def test_deidentified_export_is_consistent_per_patient(fx: ResultsFixture, threshold: float, tmp_path: Path) -> None:
    report = export_results(fx.results, tmp_path / "anon", flagged_only=False, formats=("dicom", "csv", "pdf"),
                            flag_threshold=threshold, deidentify=True)
    assert not report.failed
    by_case = {c.case: c for c in report.cases}
    identity = {}
    for case in ("S002-abdomen", "S003-abdomen_late", "S004-chest"):
        source = pydicom.dcmread(_rows(fx, case)[0]["source_file"])
        for path in by_case[case].files:
            if path.suffix != ".dcm":
                continue
            ds = pydicom.dcmread(path)
            hd.imread(path)
            assert ds.PatientIdentityRemoved == "YES"
            text = _all_values(ds)
            for secret in ("Doe", "Jane", "Roe", "P-111", "P-222", source.StudyInstanceUID, source.SeriesInstanceUID,
                           source.SOPInstanceUID, source.FrameOfReferenceUID):
                assert secret not in text, f"{secret} leaked into {path.name}"
            shift = (dt.date.fromisoformat(_iso(source.StudyDate)) - dt.date.fromisoformat(_iso(ds.StudyDate))).days
            identity.setdefault(case, set()).add((str(ds.PatientName), ds.PatientID, ds.StudyInstanceUID, shift))
    assert all(len(v) == 1 for v in identity.values()), "one identity per case across PM, SEG and SC"
    jane_a, jane_b, john = (identity[c].pop() for c in ("S002-abdomen", "S003-abdomen_late", "S004-chest"))
    assert jane_a[:2] == jane_b[:2] and jane_a[3] == jane_b[3] > 0, "same patient, same pseudonym and date shift"
    assert jane_a[1] != john[1] and jane_a[1].startswith("ANON-")
    assert jane_a[2] != jane_b[2], "each source study keeps its own (replaced) study UID"

    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(by_case["S002-abdomen"].folder / "dicom" / "parametric_map.dcm"))
    sc = pydicom.dcmread(by_case["S002-abdomen"].folder / "dicom" / "secondary_capture_0000.dcm")
    referenced = {i.ReferencedSOPInstanceUID for i in pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in referenced, "references agree after UID replacement"

    tables = (report.out / "cases.csv").read_text() + (report.out / "cases.json").read_text()
    for secret in ("Doe", "P-111", "P-222", str(fx.sources)):
        assert secret not in tables
    doc = json.loads((report.out / "cases.json").read_text())
    assert doc["deidentified"] is True
    assert {c["patient"].split(" ")[0] for c in doc["cases"] if c["source_kind"] == "dicom"} == {"ANONYMOUS^0001", "ANONYMOUS^0002"}


def _iso(date: str) -> str:
    return f"{date[:4]}-{date[4:6]}-{date[6:]}"


def test_sources_that_cannot_be_referenced_are_explained(fx: ResultsFixture, tmp_path: Path) -> None:
    import dataclasses

    entry = read_results(fx.results).case("S004-chest").slices[0]
    assert len(load_sources([entry], pixels=False)) == 1
    cases = [
        ({"source_kind": "sinogram"}, "sinogram"),
        ({"source_kind": None}, "older klviewer"),
        ({"source_file": str(tmp_path / "gone.dcm")}, "not found"),
        ({"sop_instance_uid": "1.2.3"}, "not the analysed 1.2.3"),
        ({"source_file": str(fx.results / "summary.json")}, "cannot read source file"),
    ]
    for change, reason in cases:
        with pytest.raises(DicomSkip, match=reason):
            load_sources([dataclasses.replace(entry, **change)], pixels=False)
    other = read_results(fx.results).case("S002-abdomen").slices[0]
    with pytest.raises(DicomSkip, match="more than one series"):
        load_sources([entry, other], pixels=False)
    multi = pydicom.dcmread(entry.source_file)
    multi.NumberOfFrames = 2
    multi.save_as(tmp_path / "multi.dcm")
    with pytest.raises(DicomSkip, match="multi-frame"):
        load_sources([dataclasses.replace(entry, source_file=str(tmp_path / "multi.dcm"))], pixels=False)


def test_pseudonymizer_rewrites_a_copy_consistently() -> None:
    import random

    from pydicom.dataset import Dataset

    from klviewer.export.deidentify import Pseudonymizer

    def patient(pid: str, name: str) -> Dataset:
        ds = Dataset()
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = pid, name, "19700101"
        ds.StudyDate, ds.AcquisitionDateTime = "20240301", "20240301101500.5"
        ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.StudyInstanceUID = "1.2.3.4"
        ds.OperatorsName = "Tech^Tom"
        ds.InstitutionName = "St. Elsewhere"
        ds.AccessionNumber = "ACC9"
        ds.add_new(0x00091001, "LO", "private secret")
        ds.StudyDescription, ds.SeriesDescription, ds.ProtocolName = "Jane's scan", "Doe follow-up", "P1 protocol"
        ds.add_new(0x60000022, "LO", "overlay note with a name")
        item = Dataset()
        item.ReferencedSOPInstanceUID = "1.2.3.4.5"
        item.PerformingPhysicianName = "Doc^Dan"
        ds.ReferencedImageSequence = [item]
        return ds

    pseudonyms = Pseudonymizer(random.Random(0))
    original = patient("P1", "Doe^Jane")
    a, b, c = pseudonyms.apply(original), pseudonyms.apply(patient("P1", "DOE^JANE")), pseudonyms.apply(patient("P2", "Roe^John"))
    assert original.PatientName == "Doe^Jane" and original.StudyInstanceUID == "1.2.3.4", "the source is untouched"
    assert (a.PatientID, str(a.PatientName)) == (b.PatientID, str(b.PatientName)) == ("ANON-0001", "ANONYMOUS^0001")
    assert c.PatientID == "ANON-0002"
    shift = (dt.date(2024, 3, 1) - dt.date.fromisoformat(_iso(a.StudyDate))).days
    assert 31 <= shift <= 3650 and a.StudyDate == b.StudyDate

    class Smallest(random.Random):  # the shortest shift the pseudonymizer may draw
        def randint(self, a: int, b: int) -> int:
            return a

    shortest = Pseudonymizer(Smallest()).pseudonym("P1", "Doe^Jane").day_shift
    for last_day in ("2024-01-31", "2024-02-29", "2024-03-31", "2024-12-31"):
        moved = dt.date.fromisoformat(last_day) - dt.timedelta(days=shortest)
        assert moved.strftime("%Y-%m") != last_day[:7], "not even the month of the real date survives"
    assert a.PatientBirthDate == "", "PS3.15 Annex E empties the birth date (Z) even when other dates are shifted"
    assert a.AcquisitionDateTime == a.StudyDate + "101500.5"
    assert a.StudyInstanceUID == b.StudyInstanceUID != "1.2.3.4"
    assert a.ReferencedImageSequence[0].ReferencedSOPInstanceUID not in ("1.2.3.4.5", a.StudyInstanceUID)
    assert a.SOPClassUID == pydicom.uid.CTImageStorage, "registered UIDs are kept"
    assert "OperatorsName" not in a and a.ReferencedImageSequence[0].PerformingPhysicianName == ""
    assert "InstitutionName" not in a and a.AccessionNumber == "" and 0x00091001 not in a
    assert not any(k in a for k in ("StudyDescription", "SeriesDescription", "ProtocolName")) and 0x60000022 not in a
    assert a.PatientIdentityRemoved == "YES" and len(a.DeidentificationMethod) <= 64
    assert [i.CodeValue for i in a.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    made = Dataset()
    made.StudyDate, made.ContentDate, made.PatientID = a.StudyDate, "20240305", a.PatientID
    pseudonyms.shift_new_dates(made, a)
    assert made.StudyDate == a.StudyDate, "a date copied from the de-identified source is not shifted twice"
    assert (dt.date(2024, 3, 5) - dt.date.fromisoformat(_iso(made.ContentDate))).days == shift, "a date it made is"
