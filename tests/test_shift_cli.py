"""`klviewer shift`: ranking priors from CT inputs, the JSON report and plot, and refused outputs."""

import argparse
import json

import numpy as np
import pytest
import torch

from klviewer.cli import shift as shift_cli
from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.io.safe_write import OutputExistsError
from klviewer.priors import save_prior
from klviewer.priors.gaussian import GaussianPrior

SIZE = 16


def stationary(length: float, amp: float, mean: float, name: str, n: int = SIZE) -> GaussianPrior:
    f = torch.fft.fftfreq(n, dtype=torch.float64)
    kernel = torch.fft.ifft2(amp**2 * torch.exp(-20 * length**2 * (f[:, None] ** 2 + f[None, :] ** 2)) + 1e-3).real
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    r, c = rows.flatten(), cols.flatten()
    cov = kernel[(r[:, None] - r[None]) % n, (c[:, None] - c[None]) % n]
    return GaussianPrior(torch.full((n * n,), mean, dtype=torch.float64), cov, (1, n, n), name=name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shift-cli")
    priors = {"truth": stationary(2.0, 0.1, 0.0, "truth"), "near": stationary(1.8, 0.11, 0.01, "near"),
              "far": stationary(1.0, 0.2, 0.05, "far"), "small": stationary(1.0, 0.1, 0.0, "small", n=8)}
    paths = {k: str(save_prior(v, root / "priors" / k)) for k, v in priors.items()}
    data = root / "study"
    data.mkdir()
    hu = (priors["truth"].sample(4, torch.Generator().manual_seed(0))[:, 0] * 1000).numpy().astype(np.float32)
    np.save(data / "slices.npy", hu)
    return root, data, paths


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="klviewer")
    shift_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


FAST = ["--sigma-points", "12", "--sigma-range", "0.001", "80", "--views", "8", "--quiet", "--device", "cpu"]


def test_ranks_against_a_reference_and_writes_report_and_plot(setup, capsys, tmp_path):
    _, data, paths = setup
    out, plot = tmp_path / "shift.json", tmp_path / "shift.png"
    rc = run(["shift", str(data), "--ref", paths["truth"], "--prior", paths["far"], "--prior", paths["near"],
              "--out", str(out), "--plot", str(plot), *FAST])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["criterion"] == "measurement-kl"
    assert report["reference"]["name"] == "truth" and len(report["reference"]["sha256"]) == 64
    assert [r["name"] for r in report["ranks"]] == ["near", "far"]
    assert 0 < report["ranks"][0]["score"] < report["ranks"][1]["score"]
    curve = report["ranks"][1]["curve"]
    assert len(curve["sigmas"]) == 12 and curve["total"] == curve["cumulative"][-1]
    assert curve["operator"] == "ct" and curve["n"] == 4
    assert set(report["ranks"][0]["totals"]) == {"derived", "paper", "ring", "unweighted"}
    assert len(report["measurements"]) == 4 and report["settings"]["views"] == 8
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line[:1].isdigit()]
    assert table[0].split()[1] == "near" and table[1].split()[1] == "far"
    assert sorted(p.name for p in data.iterdir()) == ["slices.npy"]  # nothing written into the input folder


def test_without_reference_ranks_by_denoising_fit(setup, capsys):
    _, data, paths = setup
    assert run(["shift", str(data), "--prior", paths["far"], "--prior", paths["truth"], "--prior", paths["near"], *FAST]) == 0
    text = capsys.readouterr().out
    assert "denoising fit" in text
    table = [line.split()[1] for line in text.splitlines() if line[:1].isdigit()]
    assert table == ["truth", "near", "far"]


def test_outputs_inside_inputs_or_existing_files_are_refused(setup, tmp_path):
    _, data, paths = setup
    with pytest.raises(KlviewerInputError, match="overlaps the input"):
        run(["shift", str(data), "--prior", paths["near"], "--out", str(data / "r.json"), *FAST])
    existing = tmp_path / "r.json"
    existing.write_text("{}")
    with pytest.raises(OutputExistsError):
        run(["shift", str(data), "--prior", paths["near"], "--out", str(existing), *FAST])
    assert existing.read_text() == "{}"
    assert run(["shift", str(data), "--prior", paths["near"], "--out", str(existing), "--overwrite", *FAST]) == 0
    assert json.loads(existing.read_text())["criterion"] == "denoising-fit"


def test_priors_on_different_grids_are_refused(setup):
    _, data, paths = setup
    with pytest.raises(KlviewerError, match="cannot be compared"):
        run(["shift", str(data), "--ref", paths["truth"], "--prior", paths["small"], *FAST])


def test_bad_arguments(setup):
    _, data, paths = setup
    with pytest.raises(SystemExit):
        run(["shift", str(data)])  # --prior is required
    with pytest.raises(SystemExit):
        run(["shift", str(data), "--prior", paths["near"], "--dose", "1e4", "--noise", "0.01"])
    with pytest.raises(KlviewerInputError, match="increasing"):
        run(["shift", str(data), "--prior", paths["near"], "--quiet", "--sigma-range", "1", "0.5"])
