"""Each family of hostile input the fuzzer found, refused at its root with the file and the field named.

(tests/test_fuzz.py mutates inputs at random; these are the cases one at a time, so a regression
names its family.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_fixtures import ct_dataset, save

from klviewer.errors import KlviewerInputError
from klviewer.io.arrays import load_numeric_array, read_array_image
from klviewer.io.json_input import MAX_DEPTH, read_json
from klviewer.io.loader import open_paths
from klviewer.io.safe_write import OutputExistsError, atomic_write_text
from klviewer.io.sinogram import read_sinogram
from klviewer.priors import load_prior, save_prior
from klviewer.priors.checkpoint import CONFIG_FILE, WEIGHTS_FILE


def _refusal(call, *args) -> KlviewerInputError:
    with pytest.raises(KlviewerInputError) as info:
        call(*args)
    return info.value


# --- JSON ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "problem"), [
    ("[" * 5000 + "]" * 5000, f"more than the {MAX_DEPTH} allowed"),
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": 1e999}', "too large to be finite"),
    ('{"a": ' + "9" * 40 + "}", "too large"),
    ('{"a": "x\\u0000y"}', "NUL character"),
    ('{"a": 1, "a": 2}', "appears twice"),
    ('{"a": 1', "not valid JSON"),
])
def test_hostile_json_is_refused_naming_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "doc.json"
    path.write_text(text)
    error = _refusal(read_json, path, 1 << 20, "sidecar")
    assert error.path == path and problem in error.problem


def test_json_size_and_file_kind_are_checked_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text(" " * 2000 + "{}")
    assert "more than the 1000 allowed" in _refusal(read_json, big, 1000, "sidecar").problem
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert "FIFO" in _refusal(read_json, fifo, 1000, "sidecar").problem  # and returns: open() does not block


def test_a_long_value_is_quoted_short(tmp_path: Path) -> None:
    np.save(tmp_path / "scan.npy", np.zeros((6, 10), np.float32))
    (tmp_path / "scan.json").write_text(json.dumps({"klviewer_sinogram": 1, "geometry": "x" * 50_000}))
    error = _refusal(read_sinogram, tmp_path / "scan.json")
    assert "'geometry'" in str(error) and "characters cut" in str(error) and len(str(error)) < 500


def test_wrong_types_and_huge_numbers_name_the_field(tmp_path: Path) -> None:
    np.save(tmp_path / "img.npy", np.zeros((8, 8), np.float32))
    for doc, field in (({"pixel_spacing_mm": 1e30}, "pixel_spacing_mm"), ({"shape": 7}, "shape"),
                       ({"window": [40, None]}, "window"), ({"description": ["a"]}, "description")):
        (tmp_path / "img.json").write_text(json.dumps(doc))
        error = _refusal(read_array_image, tmp_path / "img.npy")
        assert error.path == tmp_path / "img.json" and f"'{field}" in error.problem, error


# --- sizes declared before they are allocated ----------------------------------------------------


def test_an_npy_header_that_promises_more_than_the_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "lie.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (40000, 4000)})
        handle.write(b"\x00" * 64)
    assert "declares shape (40000, 4000) (640000000 bytes) but the file holds 64" in \
        _refusal(load_numeric_array, path, ("hu",)).problem


def test_an_npz_member_that_lies_about_its_shape(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "lie.npz"
    np.savez(path, hu=np.zeros((4, 4), np.float32))
    with zipfile.ZipFile(path) as archive:
        member = archive.read("hu.npy").replace(b"(4, 4)", b"(9999999999, 4)")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hu.npy", member)
    assert "over the" in _refusal(load_numeric_array, path, ("hu",)).problem


def test_an_npy_header_that_does_not_parse(tmp_path: Path) -> None:
    """numpy reads the header's dict with Python's tokenizer, which raises TokenError on an open bracket."""
    path = tmp_path / "open.npy"
    np.save(path, np.zeros((4, 4), np.float32))
    data = path.read_bytes()
    path.write_bytes(data.replace(b"(4, 4), }", b"(4, 4,  }", 1).replace(b"}", b" ", 1))
    assert "the npy header cannot be parsed" in _refusal(load_numeric_array, path, ("hu",)).problem


@pytest.fixture()
def unet_prior(tmp_path: Path) -> Path:
    from klviewer.priors import EDMUNetPrior, PriorConfig

    config = PriorConfig(name="t", architecture="edm-unet", image_size=(16, 16),
                         arch={"channels": [8, 16], "emb_dim": 16, "fourier_features": 8, "groups": 4})
    return save_prior(EDMUNetPrior(config), tmp_path / "prior")


def test_a_safetensors_header_larger_than_its_file(unet_prior: Path) -> None:
    weights = unet_prior / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    error = _refusal(load_prior, unet_prior)
    assert error.path == weights and "declares 1099511627776 bytes" in error.problem


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}])
def test_a_safetensors_dtype_that_is_not_a_name(unet_prior: Path, dtype) -> None:
    """Found by the 10,000-input fuzz run: an unhashable dtype raised TypeError."""
    weights = unet_prior / WEIGHTS_FILE
    header = json.dumps({"w": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}).encode()
    weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    error = _refusal(load_prior, unet_prior)
    assert error.path == weights and "has no known dtype" in error.problem


def test_a_config_that_declares_a_huge_network_is_refused_before_it_is_built(unet_prior: Path) -> None:
    doc = json.loads((unet_prior / CONFIG_FILE).read_text())
    doc["arch"]["channels"] = [4096] * 8  # billions of parameters: checked on the meta device, never allocated
    (unet_prior / CONFIG_FILE).write_text(json.dumps(doc))
    assert "do not match the architecture" in _refusal(load_prior, unet_prior).problem
    doc["arch"]["emb_dim"] = 1e300
    (unet_prior / CONFIG_FILE).write_text(json.dumps(doc))
    assert "arch.emb_dim" in _refusal(load_prior, unet_prior).problem
    doc["channels"] = 10**6
    (unet_prior / CONFIG_FILE).write_text(json.dumps(doc))
    assert "'channels'" in _refusal(load_prior, unet_prior).problem


def test_nan_weights_are_refused(unet_prior: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(unet_prior / WEIGHTS_FILE)
    name = next(iter(tensors))
    tensors[name][...] = float("nan")
    save_file(tensors, unet_prior / WEIGHTS_FILE)
    assert f"'{name}' holds NaN" in _refusal(load_prior, unet_prior).problem


def test_the_gaussian_prior_decomposes_only_checked_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from klviewer.priors.gaussian import GaussianPrior

    d = 64
    folder = save_prior(GaussianPrior(torch.zeros(d), 0.5 * torch.eye(d) + 0.01, (1, 8, 8)), tmp_path / "gauss")
    calls = []
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(m.shape) or real_eigh(m))
    assert load_prior(folder).eigvals.shape == (d,) and calls == [(d, d)], "the placeholder is not decomposed"
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS_FILE)
    tensors["cov"][0, 0] = float("inf")
    save_file(tensors, folder / WEIGHTS_FILE)
    calls.clear()
    assert "'cov' holds NaN or infinite" in _refusal(load_prior, folder).problem and calls == []


def test_a_gaussian_prior_recorded_as_h_by_w_takes_the_analysis_images(tmp_path: Path) -> None:
    """The analysis passes (B, C, H, W); a config whose image_shape says (H, W) used to raise ValueError."""
    from klviewer.priors.gaussian import GaussianPrior

    folder = save_prior(GaussianPrior(torch.zeros(64), torch.eye(64), (8, 8)), tmp_path / "gauss")
    x = torch.ones(2, 1, 8, 8)
    assert load_prior(folder).denoise(x, 1.0).shape == x.shape


def test_a_diffusers_prior_never_goes_online(unet_prior: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("diffusers")

    def no_network(*args, **kwargs):
        raise AssertionError("loading a prior opened a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    doc = json.loads((unet_prior / CONFIG_FILE).read_text())
    doc.update(architecture="diffusers-unet2d", arch={"unet": "hf-internal-testing/tiny-unet", "num_train_timesteps": 10})
    (unet_prior / CONFIG_FILE).write_text(json.dumps(doc))
    assert "arch.unet must be the UNet's config as a JSON object" in _refusal(load_prior, unet_prior).problem


# --- files that are not what they seem -----------------------------------------------------------


def test_fifos_links_out_and_link_loops_are_skipped_with_reasons(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    save(ct_dataset(np.zeros((8, 8), np.int16)), folder / "good.dcm")
    os.mkfifo(folder / "pipe.dcm")
    secret = tmp_path / "outside.dcm"
    save(ct_dataset(np.zeros((8, 8), np.int16)), secret)
    os.symlink(secret, folder / "out.dcm")
    os.symlink("loop.dcm", folder / "loop.dcm")
    os.symlink("good.dcm", folder / "inside.dcm")
    catalog = open_paths([folder])
    reasons = {s.path.name: s.reason for s in catalog.skipped}
    assert "FIFO" in reasons["pipe.dcm"]
    assert "outside the input folder" in reasons["out.dcm"] and "loop" in reasons["loop.dcm"]
    assert [s.files for s in catalog.all_series()] == [[folder / "good.dcm"]], "a link inside the folder is the same file"


def test_a_nul_in_a_sidecar_file_name(tmp_path: Path) -> None:
    np.save(tmp_path / "scan.npy", np.zeros((6, 10), np.float32))
    doc = {"klviewer_sinogram": 1, "geometry": "parallel", "angles": {"unit": "deg", "start": 0, "stop": 180, "count": 6},
           "detector": {"count": 10, "spacing_mm": 1.5}, "data": {"kind": "line_integrals", "file": "scan.npy\u0000x"},
           "grid": {"size": [7, 7], "pixel_spacing_mm": 1.5}}
    (tmp_path / "scan.json").write_text(json.dumps(doc))
    assert "NUL character" in _refusal(read_sinogram, tmp_path / "scan.json").problem


def test_a_flood_of_zero_bytes_after_the_dicom_marker_is_refused_at_its_first_element(tmp_path: Path) -> None:
    path = tmp_path / "zeros.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * (8 << 20))
    (skip,) = open_paths([tmp_path]).skipped
    assert "command group" in skip.reason and "zero bytes" in skip.reason
    good = save(ct_dataset(np.zeros((8, 8), np.int16)), tmp_path / "good.dcm").read_bytes()
    pixels = good.index(b"\xe0\x7f\x10\x00")  # zeros in the middle of a dataset, before its Pixel Data
    path.write_bytes(good[:pixels] + b"\x00" * (8 << 20) + good[pixels:])
    (tmp_path / "good.dcm").unlink()
    (skip,) = open_paths([tmp_path]).skipped
    assert "(0000,0000) of the command group inside the dataset" in skip.reason


def test_an_image_too_long_to_pad_to_a_square_is_refused(tmp_path: Path) -> None:
    """65535 x 1 pixels is 128 KiB, but the analysis pads it to a 65535² square (16 GiB)."""
    save(ct_dataset(np.zeros((1, 65535), np.int16)), tmp_path / "dicom" / "strip.dcm")
    (skip,) = open_paths([tmp_path / "dicom"]).skipped
    assert "65535 x 1 pixels: sides must lie in 1..8192" in skip.reason
    np.save(tmp_path / "strip.npy", np.zeros((1, 9000), np.float32))
    assert "sides must lie" in _refusal(read_array_image, tmp_path / "strip.npy").problem


# --- values that are not CT ------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [1e-200, 5e3])
def test_implausible_pixel_spacing_is_refused(tiny_prior: Path, spacing: float) -> None:
    """Found by the fuzz run: a DICOM with PixelSpacing 1e-200 overflowed the resampling filter's width."""
    from klviewer.inference.measurements import prepare_slice
    from klviewer.inference.settings import AnalysisSettings
    from klviewer.io.study import Series, Slice

    series = Series(uid="s", modality="CT", source_kind="array", description="", slices=[Slice(hu=np.zeros((8, 8), np.float32))],
                    pixel_spacing_mm=(spacing, spacing))
    error = _refusal(prepare_slice, series, 0, load_prior(tiny_prior), AnalysisSettings(steps=2), torch.device("cpu"))
    assert "lies outside 0.001..1000 mm" in error.problem


