"""`klviewer align` and `klviewer compare` through their argument parsers."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PRIOR_SIZE

from klviewer.cli import align, compare
from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.inference.align import AlignCancelled
from klviewer.phantoms import make_phantom
from klviewer.priors import EDMUNetPrior, PriorConfig, load_prior, save_prior


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="klviewer")
    commands = parser.add_subparsers(dest="command")
    align.register(commands)
    compare.register(commands)
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli-study")
    hu = np.stack([make_phantom("healthy", TINY_PRIOR_SIZE, seed).hu for seed in (11, 12, 13)]).astype(np.float32)
    np.save(folder / "trio.npy", hu)
    return folder


def test_align_writes_a_prior_records_the_command_and_warns_about_few_measurements(
        tiny_prior: Path, study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "aligned"
    argv = ["align", "--prior", str(tiny_prior), str(study), "--out", str(out), "--mode", "lora", "--steps", "3",
            "--recon-steps", "3", "--views", "8", "--noise", "0.01", "--device", "cpu", "--lora-rank", "2"]
    assert run(argv) == 0
    captured = capsys.readouterr()
    assert "klviewer: warning: aligning on only 3 measurement(s)" in captured.err
    assert f"aligned prior written to {out}" in captured.out
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["mode"] == "lora" and training["lora_rank"] == 2 and training["steps"] == 3
    assert training["data"]["noise_sigma"] == 0.01 and training["data"]["views"] == 8
    assert training["command"].startswith("klviewer ")
    assert load_prior(out).config.image_size == (TINY_PRIOR_SIZE, TINY_PRIOR_SIZE)

    # Longer with --resume: continues from step 3 instead of starting again.
    assert run([*argv[:argv.index("--steps") + 1], "5", *argv[argv.index("--steps") + 2:], "--resume"]) == 0
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 5
    with pytest.raises(KlviewerError, match="already exists"):
        run(argv)


def test_align_rejects_bad_options(tiny_prior: Path, study: Path, tmp_path: Path) -> None:
    base = ["align", "--prior", str(tiny_prior), str(study), "--out", str(tmp_path / "x")]
    for extra in (["--mode", "bitfit"], ["--steps", "0"], ["--ema", "1.5"], ["--dose", "1e4", "--noise", "0.1"]):
        with pytest.raises(SystemExit):
            run(base + extra)


def test_compare_prints_a_per_case_table_and_writes_the_folder(
        tiny_prior: Path, study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", str(study), "--before", str(tiny_prior), "--after", str(tiny_prior), "--ref", str(tiny_prior),
            "--out", str(out), "--steps", "3", "--views", "8", "--slices", "0,2", "--device", "cpu", "--quiet"]
    assert run(argv) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("case"))
    assert all(label in header for label in ("PSNR dB", "SSIM", "score", "total KL", "DC resid"))
    rows = [line for line in lines if line.startswith("trio.npy")]
    assert [row.split()[1] for row in rows] == ["0", "2"]
    assert any(line.startswith("mean") for line in lines)
    assert "measurement-domain KL vs reference tiny-test: 0 -> 0 nats" in text
    doc = json.loads((out / "comparison.json").read_text())
    assert len(doc["cases"]) == 2 and (out / "shift_kl.png").is_file()
    # The same prior twice: every row reads "x -> x".
    for row in rows:
        for cell in row.split("  ")[2:]:
            if "->" in cell:
                left, right = (part.strip() for part in cell.split("->"))
                assert left == right

    with pytest.raises(KlviewerError, match="already exists"):
        run(argv)
    assert run([*argv, "--overwrite"]) == 0


def test_compare_refuses_priors_on_different_grids(tiny_prior: Path, study: Path, tmp_path: Path) -> None:
    config = PriorConfig(name="big", architecture="edm-unet", image_size=(64, 64),
                         arch={"channels": [8, 16], "emb_dim": 16, "fourier_features": 8, "groups": 4})
    big = save_prior(EDMUNetPrior(config), tmp_path / "big")
    with pytest.raises(KlviewerInputError, match="image size 1x32x32 vs 1x64x64"):
        run(["compare", str(study), "--before", str(tiny_prior), "--after", str(big), "--out", str(tmp_path / "o"),
             "--steps", "2", "--device", "cpu", "--quiet"])
    assert not (tmp_path / "o").exists()


def test_ctrl_c_cancels_the_alignment_with_a_resume_checkpoint(tiny_prior: Path, study: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import klviewer.inference.align as align_module

    real = align_module.align_prior

    def interrupted_at_step_2(cfg, progress=None, cancel=None):
        def relay(p):
            progress(p)
            if p.stage == "align" and p.step == 2:
                signal.raise_signal(signal.SIGINT)
        return real(cfg, progress=relay, cancel=cancel)

    monkeypatch.setattr(align_module, "align_prior", interrupted_at_step_2)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "interrupted"
    with pytest.raises(AlignCancelled) as info:
        run(["align", "--prior", str(tiny_prior), str(study), "--out", str(out), "--steps", "5", "--input-image", "pinv",
             "--views", "8", "--device", "cpu", "--quiet"])
    assert info.value.step == 2
    assert json.loads((out / "resume" / "state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before
