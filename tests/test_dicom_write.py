"""Writing HU volumes as CT series: exact round trip through the reader, valid files, safe writes."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from klviewer.errors import KlviewerInputError
from klviewer.io.dicom import read_dicom_files
from klviewer.io.dicom_write import write_ct_series

META = dict(
    patient_id="PHANTOM-7",
    patient_name="Phantom^Seven",
    study_description="phantom study",
    series_description="liver lesion variant",
)


def random_volume(shape: tuple[int, ...] = (4, 24, 20), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 3072, size=shape).astype(np.float32)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    volume = random_volume()
    volume[0, 0, :2] = (-1024, 3071)
    paths = write_ct_series(
        volume,
        tmp_path,
        pixel_spacing_mm=(0.7, 0.8),
        slice_thickness_mm=2.5,
        window=(60, 350),
        study_uid="1.2.826.0.1.3680043.8.498.7",
        series_uid="1.2.826.0.1.3680043.8.498.8",
        series_number=12,
        image_comments=[f"slice {i}" for i in range(4)],
        **META,
    )
    assert [p.name for p in paths] == ["IM0001.dcm", "IM0002.dcm", "IM0003.dcm", "IM0004.dcm"]
    assert sorted(tmp_path.iterdir()) == paths  # no temporary files left behind

    catalog = read_dicom_files(list(reversed(paths)))
    assert catalog.skipped == []
    (patient,) = catalog.patients
    (study,) = patient.studies
    (series,) = study.series
    assert (patient.patient_id, patient.name) == ("PHANTOM-7", "Phantom^Seven")
    assert (study.uid, study.description) == ("1.2.826.0.1.3680043.8.498.7", "phantom study")
    assert (series.uid, series.number, series.description) == ("1.2.826.0.1.3680043.8.498.8", 12, "liver lesion variant")
    assert series.modality == "CT" and series.analysis_refusal() is None
    np.testing.assert_array_equal(series.volume(), volume)
    assert series.pixel_spacing_mm == (0.7, 0.8)
    assert series.slice_thickness_mm == 2.5
    assert series.window == (60.0, 350.0)
    assert series.warnings == []
    assert [s.source for s in series.slices] == paths
    assert [s.instance_number for s in series.slices] == [1, 2, 3, 4]
    assert [s.position[2] for s in series.slices] == [0.0, 2.5, 5.0, 7.5]  # type: ignore[index]
    assert len({s.sop_instance_uid for s in series.slices}) == 4
    assert pydicom.dcmread(paths[2]).ImageComments == "slice 2"


def test_files_are_valid_ct_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_ct_series(random_volume((3, 16, 12)), tmp_path, pixel_spacing_mm=0.5, slice_thickness_mm=1.0, **META)
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    datasets = [pydicom.dcmread(p) for p in paths]
    for ds in datasets:
        for element in ds.iterall():  # converting every value raises on any invalid VR value
            _ = element.value
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.BitsStored, ds.PixelRepresentation, ds.RescaleSlope) == (16, 1, 1)
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1

    volume = hd.get_volume_from_series(datasets)
    assert volume.spatial_shape == (3, 16, 12)
    assert volume.spacing == pytest.approx((1.0, 0.5, 0.5))

    # The export code builds SEG / Parametric Maps on top of these files as source images.
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="out of distribution",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    mask = np.zeros((3, 16, 12), dtype=bool)
    mask[1, 4:8, 3:6] = True
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="klviewer",
        manufacturer_model_name="klviewer",
        software_versions="test",
        device_serial_number="0",
    )
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID


def test_non_integer_hu_is_rounded_and_2d_input_writes_one_file(tmp_path: Path) -> None:
    image = np.array([[10.4, -0.6], [2.5, -1023.5]], dtype=np.float64)
    paths = write_ct_series(image, tmp_path, pixel_spacing_mm=1.0, slice_thickness_mm=1.0, **META)
    assert len(paths) == 1
    hu = read_dicom_files(paths).all_series()[0].slices[0].hu
    np.testing.assert_array_equal(hu, [[10, -1], [2, -1024]])  # half to even


def test_range_beyond_the_default_intercept_still_round_trips(tmp_path: Path) -> None:
    volume = np.array([[[-5000, 0], [20000, 27000]]], dtype=np.int32)
    paths = write_ct_series(volume, tmp_path, pixel_spacing_mm=1.0, slice_thickness_mm=1.0, **META)
    np.testing.assert_array_equal(read_dicom_files(paths).all_series()[0].volume(), volume)
    with pytest.raises(KlviewerInputError, match="wider than 16-bit"):
        write_ct_series(np.array([[-40000, 40000]]), tmp_path / "wide", pixel_spacing_mm=1.0, slice_thickness_mm=1.0, **META)


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    first = random_volume((2, 8, 8), seed=1)
    paths = write_ct_series(first, tmp_path, pixel_spacing_mm=1.0, slice_thickness_mm=1.0, **META)
    before = [p.read_bytes() for p in paths]
    second = random_volume((2, 8, 8), seed=2)
    with pytest.raises(KlviewerInputError, match="IM0001.dcm: already exists") as raised:
        write_ct_series(second, tmp_path, pixel_spacing_mm=1.0, slice_thickness_mm=1.0, **META)
    assert raised.value.path == paths[0]
    assert [p.read_bytes() for p in paths] == before
    write_ct_series(second, tmp_path, pixel_spacing_mm=1.0, slice_thickness_mm=1.0, overwrite=True, **META)
    np.testing.assert_array_equal(read_dicom_files(paths).all_series()[0].volume(), second)
    assert sorted(tmp_path.iterdir()) == paths


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fail_on_second(self: pydicom.Dataset, *args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        original_save_as(self, *args, **kwargs)

    original_save_as = pydicom.Dataset.save_as
    monkeypatch.setattr(pydicom.Dataset, "save_as", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        write_ct_series(random_volume((3, 8, 8)), tmp_path, pixel_spacing_mm=1.0, slice_thickness_mm=1.0, **META)
    assert [p.name for p in tmp_path.iterdir()] == ["IM0001.dcm"]


@pytest.mark.parametrize(
    ("volume", "kwargs", "message"),
    [
        (np.full((2, 4, 4), np.nan), {}, "NaN or infinite"),
        (np.zeros((2, 2, 4, 4)), {}, "must be \\(S, H, W\\) or \\(H, W\\)"),
        (np.zeros((2, 4, 4)), {"image_comments": ["only one"]}, "2 strings, one per slice"),
        (np.zeros((2, 4, 4)), {"pixel_spacing_mm": -1.0}, "pixel_spacing_mm must be a positive number"),
        (np.zeros((2, 4, 4)), {"slice_thickness_mm": 0.0}, "slice_thickness_mm must be a positive number"),
        (np.zeros((2, 4, 4)), {"window": (40, 0)}, "window width must be a positive number"),
    ],
)
def test_bad_arguments_are_refused_before_writing(
    tmp_path: Path, volume: np.ndarray, kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"pixel_spacing_mm": 1.0, "slice_thickness_mm": 1.0, **META, **kwargs}
    with pytest.raises(KlviewerInputError, match=message):
        write_ct_series(volume, tmp_path / "out", **arguments)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
