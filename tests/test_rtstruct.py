"""RT Structure Sets: contours rasterise to exact masks on the CT grid; broken references are refused."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath
from pydicom.dataset import Dataset
from pydicom.uid import RTStructureSetStorage, generate_uid

from dicom_fixtures import SERIES_UID, STUDY_UID, ct_dataset, save
from klviewer.io.loader import open_paths
from klviewer.io.rtstruct import mask_volume_ml, polygon_mask, read_rtstruct, roi_masks
from klviewer.io.study import Series
from reader_checks import refusal

FRAME_UID = "1.2.826.0.1.3680043.8.498.102"  # the frame of reference of dicom_fixtures.ct_dataset
ORIGIN = (-10.0, -20.0)  # x, y of every slice's top-left pixel centre (mm)
ROW_MM, COL_MM = 0.5, 0.75  # ct_dataset's PixelSpacing
SHAPE = (48, 40)


def _ct_series(folder: Path, z_positions: Sequence[float] = (0.0, 2.0, 4.0)) -> tuple[Series, list[str]]:
    uids = [generate_uid() for _ in z_positions]
    for k, (z, uid) in enumerate(zip(z_positions, uids)):
        stored = np.full(SHAPE, 1024, dtype=np.int16)
        save(ct_dataset(stored, instance_number=k + 1, position=(*ORIGIN, z), sop_uid=uid), folder / f"ct{k}.dcm")
    return open_paths([folder]).all_series()[0], uids


def _square(r0: float, c0: float, r1: float, c1: float, z: float) -> list[float]:
    """A closed square in patient mm through pixel coordinates (row, col) corners, on plane z."""
    corners = [(r0, c0), (r0, c1), (r1, c1), (r1, c0)]
    return [v for r, c in corners for v in (ORIGIN[0] + c * COL_MM, ORIGIN[1] + r * ROW_MM, z)]


def _contour(points: list[float], referenced_uid: str | None = None, kind: str = "CLOSED_PLANAR") -> Dataset:
    item = Dataset()
    item.ContourGeometricType = kind
    item.NumberOfContourPoints = len(points) // 3
    item.ContourData = points
    if referenced_uid is not None:
        image = Dataset()
        image.ReferencedSOPInstanceUID = referenced_uid
        item.ContourImageSequence = [image]
    return item


def _rtstruct(path: Path, contours: list[Dataset], *, frame_uid: str = FRAME_UID, name: str = "GTV-1") -> Path:
    ds = Dataset()
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.PatientID = "SYN1"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = generate_uid()
    series = Dataset()
    series.SeriesInstanceUID = SERIES_UID
    study = Dataset()
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_uid
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    roi = Dataset()
    roi.ROINumber = 1
    roi.ROIName = name
    roi.ReferencedFrameOfReferenceUID = frame_uid
    ds.StructureSetROISequence = [roi]
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ContourSequence = contours
    ds.ROIContourSequence = [roi_contour]
    observation = Dataset()
    observation.ReferencedROINumber = 1
    observation.RTROIInterpretedType = "GTV"
    ds.RTROIObservationsSequence = [observation]
    return save(ds, path)


def test_square_contour_gives_the_exact_mask(tmp_path: Path) -> None:
    series, _ = _ct_series(tmp_path / "ct")
    path = _rtstruct(tmp_path / "rs.dcm", [_contour(_square(19.5, 9.5, 39.5, 29.5, z=2.0))])
    [roi] = read_rtstruct(path)
    assert (roi.name, roi.interpreted_type, roi.referenced_series_uid) == ("GTV-1", "GTV", SERIES_UID)
    mask = roi_masks(roi, series)
    expected = np.zeros((3, *SHAPE), dtype=bool)
    expected[1, 20:40, 10:30] = True
    np.testing.assert_array_equal(mask, expected)
    assert mask_volume_ml(mask, series) == pytest.approx(400 * ROW_MM * COL_MM * 2.0 / 1000)


def test_referenced_slice_and_hole_by_xor(tmp_path: Path) -> None:
    series, uids = _ct_series(tmp_path / "ct")
    outer = _contour(_square(9.5, 9.5, 29.5, 29.5, z=4.0), referenced_uid=uids[2])
    hole = _contour(_square(14.5, 14.5, 24.5, 24.5, z=4.0), referenced_uid=uids[2])
    mask = roi_masks(read_rtstruct(_rtstruct(tmp_path / "rs.dcm", [outer, hole]))[0], series)
    expected = np.zeros(SHAPE, dtype=bool)
    expected[10:30, 10:30] = True
    expected[15:25, 15:25] = False
    np.testing.assert_array_equal(mask[2], expected)
    assert not mask[:2].any()


def test_points_and_open_contours_add_nothing(tmp_path: Path) -> None:
    series, _ = _ct_series(tmp_path / "ct")
    contours = [_contour([0.0, -10.0, 2.0], kind="POINT"), _contour(_square(19.5, 9.5, 39.5, 29.5, z=2.0), kind="OPEN_PLANAR")]
    [roi] = read_rtstruct(_rtstruct(tmp_path / "rs.dcm", contours))
    assert len(roi.contours) == 2 and not roi_masks(roi, series).any()


def test_contour_on_a_missing_slice_is_refused(tmp_path: Path) -> None:
    series, _ = _ct_series(tmp_path / "ct")
    off_plane = read_rtstruct(_rtstruct(tmp_path / "z.dcm", [_contour(_square(19.5, 9.5, 39.5, 29.5, z=7.0))]))[0]
    assert "lies on no slice" in refusal(roi_masks, off_plane, series, names=tmp_path / "z.dcm")
    ghost = _contour(_square(19.5, 9.5, 39.5, 29.5, z=2.0), referenced_uid=generate_uid())
    missing = read_rtstruct(_rtstruct(tmp_path / "uid.dcm", [ghost]))[0]
    assert "which the series does not hold" in refusal(roi_masks, missing, series)
    tilted = _square(19.5, 9.5, 39.5, 29.5, z=2.0)
    tilted[2::6] = [0.0, 0.0]  # two corners on z = 0, two on z = 2
    slanted = read_rtstruct(_rtstruct(tmp_path / "tilt.dcm", [_contour(tilted)]))[0]
    assert "not parallel" in refusal(roi_masks, slanted, series)


def test_other_frame_of_reference_and_malformed_contours_are_refused(tmp_path: Path) -> None:
    series, _ = _ct_series(tmp_path / "ct")
    square = _square(19.5, 9.5, 39.5, 29.5, z=2.0)
    elsewhere = read_rtstruct(_rtstruct(tmp_path / "for.dcm", [_contour(square)], frame_uid="1.2.3.4"))[0]
    assert "frame of reference" in refusal(roi_masks, elsewhere, series)
    lying = _contour(square)
    lying.NumberOfContourPoints = 7
    assert "NumberOfContourPoints is 7" in refusal(read_rtstruct, _rtstruct(tmp_path / "n.dcm", [lying]), names=tmp_path / "n.dcm")
    ragged = _contour(square)
    ragged.ContourData = square[:-1]
    ragged.NumberOfContourPoints = 4
    assert "triples" in refusal(read_rtstruct, _rtstruct(tmp_path / "r.dcm", [ragged]))
    assert "not an RT Structure Set" in refusal(read_rtstruct, tmp_path / "ct" / "ct0.dcm")


def test_loader_skips_structure_sets_with_the_reason(tmp_path: Path) -> None:
    _ct_series(tmp_path / "ct")
    _rtstruct(tmp_path / "ct" / "rs.dcm", [_contour(_square(19.5, 9.5, 39.5, 29.5, z=2.0))])
    catalog = open_paths([tmp_path / "ct"])
    assert len(catalog.all_series()) == 1
    assert [s.reason for s in catalog.skipped] == [
        "an RT Structure Set (contours, read by klviewer.io.rtstruct), not an image; not loaded"
    ]


def test_polygon_mask_matches_point_in_polygon_on_pixel_centres() -> None:
    rng = np.random.default_rng(3)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 40))
    radii = rng.uniform(5, 20, 40)
    rows, cols = 32 + radii * np.sin(angles), 30 + radii * np.cos(angles)
    mask = polygon_mask(rows, cols, (64, 60))
    centres = np.stack(np.meshgrid(np.arange(60), np.arange(64)), axis=-1).reshape(-1, 2)  # (col, row)
    inside = PolygonPath(np.column_stack([cols, rows])).contains_points(centres).reshape(64, 60)
    assert mask.sum() > 300
    np.testing.assert_array_equal(mask, inside)


def test_polygon_partly_outside_the_image_is_clipped() -> None:
    mask = polygon_mask(np.array([-5.5, -5.5, 3.5, 3.5]), np.array([-5.5, 7.5, 7.5, -5.5]), (6, 6))
    expected = np.zeros((6, 6), dtype=bool)
    expected[0:4, 0:6] = True
    np.testing.assert_array_equal(mask, expected)