def test_implausible_hu_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "hot.npy", np.full((8, 8), 1.7e38, np.float32))
    assert "are not CT values" in _refusal(read_array_image, tmp_path / "hot.npy").problem
    ds = ct_dataset(np.ones((8, 8), np.int16), slope=1e30)
    save(ds, tmp_path / "dicom" / "hot.dcm")
    (skip,) = open_paths([tmp_path / "dicom"]).skipped
    assert "are not CT values" in skip.reason


def test_a_non_finite_score_is_never_written(tmp_path: Path, tiny_prior: Path) -> None:
    from klviewer.inference.settings import AnalysisSettings
    from klviewer.results.analyze import run_analysis
    from klviewer.results.slice_file import NonFiniteResultError, load_slice_result, write_slice_npz

    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "img.npy", np.zeros((32, 32), np.float32))
    run = run_analysis([tmp_path / "in" / "img.npy"], tmp_path / "results", AnalysisSettings(steps=2, device="cpu"),
                       prior=tiny_prior)
    result = load_slice_result(tmp_path / "results" / run.rows[0]["file"])
    target = tmp_path / "nan.npz"
    with pytest.raises(NonFiniteResultError, match="non-finite score"):
        write_slice_npz(dataclasses.replace(result, score=math.nan), target)
    assert not target.exists()


