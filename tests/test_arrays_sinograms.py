import json
from pathlib import Path

import numpy as np
import pytest
import torch

from klviewer.errors import KlviewerInputError, SidecarMismatchError
from klviewer.io.arrays import read_array_image
from klviewer.io.sinogram import read_sinogram
from klviewer.physics.noise import from_counts


def _hu_stack(shape=(3, 32, 40)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(-1000, 1500, size=shape).astype(np.float32)


def test_npy_stack_with_sidecar(tmp_path: Path) -> None:
    hu = _hu_stack()
    np.save(tmp_path / "vol.npy", hu)
    (tmp_path / "vol.json").write_text(json.dumps({"pixel_spacing_mm": [0.7, 0.8], "slice_thickness_mm": 2.5, "window": [40, 400]}))
    series = read_array_image(tmp_path / "vol.npy").all_series()[0]
    assert series.n_slices == 3 and series.image_shape == (32, 40)
    assert series.pixel_spacing_mm == (0.7, 0.8)
    assert series.slice_thickness_mm == 2.5
    assert series.window == (40.0, 400.0)
    np.testing.assert_array_equal(series.volume(), hu)
    assert series.analysis_refusal() is None
    assert series.warnings == []


def test_npz_2d_without_sidecar_warns_about_spacing(tmp_path: Path) -> None:
    hu = _hu_stack((20, 20))
    np.savez(tmp_path / "slice.npz", hu=hu, body_mask=hu > 0)
    series = read_array_image(tmp_path / "slice.npz").all_series()[0]
    assert series.n_slices == 1
    np.testing.assert_array_equal(series.slices[0].hu, hu)
    assert any("pixel spacing" in w for w in series.warnings)


def test_array_that_is_not_hu_gets_a_warning(tmp_path: Path) -> None:
    np.save(tmp_path / "unit.npy", np.random.default_rng(1).random((16, 16)).astype(np.float32))
    series = read_array_image(tmp_path / "unit.npy").all_series()[0]
    assert any("Hounsfield" in w for w in series.warnings)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_with_the_file_name(tmp_path: Path, bad: float) -> None:
    hu = _hu_stack((8, 8))
    hu[2, 3] = bad
    np.save(tmp_path / "bad.npy", hu)
    with pytest.raises(KlviewerInputError, match=r"bad\.npy: array holds 1 NaN/inf"):
        read_array_image(tmp_path / "bad.npy")


def test_pickled_object_arrays_are_never_loaded(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(KlviewerInputError, match="pickles never are"):
        read_array_image(tmp_path / "obj.npy")


def test_truncated_npy_names_the_file(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", _hu_stack((64, 64)))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(KlviewerInputError, match=r"t\.npy: .*(truncated|readable)"):
        read_array_image(tmp_path / "t.npy")


def test_wrong_dimensions_and_sidecar_contradiction(tmp_path: Path) -> None:
    np.save(tmp_path / "four.npy", np.zeros((1, 2, 3, 4), np.float32))
    with pytest.raises(KlviewerInputError, match=r"\(H, W\) or \(S, H, W\)"):
        read_array_image(tmp_path / "four.npy")
    np.save(tmp_path / "img.npy", _hu_stack((2, 8, 8)))
    (tmp_path / "img.json").write_text(json.dumps({"shape": [3, 8, 8]}))
    with pytest.raises(SidecarMismatchError) as info:
        read_array_image(tmp_path / "img.npy")
    assert info.value.field == "shape" and "img.json" in str(info.value)
    assert "[3, 8, 8]" in str(info.value) and "[2, 8, 8]" in str(info.value)


def test_sidecar_that_is_not_json_or_has_unknown_fields(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", _hu_stack((8, 8)))
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(KlviewerInputError, match=r"a\.json: sidecar is not valid JSON"):
        read_array_image(tmp_path / "a.npy")
    (tmp_path / "a.json").write_text(json.dumps({"pixel_spacing": 1}))
    with pytest.raises(KlviewerInputError, match="unknown sidecar fields"):
        read_array_image(tmp_path / "a.npy")
    (tmp_path / "a.json").write_text(json.dumps({"pixel_spacing_mm": -1}))
    with pytest.raises(KlviewerInputError, match="must be positive"):
        read_array_image(tmp_path / "a.npy")


def _sinogram_sidecar(**overrides) -> dict:
    doc = {
        "klviewer_sinogram": 1,
        "geometry": "parallel",
        "angles": {"unit": "deg", "start": 0, "stop": 180, "count": 6},
        "detector": {"count": 10, "spacing_mm": 1.5},
        "data": {"kind": "line_integrals"},
        "grid": {"size": [7, 7], "pixel_spacing_mm": 1.5},
    }
    doc.update(overrides)
    return doc


def test_sinogram_npy_with_sidecar(tmp_path: Path) -> None:
    sino = np.random.default_rng(2).random((2, 6, 10)).astype(np.float32)
    np.save(tmp_path / "scan.npy", sino)
    (tmp_path / "scan.json").write_text(json.dumps(_sinogram_sidecar()))
    series = read_sinogram(tmp_path / "scan.json").all_series()[0]
    s = series.sinogram
    assert series.source_kind == "sinogram" and series.n_slices == 2
    np.testing.assert_array_equal(s.line_integrals, sino)
    np.testing.assert_allclose(np.rad2deg(s.angles_rad), [0, 30, 60, 90, 120, 150])
    assert s.detector_spacing_mm == 1.5 and s.grid_size == (7, 7) and s.grid_pixel_spacing_mm == (1.5, 1.5)
    assert series.image_shape == (7, 7)


def test_raw_counts_big_endian(tmp_path: Path) -> None:
    counts = np.random.default_rng(3).integers(0, 5000, size=(4, 10)).astype(">u2")
    counts[1, 2] = 0
    counts.tofile(tmp_path / "c.raw")
    doc = _sinogram_sidecar(
        angles={"unit": "rad", "values": [0.0, 0.5, 1.0, 1.5]},
        data={"kind": "counts", "i0": 5000, "file": "c.raw", "dtype": "uint16", "shape": [4, 10], "byte_order": "big"},
    )
    (tmp_path / "c_meta.json").write_text(json.dumps(doc))
    s = read_sinogram(tmp_path / "c_meta.json").all_series()[0].sinogram
    np.testing.assert_array_equal(s.counts[0], counts.astype(np.float32))
    np.testing.assert_allclose(s.line_integrals[0], from_counts(torch.from_numpy(counts.astype(np.float32)), 5000).numpy())
    assert s.i0 == 5000
    assert s.line_integrals[0][1, 2] == pytest.approx(np.log(1e4), rel=1e-6)  # zero counts read as half a count


@pytest.mark.parametrize(
    "change, field",
    [
        ({"detector": {"count": 11, "spacing_mm": 1.5}}, "detector.count"),
        ({"angles": {"unit": "deg", "start": 0, "stop": 180, "count": 5}}, "angles (count)"),
        ({"data": {"kind": "line_integrals", "shape": [2, 6, 9]}}, "data.shape"),
        ({"data": {"kind": "line_integrals", "dtype": "float64"}}, "data.dtype"),
    ],
)
def test_sinogram_sidecar_mismatch_names_field_and_values(tmp_path: Path, change: dict, field: str) -> None:
    np.save(tmp_path / "scan.npy", np.zeros((2, 6, 10), np.float32))
    (tmp_path / "scan.json").write_text(json.dumps(_sinogram_sidecar(**change)))
    with pytest.raises(SidecarMismatchError) as info:
        read_sinogram(tmp_path / "scan.json")
    assert info.value.field == field
    assert "scan.json" in str(info.value)


def test_raw_file_size_mismatch(tmp_path: Path) -> None:
    np.zeros((4, 10), np.float32)[:3].tofile(tmp_path / "short.raw")
    doc = _sinogram_sidecar(
        angles={"unit": "deg", "start": 0, "stop": 180, "count": 4},
        data={"kind": "line_integrals", "file": "short.raw", "dtype": "float32", "shape": [4, 10]},
    )
    (tmp_path / "short.json").write_text(json.dumps(doc))
    with pytest.raises(SidecarMismatchError, match="160.*120"):
        read_sinogram(tmp_path / "short.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"geometry": "fan"}, "'geometry' must be 'parallel'"),
        ({"angles": {"unit": "grad", "values": [1]}}, "angles.unit"),
        ({"data": {"kind": "counts"}}, "data.i0"),
        ({"data": {"kind": "line_integrals", "file": "../../etc/passwd"}}, "beside the sidecar"),
        ({"klviewer_sinogram": 7}, "version 7"),
        ({"extra": 1}, "unknown sidecar fields"),
    ],
)
def test_bad_sinogram_sidecars(tmp_path: Path, change: dict, message: str) -> None:
    np.save(tmp_path / "scan.npy", np.zeros((6, 10), np.float32))
    (tmp_path / "scan.json").write_text(json.dumps(_sinogram_sidecar(**change)))
    with pytest.raises(KlviewerInputError, match=message):
        read_sinogram(tmp_path / "scan.json")


def test_nan_in_sinogram_is_refused(tmp_path: Path) -> None:
    sino = np.zeros((6, 10), np.float32)
    sino[1, 1] = np.nan
    np.save(tmp_path / "scan.npy", sino)
    (tmp_path / "scan.json").write_text(json.dumps(_sinogram_sidecar()))
    with pytest.raises(KlviewerInputError, match=r"scan\.npy: array holds 1 NaN/inf"):
        read_sinogram(tmp_path / "scan.json")


def test_phantom_npz_reads_as_an_image_with_its_spacing(tmp_path: Path) -> None:
    from klviewer.phantoms import make_phantom, save_phantom_npz

    phantom = make_phantom("lesion", 64, seed=4)
    save_phantom_npz(phantom, tmp_path / "p.npz")
    series = read_array_image(tmp_path / "p.npz").all_series()[0]
    np.testing.assert_array_equal(series.slices[0].hu, phantom.hu)
    assert series.pixel_spacing_mm == (phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    assert series.warnings == []
