"""The analysis contract: `klviewer analyze` output layout, numbers, and refusals."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PRIOR_SIZE

from klviewer.cli import main
from klviewer.devices import resolve_device
from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.inference.plan import parse_slices
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.safe_write import OutputExistsError
from klviewer.phantoms import make_phantom, save_phantom_npz
from klviewer.results.analyze import run_analysis
from klviewer.results.slice_file import load_slice_result

SIZE = TINY_PRIOR_SIZE


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    save_phantom_npz(make_phantom("healthy", 64, seed=1), folder / "healthy.npz")
    np.save(folder / "stack.npy", np.stack([make_phantom("lesion", SIZE, seed=s).hu for s in (2, 3, 4)]))
    return folder


def test_analyze_writes_the_contract(tiny_prior: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    code = main(["analyze", str(inputs), "--out", str(out), "--prior", str(tiny_prior), "--steps", "6",
                 "--samples", "2", "--patch", "4", "--sigma-window", "0.01", "1", "--seed", "3", "--slices", "0,2", "--quiet"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert [(Path(r["input"]).name, r["slice_index"]) for r in rows] == [("healthy.npz", 0), ("stack.npy", 0), ("stack.npy", 2)]
    assert any("no slice [2]" in s["reason"] for s in summary["skipped"])
    assert summary["prior"]["name"] == "tiny-test" and len(summary["prior"]["sha256"]) == 64
    assert summary["settings"]["steps"] == 6 and summary["settings"]["sigma_window"] == [0.01, 1.0]
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["score"]) for r in table] == pytest.approx([r["score"] for r in rows])
    assert {r["guidance"] for r in table} == {"pigdm"} == {r["guidance"] for r in rows}, "the default guidance, per row"

    result = load_slice_result(out / rows[1]["file"])
    assert result.recon_hu.shape == result.fbp_hu.shape == result.posterior_std_hu.shape == (SIZE, SIZE)
    assert result.energy.energy.shape[1:] == (SIZE, SIZE) and result.energy.samples == 2
    assert result.kl_map.values.shape == (SIZE // 4, SIZE // 4)
    assert result.score == pytest.approx(result.kl_map.values.max()) == pytest.approx(rows[1]["score"], rel=1e-5)
    assert result.total_kl == pytest.approx(result.energy.total((0.01, 1.0)), rel=1e-6)
    assert result.posterior_std_hu.max() > 0, "two samples must give a non-zero spread"
    assert np.isfinite(result.fbp_hu).all()
    healthy = load_slice_result(out / rows[0]["file"])
    assert any("resampled 64x64" in n for n in healthy.notes)
    assert not any(p.is_file() and p.suffix not in (".npz", ".npy", ".json") for p in inputs.rglob("*"))


def test_same_seed_same_bits_and_refusal_to_overwrite(tiny_prior: Path, inputs: Path, tmp_path: Path) -> None:
    settings = AnalysisSettings(steps=5, samples=1, patch=8, seed=7, device="cpu")
    a = run_analysis([inputs / "stack.npy"], tmp_path / "a", settings, prior=tiny_prior, slices="1")
    b = run_analysis([inputs / "stack.npy"], tmp_path / "b", settings, prior=tiny_prior, slices="1")
    ra, rb = (load_slice_result(r.out / r.rows[0]["file"]) for r in (a, b))
    assert np.array_equal(ra.energy.energy, rb.energy.energy) and np.array_equal(ra.kl_map.values, rb.kl_map.values)
    with pytest.raises(OutputExistsError):
        run_analysis([inputs / "stack.npy"], tmp_path / "a", settings, prior=tiny_prior, slices="1")
    with pytest.raises(KlviewerInputError, match="overlaps the input"):
        run_analysis([inputs], inputs / "results", settings, prior=tiny_prior)


def test_bad_prior_nan_input_and_devices(tiny_prior: Path, inputs: Path, tmp_path: Path) -> None:
    (tmp_path / "nan").mkdir()
    bad = tmp_path / "nan" / "bad.npy"
    hu = make_phantom("healthy", SIZE, seed=9).hu
    hu[3, 3] = np.nan
    np.save(bad, hu)
    settings = AnalysisSettings(steps=3, device="cpu")
    with pytest.raises(KlviewerInputError, match="NaN"):
        run_analysis([bad], tmp_path / "o1", settings, prior=tiny_prior)
    with pytest.raises(KlviewerInputError, match="no such prior"):
        run_analysis([inputs], tmp_path / "o2", settings, prior=tmp_path / "missing-prior")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(KlviewerInputError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(KlviewerError, match="CUDA was requested"):
            resolve_device("cuda")


def test_parse_slices() -> None:
    assert parse_slices("all", 4) == ([0, 1, 2, 3], [])
    assert parse_slices("mid", 5) == ([2], [])
    assert parse_slices("0, 2-3,-1", 6) == ([0, 2, 3, 5], [])
    assert parse_slices("1,7", 3) == ([1], [7])
    with pytest.raises(KlviewerInputError):
        parse_slices("a-b", 3)
    with pytest.raises(KlviewerInputError, match="backwards"):
        parse_slices("3-1", 5)


def test_non_square_images_are_padded_not_stretched(tiny_prior: Path) -> None:
    from klviewer.inference.measurements import prepare_slice
    from klviewer.io.study import Series, Slice
    from klviewer.priors import load_prior

    hu = np.full((40, 64), -1000.0, np.float32)
    hu[10:30, 22:42] = 60.0  # a 125 x 125 mm square at 6.25 mm pixels
    series = Series(uid="x", modality="CT", source_kind="array", slices=[Slice(hu=hu)], pixel_spacing_mm=(6.25, 6.25))
    prepared = prepare_slice(series, 0, load_prior(tiny_prior), AnalysisSettings(steps=3), torch.device("cpu"))
    assert prepared.pixel_spacing_mm == pytest.approx(400 / SIZE), "the prior's own pixel spacing"
    assert prepared.grid.scale == (0.5, 0.5) and prepared.grid.target_shape == (SIZE, SIZE)
    inside = prepared.original_hu > -500
    rows, cols = np.nonzero(inside)
    assert np.ptp(rows) == pytest.approx(np.ptp(cols), abs=1), "the square must stay square"
