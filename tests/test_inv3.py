"""InVesalius .inv3 projects: the volume reads back in DICOM row order; hostile archives are refused."""

from __future__ import annotations

import io
import plistlib
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_fixtures import folder_state
from klviewer.cli import main
from klviewer.io.inv3 import read_inv3
from klviewer.io.loader import open_paths
from reader_checks import refusal


def _volume(shape: tuple[int, int, int] = (3, 12, 10)) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(-1024, 2000, size=shape).astype(np.int16)


def _plist(volume: np.ndarray, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format_version": 1,
        "name": "Test Head",
        "modality": "CT",
        "orientation": 1,
        "spacing": [0.8, 0.6, 2.5],
        "window_level": 40.0,
        "window_width": 400.0,
        "matrix": {"filename": "matrix.dat", "shape": list(volume.shape), "dtype": "int16"},
    }
    doc.update(changes)
    return doc


def write_inv3(
    path: Path, volume: np.ndarray, plist: dict[str, Any] | None = None, *, matrix: bytes | None = None,
    extra: list[tarfile.TarInfo] | None = None, mode: str = "w:gz",
) -> Path:
    """An .inv3 as InVesalius writes it: rows stored bottom-first, in a folder inside a tar."""
    stored = volume[:, ::-1, :].astype("<i2").tobytes() if matrix is None else matrix
    entries = [("proj/main.plist", plistlib.dumps(plist or _plist(volume))), ("proj/matrix.dat", stored)]
    with tarfile.open(path, mode) as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in extra or []:
            archive.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def test_volume_spacing_window_and_positions(tmp_path: Path) -> None:
    volume = _volume()
    series = read_inv3(write_inv3(tmp_path / "head.inv3", volume)).all_series()[0]
    np.testing.assert_array_equal(series.volume(), volume.astype(np.float32))
    assert series.pixel_spacing_mm == (0.6, 0.8)  # (row, column) from InVesalius' [x, y, z]
    assert series.slice_thickness_mm == 2.5
    assert [s.position for s in series.slices] == [(0.0, 0.0, 0.0), (0.0, 0.0, 2.5), (0.0, 0.0, 5.0)]
    assert series.window == (40.0, 400.0)
    assert series.modality == "CT" and series.analysis_refusal() is None
    assert series.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def test_plain_tar_opens_through_the_loader_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_inv3(tmp_path / "head.inv3", _volume(), mode="w")
    catalog = open_paths([tmp_path])
    assert [p.name for p in catalog.patients] == ["Test Head"] and not catalog.skipped
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 slice(s), 12x10 px, spacing 0.6x0.8 mm, thickness 2.5 mm" in out


def test_other_orientation_is_read_with_a_warning(tmp_path: Path) -> None:
    volume = _volume()
    series = read_inv3(write_inv3(tmp_path / "c.inv3", volume, _plist(volume, orientation="CORONAL"))).all_series()[0]
    assert any("CORONAL" in w for w in series.warnings)


def _refusal(path: Path) -> str:
    return refusal(read_inv3, path, names=path)


def test_truncated_matrix_and_lying_shape_are_refused(tmp_path: Path) -> None:
    volume = _volume()
    short = write_inv3(tmp_path / "short.inv3", volume, matrix=volume.tobytes()[:-10])
    assert "declares a [3, 12, 10] int16 volume of 720 bytes" in _refusal(short)
    taller = _plist(volume, matrix={"filename": "matrix.dat", "shape": [4, 12, 10], "dtype": "int16"})
    assert "holds 720 bytes" in _refusal(write_inv3(tmp_path / "lie.inv3", volume, taller))


def test_huge_declared_volume_is_refused_before_allocating(tmp_path: Path) -> None:
    volume = _volume()
    huge = _plist(volume, matrix={"filename": "matrix.dat", "shape": [100_000, 100_000, 100_000], "dtype": "float64"})
    start = time.process_time()
    assert "over the" in _refusal(write_inv3(tmp_path / "huge.inv3", volume, huge))
    assert time.process_time() - start < 5


def test_truncated_archive_is_refused(tmp_path: Path) -> None:
    path = write_inv3(tmp_path / "cut.inv3", _volume((20, 64, 64)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated or corrupt" in _refusal(path)


@pytest.mark.parametrize("name", ["../evil.dat", "/etc/evil.dat", "proj/../../evil.dat"])
def test_members_outside_the_archive_are_refused(tmp_path: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = 4
    before = folder_state(tmp_path)
    path = write_inv3(tmp_path / "evil.inv3", _volume(), extra=[info])
    assert "points outside the archive" in _refusal(path)
    assert folder_state(tmp_path).keys() - before.keys() == {"evil.inv3"}


def test_links_and_bad_plist_values_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("proj/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    assert "link or special file" in _refusal(write_inv3(tmp_path / "link.inv3", _volume(), extra=[link]))
    volume = _volume()
    climbing = _plist(volume, matrix={"filename": "../matrix.dat", "shape": list(volume.shape), "dtype": "int16"})
    assert "plain file name" in _refusal(write_inv3(tmp_path / "climb.inv3", volume, climbing))
    assert "voxel spacing" in _refusal(write_inv3(tmp_path / "spacing.inv3", volume, _plist(volume, spacing=[0.8, 0.0, 2.5])))
    objects = _plist(volume, matrix={"filename": "matrix.dat", "shape": list(volume.shape), "dtype": "object"})
    assert "dtype" in _refusal(write_inv3(tmp_path / "dtype.inv3", volume, objects))


def test_plist_with_entities_and_archives_without_a_project_are_refused(tmp_path: Path) -> None:
    entity = b'<?xml version="1.0"?><!DOCTYPE plist [<!ENTITY a "aaaa">]><plist version="1.0"><dict/></plist>'
    path = tmp_path / "entity.inv3"
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("proj/main.plist")
        info.size = len(entity)
        archive.addfile(info, io.BytesIO(entity))
    assert "not a valid property list" in _refusal(path)
    not_tar = tmp_path / "plain.inv3"
    not_tar.write_bytes(b"not an archive at all")
    assert "not a readable InVesalius project" in _refusal(not_tar)