def test_overwrite_refusals_name_the_option_of_both_callers(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "x")
    with pytest.raises(OutputExistsError) as info:
        atomic_write_text(tmp_path / "a.txt", "y")
    assert "overwrite=True" in str(info.value) and "--overwrite" in str(info.value)


def test_hostile_calibration_and_results_files_are_clean_errors(tmp_path: Path, tiny_prior: Path) -> None:
    import shutil

    from klviewer.inference.calibration import read_calibrations

    prior = Path(shutil.copytree(tiny_prior, tmp_path / "prior"))
    for doc, field in (({"calibrations": [None]}, "calibrations[0]"), ({"calibrations": {}}, "'calibrations'"),
                       ({"calibrations": [{"settings": {}, "threshold": "high"}]}, "calibrations[0].threshold")):
        (prior / "calibration.json").write_text(json.dumps(doc))
        error = _refusal(read_calibrations, prior)
        assert error.path == prior / "calibration.json" and field in error.problem, error
    from klviewer.results.reader import read_results

    row = {"case": "a", "slice_index": 1e300, "score": 1.0, "total_kl": 1.0, "flagged": False, "file": "a/0.npz"}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.json").write_text(json.dumps({"prior": {}, "settings": {}, "rows": [row]}))
    assert "'rows[0].slice_index'" in _refusal(read_results, tmp_path / "results").problem
    # Found by the fuzz run: a case's prior fit that is not an object reached the exporter as a float.
    row["slice_index"] = 1
    for cases, field in ((3.5, "'cases'"), ({"a": 3.5}, "'cases.a'"), ({"a": {"verdict": "fits"}}, "prior_fit")):
        (tmp_path / "results" / "summary.json").write_text(json.dumps({"prior": {}, "settings": {}, "rows": [row],
                                                                       "cases": cases}))
        assert field in _refusal(read_results, tmp_path / "results").problem
