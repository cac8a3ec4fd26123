import json
from pathlib import Path

import numpy as np
import pytest

from klviewer.cli import main
from klviewer.demo import demo_dir, ensure_demo_study
from klviewer.io.loader import open_images
from klviewer.phantoms import make_phantom_set


def test_phantoms_dicom_reads_back_identically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "set"
    assert main(["phantoms", "--out", str(out), "-n", "3", "--kind", "lesion", "--size", "64", "--seed", "7", "--dicom"]) == 0
    expected = make_phantom_set("lesion", 3, size=64, seed=7)
    series = open_images([out / "dicom"]).all_series()
    assert len(series) == 1 and series[0].n_slices == 3
    np.testing.assert_array_equal(series[0].volume(), np.stack([p.hu for p in expected]))
    assert series[0].pixel_spacing_mm == pytest.approx((400 / 64, 400 / 64))
    truth = np.load(out / "ground_truth.npz")
    np.testing.assert_array_equal(truth["ood_mask"], np.stack([p.ood_mask for p in expected]))
    manifest = json.loads((out / "phantoms.json").read_text())
    assert [e["seed"] for e in manifest["phantoms"]] == [p.seed for p in expected]

    capsys.readouterr()
    assert main(["info", "--json", str(out / "dicom")]) == 0
    info = json.loads(capsys.readouterr().out)
    s = info["patients"][0]["studies"][0]["series"][0]
    lo, hi = float(min(p.hu.min() for p in expected)), float(max(p.hu.max() for p in expected))
    assert s["slices"] == 3 and s["hu_range"] == [lo, hi]


def test_phantoms_npz_and_refusal_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "npz"
    assert main(["phantoms", "--out", str(out), "-n", "2", "--kind", "mixed", "--size", "64"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["phantom_0000.npz", "phantom_0001.npz", "phantoms.json"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["phantoms", "--out", str(out), "-n", "2", "--kind", "healthy", "--size", "64"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["phantoms", "--out", str(tmp_path / "x"), "-n", "0"]) == 2


def test_demo_study_is_made_once_in_the_cache() -> None:
    folder = ensure_demo_study()
    assert folder.is_relative_to(demo_dir())
    series = open_images([folder]).all_series()
    assert len(series) == 1 and series[0].n_slices == 8 and series[0].image_shape == (256, 256)
    truth = np.load(folder.parent / "ground_truth.npz")
    assert truth["ood_mask"][:4].sum() == 0 and all(m.sum() > 0 for m in truth["ood_mask"][4:])
    stamp = (folder / "IM0001.dcm").stat().st_mtime_ns
    assert ensure_demo_study() == folder
    assert (folder / "IM0001.dcm").stat().st_mtime_ns == stamp
