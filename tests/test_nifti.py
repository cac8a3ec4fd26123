"""NIfTI-1 volumes: RAS voxels become an LPS axial stack with exact positions; bad headers are refused."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from klviewer.io.loader import open_paths
from klviewer.io.nifti import read_nifti
from reader_checks import refusal

SPACING = (0.8, 0.6, 2.5)  # x, y, z voxel sizes in mm


def write_nifti(
    path: Path, data: np.ndarray, affine: np.ndarray | None = None, *, slope: float = 1.0, inter: float = -1024.0,
    dim: tuple[int, ...] | None = None, code: int = 4, magic: bytes = b"n+1\x00", trailing: bytes = b"",
) -> Path:
    """A single-file NIfTI-1: `data` is (z, y, x) as numpy holds it; the file stores x fastest."""
    if affine is None:
        affine = np.diag([*SPACING, 1.0])
        affine[:3, 3] = (-4.0, 5.0, 10.0)
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    shape = dim if dim is not None else (3, data.shape[2], data.shape[1], data.shape[0], 1, 1, 1, 1)
    struct.pack_into("<8h", header, 40, *shape)
    struct.pack_into("<2h", header, 70, code, data.dtype.itemsize * 8)
    struct.pack_into("<8f", header, 76, 1.0, *np.linalg.norm(affine[:3, :3], axis=0), 0, 0, 0, 0)
    struct.pack_into("<3f", header, 108, 352.0, slope, inter)
    header[148:158] = b"test scan\x00"
    struct.pack_into("<2h", header, 252, 0, 2)  # qform_code 0, sform_code 2 (aligned)
    struct.pack_into("<12f", header, 280, *affine[:3].ravel())
    header[344:348] = magic
    payload = bytes(header) + data.astype(data.dtype.newbyteorder("<")).tobytes() + trailing
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _data(shape: tuple[int, int, int] = (4, 5, 6)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape)


def test_ras_volume_becomes_an_lps_stack(tmp_path: Path) -> None:
    data = _data()
    series = read_nifti(write_nifti(tmp_path / "scan.nii", data)).all_series()[0]
    # RAS x and y point to the patient's right and front; DICOM's columns and rows to left and back.
    np.testing.assert_array_equal(series.volume(), data[:, ::-1, ::-1].astype(np.float32) - 1024)
    assert series.pixel_spacing_mm == pytest.approx((0.6, 0.8)) and series.slice_thickness_mm == pytest.approx(2.5)
    assert series.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    # Top-left voxel of slice k is RAS (i=5, j=4, k): x = -4 + 5*0.8 = 0 -> LPS 0; y = 5 + 4*0.6 = 7.4 -> LPS -7.4.
    positions = np.array([s.position for s in series.slices])
    np.testing.assert_allclose(positions, [[0.0, -7.4, 10.0 + 2.5 * k] for k in range(4)], atol=1e-5)
    assert series.description == "test scan"


def test_lps_affine_with_swapped_axes_needs_no_flip(tmp_path: Path) -> None:
    data = _data()
    # Voxel i runs along RAS -y (posterior), j along RAS -x (patient's left): a transposed LPS layout.
    affine = np.array([[0, -0.6, 0, 0], [-0.8, 0, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]])
    series = read_nifti(write_nifti(tmp_path / "t.nii.gz", data, affine)).all_series()[0]
    np.testing.assert_array_equal(series.volume(), data.transpose(0, 2, 1).astype(np.float32) - 1024)
    assert series.pixel_spacing_mm == pytest.approx((0.8, 0.6))


def test_nifti_opens_through_the_loader(tmp_path: Path) -> None:
    write_nifti(tmp_path / "a.nii", _data())
    write_nifti(tmp_path / "b.nii.gz", _data())
    catalog = open_paths([tmp_path])
    assert len(catalog.all_series()) == 2 and not catalog.skipped


def _refusal(path: Path) -> str:
    return refusal(read_nifti, path, names=path)


def test_size_mismatches_are_refused(tmp_path: Path) -> None:
    data = _data()
    cut = write_nifti(tmp_path / "cut.nii", data)
    cut.write_bytes(cut.read_bytes()[:-7])
    assert "truncated" in _refusal(cut)
    assert "more data than its declared shape" in _refusal(write_nifti(tmp_path / "long.nii", data, trailing=b"\0" * 8))
    huge = write_nifti(tmp_path / "huge.nii", data, dim=(3, 30000, 30000, 30000, 1, 1, 1, 1))
    assert "over the" in _refusal(huge)
    gz = write_nifti(tmp_path / "cut.nii.gz", data)
    gz.write_bytes(gz.read_bytes()[:-20])
    assert "truncated or corrupt" in _refusal(gz)


def test_unsupported_layouts_are_refused(tmp_path: Path) -> None:
    data = _data()
    assert "series of volumes" in _refusal(write_nifti(tmp_path / "t.nii", data, dim=(4, 6, 5, 2, 2, 1, 1, 1)))
    assert "datatype code 128" in _refusal(write_nifti(tmp_path / "rgb.nii", data, code=128))
    assert "single-file NIfTI-1" in _refusal(write_nifti(tmp_path / "pair.nii", data, magic=b"ni1\x00"))
    tilt = np.deg2rad(20)
    oblique = np.diag([0.8, 0.6, 2.5, 1.0])
    oblique[1:3, 1:3] = [[0.6 * np.cos(tilt), -2.5 * np.sin(tilt)], [0.6 * np.sin(tilt), 2.5 * np.cos(tilt)]]
    assert "oblique" in _refusal(write_nifti(tmp_path / "oblique.nii", data, oblique))
    (tmp_path / "short.nii").write_bytes(b"\x5c\x01\x00\x00" + b"\0" * 20)
    assert "shorter than a NIfTI-1 header" in _refusal(tmp_path / "short.nii")
