"""Real CT: pydicom's slices load with their spacing; pycerr's tumour outlines land on the tumours;
InVesalius' head CT reads in DICOM orientation. Data that `make data` has not fetched is skipped."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from skimage.morphology import dilation, disk

from klviewer.errors import KlviewerInputError
from klviewer.io import realct
from klviewer.io.loader import open_paths
from klviewer.io.rtstruct import mask_volume_ml, read_rtstruct

# Pixel spacing (row, column) in mm, as each file's header gives it (eCT_Supplemental in its
# shared functional groups, the others at the top level).
PYDICOM_SPACING = {
    "693_UNCR.dcm": 0.478516,
    "eCT_Supplemental.dcm": 0.388672,
    "explicit_VR-UN.dcm": 0.859375,
    "bad_sequence.dcm": 0.287109375,
    "CT_small.dcm": 0.661468,
    "J2K_pixelrep_mismatch.dcm": 0.431,
}


def _cases(source: str) -> list[realct.RealCtCase]:
    cases = [c for c in realct.available_cases() if c.source == source]
    if not cases:
        pytest.skip(f"real CT from {source} not fetched: run `{realct.MAKE_TARGETS[source.split('-')[0]]}`")
    return cases


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(PYDICOM_SPACING))
def test_pydicom_real_ct_slices_load_with_their_spacing(name: str) -> None:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data is a dev dependency)")
    [series] = open_paths([path]).all_series()
    assert series.pixel_spacing_mm == pytest.approx((PYDICOM_SPACING[name],) * 2)
    assert series.analysis_refusal() is None
    low, high = series.hu_range()  # type: ignore[misc]
    assert -3100 < low < -850 and 150 < high < 3100  # air (or padding) to bone: HU, not raw values
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert series.slices[0].sop_instance_uid == ds.SOPInstanceUID
    header = ds.get("ImageOrientationPatient")  # Enhanced CT keeps it in the functional groups instead
    assert series.orientation is not None
    if header is not None:
        assert series.orientation == pytest.approx(tuple(float(v) for v in header))


def test_every_listed_case_has_its_own_patient() -> None:
    cases = realct.available_cases()
    assert len({c.case_id for c in cases}) == len(cases)
    pydicom_patients = [c.patient_id for c in cases if c.source.startswith("pydicom")]
    assert len(pydicom_patients) == len(set(pydicom_patients)) == len(PYDICOM_SPACING)


def test_pycerr_tumour_masks_land_on_the_tumours() -> None:
    cases = [c for c in _cases("pycerr") if c.rtstruct is not None]
    assert [c.patient_id for c in cases] == [f"pycerr:pat_{i}" for i in range(1, 5)]
    for case in cases:
        volume = realct.load_case(case)
        hu, tumour = volume.series.volume(), volume.tumour
        assert tumour is not None and tumour.shape == hu.shape
        # The raster agrees with the polygons' own areas (shoelace formula) times the 3 mm slices.
        polygons_ml = sum(
            0.5 * abs(np.dot(c.points_mm[:, 0], np.roll(c.points_mm[:, 1], -1)) - np.dot(c.points_mm[:, 1], np.roll(c.points_mm[:, 0], -1)))
            for roi in read_rtstruct(case.rtstruct) for c in roi.contours  # type: ignore[arg-type]
        ) * 3.0 / 1000
        assert mask_volume_ml(tumour, volume.series) == pytest.approx(polygons_ml, rel=0.03)
        # A lung tumour is denser than the 4-pixel ring around it.
        ring = np.stack([dilation(m, disk(4)) & ~m for m in tumour])
        assert np.median(hu[tumour]) > np.median(hu[ring]) + 100, case.case_id
        # Tumour-free slices above and below, for healthy training and false-positive counts.
        per_slice = tumour.any(axis=(1, 2))
        assert per_slice.sum() >= 7 and (~per_slice).sum() >= 30


def test_invesalius_head_reads_in_dicom_orientation() -> None:
    [case] = _cases("invesalius")
    series = realct.load_case(case).series
    assert (series.n_slices, series.image_shape) == (108, (256, 256))
    assert series.pixel_spacing_mm == pytest.approx((0.957, 0.957), abs=1e-3) and series.slice_thickness_mm == 1.5
    assert series.hu_range() == (-1024.0, 2986.0)
    assert series.window == (-18.0, 406.0)
    # The head holder is posterior: at the image sides, dense pixels lie in the lower half only,
    # as in DICOM (InVesalius itself stores the rows the other way up).
    sides = series.slices[40].hu[:, :25] > 300
    rows = np.flatnonzero(sides.any(axis=1))
    assert rows.size > 10 and rows.min() > 128


def test_pycerr_nifti_scan_reads_in_dicom_orientation() -> None:
    [case] = _cases("pycerr-nifti")
    series = realct.load_case(case).series
    assert (series.n_slices, series.image_shape) == (3, (512, 512))
    assert series.pixel_spacing_mm == pytest.approx((1.171875, 1.171875))
    # Spine and table are posterior: bone (> 300 HU) sits in the lower half of the slice.
    bone_rows = np.flatnonzero((series.slices[1].hu > 300).any(axis=1))
    assert np.median(bone_rows) > 256


def test_unpack_pycerr_takes_only_the_ct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(realct, "PYCERR_PATIENT_IMAGES", {"pat_1": 2})
    wheel = tmp_path / "pycerr-0-py3-none-any.whl"
    prefix = "cerr/datasets/radiomics_phantom_dicom/"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in ("pat_1/DCM_IMG_00000.dcm", "pat_1/DCM_IMG_00001.dcm", "pat_1/DCM_RS_00002.dcm", "README_LICENSE.txt"):
            archive.writestr(prefix + name, b"data")
        archive.writestr(prefix + "../../../evil.dcm", b"x")
        archive.writestr("cerr/other/code.py", b"x")
    root = tmp_path / "data"
    target = realct.unpack_pycerr(wheel, root)
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert found == ["pycerr/NOTICE.md", "pycerr/README_LICENSE.txt", "pycerr/pat_1/DCM_IMG_00000.dcm",
                     "pycerr/pat_1/DCM_IMG_00001.dcm", "pycerr/pat_1/DCM_RS_00002.dcm"]
    assert "NonCommercial" in (target / "NOTICE.md").read_text()
    assert realct.unpack_pycerr(wheel, root) == target  # a second run replaces its own copy


def test_unpack_refuses_a_folder_it_did_not_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(realct, "PYCERR_PATIENT_IMAGES", {"pat_1": 1})
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in ("pat_1/DCM_IMG_00000.dcm", "pat_1/DCM_RS_00001.dcm"):
            archive.writestr("cerr/datasets/radiomics_phantom_dicom/" + name, b"data")
    (tmp_path / "data" / "pycerr").mkdir(parents=True)
    (tmp_path / "data" / "pycerr" / "mine.txt").write_text("user data")
    with pytest.raises(KlviewerInputError, match="not written by klviewer"):
        realct.unpack_pycerr(wheel, tmp_path / "data")
    assert (tmp_path / "data" / "pycerr" / "mine.txt").read_text() == "user data"
