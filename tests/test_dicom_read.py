"""The DICOM reader on real CT files shipped in pydicom / pydicom-data, and on synthetic series."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

from dicom_fixtures import ct_dataset, save
from klviewer.io.dicom import read_dicom_files
from klviewer.io.study import Catalog, Series


def data_file(name: str) -> Path:
    return Path(get_testdata_file(name, read=False))


def only_series(catalog: Catalog) -> Series:
    series = catalog.all_series()
    assert len(series) == 1, catalog
    return series[0]


def test_ct_small_values_and_metadata() -> None:
    path = data_file("CT_small.dcm")
    catalog = read_dicom_files([path])
    assert catalog.skipped == []
    ds = pydicom.dcmread(path)
    patient = catalog.patients[0]
    study = patient.studies[0]
    series = only_series(catalog)
    assert (patient.patient_id, patient.name) == (ds.PatientID, str(ds.PatientName))
    assert study.uid == ds.StudyInstanceUID and study.date == ds.StudyDate
    assert series.uid == ds.SeriesInstanceUID and series.modality == "CT" and series.source_kind == "dicom"
    assert series.image_shape == (128, 128)
    assert series.pixel_spacing_mm == pytest.approx((0.661468, 0.661468))
    assert series.slice_thickness_mm == pytest.approx(5.0)
    assert series.window is None  # CT_small has no WindowCenter/Width
    assert series.frame_of_reference_uid == ds.FrameOfReferenceUID
    assert series.hu_range() == (-896.0, 1167.0)
    assert series.analysis_refusal() is None
    (slice_,) = series.slices
    assert slice_.hu.dtype == np.float32
    # Slope 1, intercept -1024, signed stored values.
    np.testing.assert_array_equal(slice_.hu, ds.pixel_array.astype(np.float32) - 1024)
    assert slice_.source == path and slice_.frame is None
    assert slice_.sop_instance_uid == ds.SOPInstanceUID and slice_.sop_class_uid == ds.SOPClassUID
    assert slice_.instance_number == 1
    assert slice_.position == pytest.approx((-158.135803, -179.035797, -75.699997))


def test_693_uncompressed_head_ct() -> None:
    series = only_series(read_dicom_files([data_file("693_UNCR.dcm")]))
    assert series.image_shape == (512, 512)
    assert series.hu_range() == (-3024.0, 1468.0)
    assert series.pixel_spacing_mm == pytest.approx((0.478516, 0.478516))
    assert series.window == (40.0, 100.0)
    assert series.slices[0].instance_number == 21


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # bad_sequence.dcm has hashed UIDs
@pytest.mark.parametrize(
    ("name", "syntax", "hu_range", "window"),
    [
        ("bad_sequence.dcm", "1.2.840.10008.1.2.4.70", (-1011.0, 1243.0), (40.0, 350.0)),  # JPEG lossless, SV1
        ("J2K_pixelrep_mismatch.dcm", "1.2.840.10008.1.2.4.90", (-2000.0, 1896.0), (40.0, 100.0)),  # J2K lossless
        ("explicit_VR-UN.dcm", "1.2.840.10008.1.2.4.90", (-1024.0, 1186.0), None),
    ],
)
def test_compressed_ct(name: str, syntax: str, hu_range: tuple[float, float], window: tuple[float, float] | None) -> None:
    path = data_file(name)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    series = only_series(read_dicom_files([path]))
    assert series.image_shape == (512, 512)
    assert series.hu_range() == hu_range
    # Multi-valued WindowCenter/Width (bad_sequence, J2K_pixelrep_mismatch) give their first value.
    assert series.window == window


def test_j2k_lossless_decodes_to_the_uncompressed_pixels() -> None:
    # 693_J2KR and 693_UNCR are the same instance; read separately, or the copy rule drops one.
    uncompressed = only_series(read_dicom_files([data_file("693_UNCR.dcm")])).volume()
    j2k = only_series(read_dicom_files([data_file("693_J2KR.dcm")])).volume()
    np.testing.assert_array_equal(j2k, uncompressed)


def test_rle_compressed_copy_matches_original(tmp_path: Path) -> None:
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.compress(RLELossless)
    rle_path = tmp_path / "ct_small_rle.dcm"
    ds.save_as(rle_path)
    assert pydicom.dcmread(rle_path, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLELossless
    original = only_series(read_dicom_files([data_file("CT_small.dcm")])).volume()
    np.testing.assert_array_equal(only_series(read_dicom_files([rle_path])).volume(), original)


def test_enhanced_ct_frames_use_functional_groups() -> None:
    path = data_file("eCT_Supplemental.dcm")
    series = only_series(read_dicom_files([path]))
    stored = pydicom.dcmread(path).pixel_array
    assert series.n_slices == 2 and series.image_shape == (512, 512)
    assert series.files == [path]
    # Rescale (-1024), spacing, thickness and window live only in SharedFunctionalGroupsSequence.
    assert series.pixel_spacing_mm == pytest.approx((0.388672, 0.388672))
    assert series.slice_thickness_mm == pytest.approx(10.0)
    assert series.window == (49.0, 102.0)
    # Orientation -1\0\0\0\1\0 has normal -z: ascending along it puts z = -149 (frame 1) first.
    assert [s.frame for s in series.slices] == [1, 0]
    assert [s.position for s in series.slices] == [(99.5, -301.5, -149.0), (99.5, -301.5, -159.0)]
    for slice_ in series.slices:
        np.testing.assert_array_equal(slice_.hu, stored[slice_.frame].astype(np.float32) - 1024)
    assert series.hu_range() == (-1024.0, 172.0)
    assert series.warnings == []


def test_mr_loads_for_viewing_but_is_not_analysable() -> None:
    series = only_series(read_dicom_files([data_file("MR_small.dcm")]))
    assert series.modality == "MR" and series.image_shape == (64, 64)
    assert series.hu_range() == (127.0, 2145.0)  # no rescale: stored values as they are
    assert "MR" in (series.analysis_refusal() or "")


def test_segmentation_and_colour_images_are_skipped_with_reasons() -> None:
    catalog = read_dicom_files([data_file("liver.dcm"), data_file("SC_rgb.dcm"), data_file("CT_small.dcm")])
    assert len(catalog.all_series()) == 1
    reasons = {s.path.name: s.reason for s in catalog.skipped}
    assert "Segmentation" in reasons["liver.dcm"]
    assert "colour image" in reasons["SC_rgb.dcm"] and "RGB" in reasons["SC_rgb.dcm"]


# --- DICOMDIR ----------------------------------------------------------------------------------

DICOMDIR = data_file("DICOMDIR")
# (modality, number of images) of every series the dicomdirtests DICOMDIR lists, per patient.
EXPECTED_SERIES = {
    "77654033": sorted([("CT", 4), ("CR", 1), ("CR", 1), ("CR", 1)]),
    "98890234": sorted([("CT", 2), ("CT", 5)] + [("MR", 1)] * 4 + [("MR", 3)] * 2 + [("MR", 7)]),
}


def series_summary(catalog: Catalog) -> dict[str, list[tuple[str, int]]]:
    return {
        p.patient_id: sorted((se.modality, se.n_slices) for st in p.studies for se in st.series)
        for p in catalog.patients
    }


def test_dicomdir_groups_patients_studies_series() -> None:
    catalog = read_dicom_files([DICOMDIR])
    assert catalog.skipped == []
    assert series_summary(catalog) == EXPECTED_SERIES
    assert [len(p.studies) for p in catalog.patients] == [2, 4]
    ct_study = next(st for st in catalog.patients[0].studies if st.series[0].modality == "CT")
    assert ct_study.description == "CT, HEAD/BRAIN WO CONTRAST" and ct_study.date == "19950903"
    by_number = {se.number: se for p in catalog.patients for st in p.studies for se in st.series if se.modality == "CT"}
    smart_score = by_number[5]
    assert smart_score.description == "SmartScore - Gated 0.5 sec"
    # Instances 6..10 run from z = 8.76 down to -1.24; the series is ordered by z ascending.
    assert [s.instance_number for s in smart_score.slices] == [10, 9, 8, 7, 6]
    assert smart_score.warnings == []
    # A two-image scout with a sagittal and a coronal image cannot be ordered geometrically.
    assert any("InstanceNumber" in w for w in by_number[4].warnings)
    # Routine Brain jumps from z = -99 to 103: flagged as non-uniform spacing.
    assert any("not uniform" in w for w in by_number[2].warnings)


def test_dicomdir_and_listed_files_are_read_once() -> None:
    folder = DICOMDIR.parent
    everything = sorted(p for p in folder.rglob("*") if p.is_file())  # all DICOMDIR variants too
    catalog = read_dicom_files(everything)
    assert series_summary(catalog) == EXPECTED_SERIES
    reasons = {str(s.path.relative_to(folder)): s.reason for s in catalog.skipped}
    tiny_alpha = [r for p, r in reasons.items() if p.startswith("TINY_ALPHA/PT000000")]
    assert len(tiny_alpha) == 50 and set(tiny_alpha) == {"no pixel data"}
    assert "not a DICOM file" in reasons["README.txt"]
    assert reasons["DICOMDIR-empty.dcm"] == "DICOMDIR references no files"


def test_tiny_alpha_dicomdir_has_no_pixel_data() -> None:
    catalog = read_dicom_files([DICOMDIR.parent / "TINY_ALPHA" / "DICOMDIR"])
    assert catalog.all_series() == []
    assert len(catalog.skipped) == 50
    assert {s.reason for s in catalog.skipped} == {"no pixel data"}


def test_dicomdir_missing_and_lowercase_references(tmp_path: Path) -> None:
    copy = tmp_path / "media"
    shutil.copytree(DICOMDIR.parent, copy, ignore=shutil.ignore_patterns("TINY_ALPHA", "DICOMDIR-*"))
    (copy / "77654033" / "CT2" / "17106").unlink()
    # Media copied to case-sensitive file systems often arrive in lower case.
    (copy / "98892001").rename(copy / "98892001-tmp")
    (copy / "98892001-tmp").rename(copy / "98892001".lower())
    (copy / "98892003" / "MR700").rename(copy / "98892003" / "mr700")
    catalog = read_dicom_files([copy / "DICOMDIR"])
    assert len(catalog.skipped) == 1
    assert catalog.skipped[0].path == copy / "77654033" / "CT2" / "17106"
    assert "missing" in catalog.skipped[0].reason and "DICOMDIR" in catalog.skipped[0].reason
    summary = series_summary(catalog)
    assert summary["77654033"] == sorted([("CT", 3), ("CR", 1), ("CR", 1), ("CR", 1)])
    assert summary["98890234"] == EXPECTED_SERIES["98890234"]


# --- ordering ----------------------------------------------------------------------------------


def write_series(folder: Path, zs: list[float], numbers: list[int | None], **kwargs: object) -> list[Path]:
    paths = []
    for i, (z, number) in enumerate(zip(zs, numbers)):
        stored = np.full((8, 8), 1024 + int(round(z * 10)), dtype=np.int16)
        paths.append(save(ct_dataset(stored, instance_number=number, position=(0.0, 0.0, z), **kwargs), folder / f"f{i}.dcm"))
    return paths


def test_shuffled_series_is_ordered_along_the_normal(tmp_path: Path) -> None:
    zs = [float(z) for z in range(-10, 10, 2)]
    # InstanceNumbers disagree with the geometry, so only position-based ordering passes.
    numbers = list(range(len(zs), 0, -1))
    paths = write_series(tmp_path, zs, numbers)
    random.Random(3).shuffle(paths)
    series = only_series(read_dicom_files(paths))
    assert [s.position[2] for s in series.slices] == zs  # type: ignore[index]
    assert [float(s.hu[0, 0]) for s in series.slices] == [z * 10 for z in zs]
    assert series.warnings == []
    assert series.pixel_spacing_mm == (0.5, 0.75) and series.slice_thickness_mm == 2.0


def test_sagittal_series_is_ordered_by_its_own_normal(tmp_path: Path) -> None:
    # Rows along +y, columns along -z: the normal is -x, so ascending order means decreasing x.
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    xs = [3.0, -1.0, 7.0, 1.0]
    paths = []
    for i, x in enumerate(xs):
        ds = ct_dataset(np.zeros((4, 4), np.int16), instance_number=i + 1, position=(x, 0.0, 0.0), orientation=sagittal)
        paths.append(save(ds, tmp_path / f"s{i}.dcm"))
    series = only_series(read_dicom_files(paths))
    assert [s.position[0] for s in series.slices] == [7.0, 3.0, 1.0, -1.0]  # type: ignore[index]


def test_missing_positions_fall_back_to_instance_number_with_a_warning(tmp_path: Path) -> None:
    paths = write_series(tmp_path, [0.0, 5.0, 10.0, 15.0], [3, 1, 4, 2])
    ds = pydicom.dcmread(paths[2])
    del ds.ImagePositionPatient
    ds.save_as(paths[2])
    series = only_series(read_dicom_files(paths))
    assert [s.instance_number for s in series.slices] == [1, 2, 3, 4]
    assert len(series.warnings) == 1
    assert "InstanceNumber" in series.warnings[0] and "1 of 4 slices lack ImagePositionPatient" in series.warnings[0]


def test_rescale_slope_and_unsigned_storage(tmp_path: Path) -> None:
    stored = np.array([[0, 1, 4095, 2048]], dtype=np.uint16)
    path = save(ct_dataset(stored, slope=0.5, intercept=-1000.25, unsigned=True, bits_stored=12), tmp_path / "u.dcm")
    hu = only_series(read_dicom_files([path])).slices[0].hu
    np.testing.assert_array_equal(hu, np.array([[-1000.25, -999.75, 1047.25, 23.75]], dtype=np.float32))


def test_signed_12_bit_values_keep_their_sign(tmp_path: Path) -> None:
    # Bits stored 12 of 16: -1 is 0x0FFF in the low bits, and the decoder must sign-extend it.
    stored = np.array([[0x0FFF, 0x0800, 0x07FF, 0]], dtype=np.uint16).view(np.int16)
    path = save(ct_dataset(stored, slope=1.0, intercept=0.0, bits_stored=12), tmp_path / "s.dcm")
    hu = only_series(read_dicom_files([path])).slices[0].hu
    np.testing.assert_array_equal(hu, np.array([[-1, -2048, 2047, 0]], dtype=np.float32))
