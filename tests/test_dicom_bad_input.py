"""Damaged, odd and hostile inputs: each bad file is skipped with a reason, the rest still loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from dicom_fixtures import ct_dataset, dicomdir, folder_state, save
from klviewer.io.dicom import read_dicom_files
from klviewer.io.study import Catalog


def copy_testdata(name: str, folder: Path) -> Path:
    return Path(shutil.copy(get_testdata_file(name, read=False), folder / name))


def truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def reasons(catalog: Catalog) -> dict[str, str]:
    return {s.path.name: s.reason for s in catalog.skipped}


def test_empty_list_gives_an_empty_catalog() -> None:
    catalog = read_dicom_files([])
    assert catalog.patients == [] and catalog.skipped == []


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_files_are_skipped_and_the_rest_loads(tmp_path: Path) -> None:
    good = copy_testdata("CT_small.dcm", tmp_path)
    cut_plain = truncate(copy_testdata("693_UNCR.dcm", tmp_path))
    cut_j2k = truncate(copy_testdata("J2K_pixelrep_mismatch.dcm", tmp_path))
    catalog = read_dicom_files([cut_plain, good, cut_j2k])
    (series,) = catalog.all_series()
    assert series.files == [good]
    why = reasons(catalog)
    assert why[cut_plain.name].startswith("cannot decode pixel data (Explicit VR Little Endian)")
    assert "less than expected" in why[cut_plain.name]
    # An encapsulated (J2K) file cut short loses its Pixel Data element entirely while parsing.
    assert why[cut_j2k.name].startswith("no pixel data") and "truncated" in why[cut_j2k.name]


def test_corrupt_and_non_dicom_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    random_bytes = tmp_path / "random.dcm"
    random_bytes.write_bytes(rng.bytes(4096))
    after_preamble = tmp_path / "garbage_after_preamble.dcm"
    after_preamble.write_bytes(bytes(128) + b"DICM" + rng.bytes(4096))
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    good = copy_testdata("CT_small.dcm", tmp_path)
    catalog = read_dicom_files([random_bytes, after_preamble, empty, text, good])
    assert [s.files for s in catalog.all_series()] == [[good]]
    why = reasons(catalog)
    assert why["random.dcm"].startswith("not a DICOM file")
    assert why["notes.txt"].startswith("not a DICOM file")
    assert why["empty.dcm"] == "empty file"
    assert "not a valid DICOM dataset" in why["garbage_after_preamble.dcm"]


def test_file_without_pixel_data(tmp_path: Path) -> None:
    ds = ct_dataset(np.zeros((4, 4), np.int16))
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    path = save(ds, tmp_path / "header_only.dcm")
    catalog = read_dicom_files([path])
    assert catalog.all_series() == []
    assert reasons(catalog) == {"header_only.dcm": "no pixel data"}


def test_undecodable_compressed_pixel_data(tmp_path: Path) -> None:
    ds = ct_dataset(np.zeros((4, 4), np.int16))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])  # a J2K marker, then nonsense
    ds["PixelData"].VR = "OB"
    path = save(ds, tmp_path / "bad_j2k.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(path, enforce_file_format=True)
    why = reasons(read_dicom_files([path]))
    assert why["bad_j2k.dcm"].startswith("cannot decode pixel data (JPEG 2000 Image Compression (Lossless Only))")


def test_any_decoder_exception_becomes_a_skip_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(self: pydicom.Dataset) -> np.ndarray:
        raise MemoryError("decoder ran out of memory")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(explode))
    path = copy_testdata("CT_small.dcm", tmp_path)
    catalog = read_dicom_files([path])
    assert catalog.all_series() == []
    assert "MemoryError: decoder ran out of memory" in reasons(catalog)["CT_small.dcm"]


def test_all_files_failing_still_returns_the_skips(tmp_path: Path) -> None:
    bad = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    for path in bad:
        path.write_bytes(b"nothing here")
    catalog = read_dicom_files(bad)
    assert catalog.patients == []
    assert [s.path for s in catalog.skipped] == bad


def test_mixed_sizes_keep_the_majority(tmp_path: Path) -> None:
    paths = [
        save(ct_dataset(np.zeros((16, 16), np.int16), instance_number=i, position=(0, 0, float(i))), tmp_path / f"{i}.dcm")
        for i in range(3)
    ]
    odd = save(ct_dataset(np.zeros((8, 12), np.int16), instance_number=9, position=(0, 0, 9.0)), tmp_path / "odd.dcm")
    catalog = read_dicom_files([*paths, odd])
    (series,) = catalog.all_series()
    assert series.n_slices == 3 and series.image_shape == (16, 16)
    assert reasons(catalog)["odd.dcm"].startswith("image size 12x8 differs from the 16x16 of most images")


def test_duplicate_positions_keep_both_and_warn(tmp_path: Path) -> None:
    paths = [
        save(ct_dataset(np.full((4, 4), value, np.int16), instance_number=i + 1, position=(0, 0, z)), tmp_path / f"{i}.dcm")
        for i, (z, value) in enumerate([(0.0, 1), (1.0, 2), (1.0, 3), (2.0, 4)])
    ]
    catalog = read_dicom_files(paths)
    (series,) = catalog.all_series()
    assert catalog.skipped == []
    assert [float(s.hu[0, 0]) + 1024 for s in series.slices] == [1, 2, 3, 4]  # ties keep InstanceNumber order
    assert series.warnings == ["1 slice(s) share a position with another slice; all were kept"]


def test_copied_file_is_skipped_as_a_duplicate(tmp_path: Path) -> None:
    original = copy_testdata("CT_small.dcm", tmp_path)
    copy = Path(shutil.copy(original, tmp_path / "copy_of_ct.dcm"))
    catalog = read_dicom_files([original, copy])
    assert catalog.all_series()[0].n_slices == 1
    assert reasons(catalog) == {"copy_of_ct.dcm": f"duplicate of {original} (same SOPInstanceUID {pydicom.dcmread(original).SOPInstanceUID})"}


def test_dicomdir_missing_outside_and_double_listed(tmp_path: Path) -> None:
    media = tmp_path / "media"
    image = save(ct_dataset(np.zeros((4, 4), np.int16)), media / "IMAGES" / "IM1")
    outside = save(ct_dataset(np.zeros((4, 4), np.int16), sop_uid="1.2.3.4"), tmp_path / "elsewhere" / "IM9")
    (media / "LINK").symlink_to(outside.parent, target_is_directory=True)
    records = [["IMAGES", "IM1"], ["IMAGES", "GONE"], ["LINK", "IM9"]]
    index = save(dicomdir(records), media / "DICOMDIR")
    # A second index, recognised by its SOP class rather than its name, lists the same files.
    backup = save(dicomdir(records), media / "INDEX.BAK")
    catalog = read_dicom_files([index, image, backup])  # the image is also listed directly
    (series,) = catalog.all_series()
    assert series.files == [media / "IMAGES" / "IM1"]
    assert len(catalog.skipped) == 2
    why = reasons(catalog)
    assert why["GONE"] == f"listed in DICOMDIR {index} but the file is missing"
    assert "outside its own folder" in why["IM9"]


def test_reading_never_changes_or_adds_files(tmp_path: Path) -> None:
    shutil.copytree(Path(get_testdata_file("DICOMDIR", read=False)).parent / "77654033", tmp_path / "77654033")
    copy_testdata("CT_small.dcm", tmp_path)
    copy_testdata("J2K_pixelrep_mismatch.dcm", tmp_path)
    truncate(copy_testdata("693_UNCR.dcm", tmp_path))
    (tmp_path / "junk.bin").write_bytes(np.random.default_rng(1).bytes(1000))
    before = folder_state(tmp_path)
    catalog = read_dicom_files(sorted(p for p in tmp_path.rglob("*") if p.is_file()))
    assert len(catalog.all_series()) == 6 and len(catalog.skipped) == 2
    assert folder_state(tmp_path) == before
