"""Training: the loss goes down, the output is a loadable prior, resume equals an uninterrupted run."""

from __future__ import annotations

import argparse
import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from klviewer.cli.train import register
from klviewer.devices import DeviceUnavailableError
from klviewer.errors import KlviewerError
from klviewer.priors import load_prior
from klviewer.priors.data import phantom_pool
from klviewer.priors.train import (
    TrainConfig,
    TrainingCancelled,
    TrainingError,
    TrainProgress,
    _new_prior,
    train_prior,
)
from klviewer.priors.unet import ARCH_PRESETS

TINY = dict(size=32, patch=16, batch=8, n_phantoms=4, lr=3e-3, warmup=5, device="cpu", arch=ARCH_PRESETS["tiny"],
            report=False)


def tiny_config(out: Path, **overrides) -> TrainConfig:
    return TrainConfig(out=out, **{**TINY, **overrides})


def eval_loss(prior, images: torch.Tensor) -> float:
    """EDM-weighted denoising loss on fixed noise, so two models are compared on equal terms."""
    gen = torch.Generator().manual_seed(123)
    sigmas = torch.tensor([0.02, 0.1, 0.3, 1.0, 3.0])
    total = 0.0
    with torch.no_grad():
        for s in sigmas.tolist():
            noisy = images + s * torch.randn(images.shape, generator=gen)
            weight = (s**2 + 0.25) / (s * 0.5) ** 2
            total += weight * float(((prior.denoise(noisy, s) - images) ** 2).mean())
    return total / len(sigmas)


def test_cli_training_run_lowers_the_loss_and_writes_a_prior(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "prior"
    args = parser.parse_args(["train", "--out", str(out), "--size", "32", "--patch", "16", "--steps", "30",
                              "--batch", "8", "--n-phantoms", "4", "--lr", "3e-3", "--warmup", "5", "--arch", "tiny",
                              "--device", "cpu", "--checkpoint-every", "10"])
    assert args.func(args) == 0

    prior = load_prior(out)
    cfg = tiny_config(out)
    pool = phantom_pool(4, 32, 0, 0.0, 1000.0)
    untrained = _new_prior(cfg, pool).eval()
    assert eval_loss(prior, pool.images) < 0.8 * eval_loss(untrained, pool.images)

    training = prior.config.training
    # The CLI records its own command line (sys.argv; here that of pytest).
    assert training["steps"] == 30 and training["command"].startswith("klviewer ")
    assert training["data"]["source"] == "phantoms" and len(training["data"]["phantom_seeds"]) == 4
    assert np.isfinite(training["final_loss"]) and training["seconds"] > 0
    assert prior.config.pixel_spacing_mm == pytest.approx(400.0 / 32)
    with open(out / "training" / "loss.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 30
    assert (out / "training" / "loss.png").stat().st_size > 1000
    # The report: held-out denoising error per sigma and a sample grid.
    report = json.loads((out / "training" / "report.json").read_text())
    assert len(report["heldout_seeds"]) == 16
    assert not set(report["heldout_seeds"]) & set(training["data"]["phantom_seeds"])
    assert [r["sigma"] for r in report["denoising_mse"]][:2] == [0.01, 0.02]
    assert (out / "training" / "samples.png").is_file() and "| sigma |" in (out / "TRAINING.md").read_text()


def test_resume_after_cancel_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = load_prior(train_prior(tiny_config(tmp_path / "a", steps=20, checkpoint_every=7)))

    cancel = threading.Event()

    def stop_at_9(p: TrainProgress) -> None:
        if p.step == 9:
            cancel.set()

    cfg = tiny_config(tmp_path / "b", steps=20, checkpoint_every=7)
    with pytest.raises(TrainingCancelled) as info:
        train_prior(cfg, progress=stop_at_9, cancel=cancel)
    assert info.value.step == 9 and not (tmp_path / "b" / "config.json").exists()
    resumed = load_prior(train_prior(tiny_config(tmp_path / "b", steps=20, checkpoint_every=7, resume=True)))

    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert resumed.config.training["steps"] == 20


def test_extending_a_finished_run(tmp_path: Path) -> None:
    out = tmp_path / "p"
    train_prior(tiny_config(out, steps=4, checkpoint_every=2))
    with pytest.raises(KlviewerError, match="already"):
        train_prior(tiny_config(out, steps=4))
    train_prior(tiny_config(out, steps=6, resume=True))
    assert load_prior(out).config.training["steps"] == 6
    with open(out / "training" / "loss.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 6


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    out = tmp_path / "p"
    train_prior(tiny_config(out, steps=2))
    with pytest.raises(TrainingError, match="batch: 8 -> 4"):
        train_prior(tiny_config(out, steps=4, batch=4, resume=True))


def test_training_on_a_folder_of_hu_arrays(tmp_path: Path) -> None:
    data = tmp_path / "slices"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        hu = np.full((40, 48), -1000.0, dtype=np.float32)
        hu[8:32, 8:40] = rng.normal(40, 20, (24, 32))
        np.save(data / f"slice{i}.npy", hu)
    out = train_prior(tiny_config(tmp_path / "p", data=str(data), steps=3))
    prior = load_prior(out)
    assert prior.config.training["data"]["n"] == 2 and prior.config.image_size == (32, 32)


def test_bad_settings_and_devices(tmp_path: Path) -> None:
    assert TrainConfig(out=tmp_path, size=32).patch == 32  # whole images by default
    with pytest.raises(TrainingError, match="patch"):
        tiny_config(tmp_path, patch=64)
    with pytest.raises(TrainingError, match="multiples of 4"):
        tiny_config(tmp_path, patch=18)
    with pytest.raises(KlviewerError, match="must be 'phantoms' or an existing folder"):
        train_prior(tiny_config(tmp_path / "p", data=str(tmp_path / "nowhere")))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="CUDA was requested"):
            train_prior(tiny_config(tmp_path / "c", device="cuda"))


def test_init_from_starts_at_a_saved_prior_and_refuses_another_architecture(tmp_path: Path) -> None:
    first = train_prior(tiny_config(tmp_path / "first", steps=3))
    start = load_prior(first)
    # A vanishing learning rate leaves the weights where they started, so the result must be `first`.
    again = train_prior(tiny_config(tmp_path / "again", steps=1, lr=1e-12, init_from=str(first)))
    continued = load_prior(again)
    for (name, a), (_, b) in zip(start.state_dict().items(), continued.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert continued.config.training["init_from"] == str(first)
    wide = dict(ARCH_PRESETS["tiny"], channels=[16, 32])
    with pytest.raises(KlviewerError, match="missing tensors|wrong shapes"):
        train_prior(tiny_config(tmp_path / "other", steps=1, arch=wide, init_from=str(first)))


def teacher_gap(student, teacher, images: torch.Tensor) -> float:
    """Mean squared difference between two denoisers' outputs on fixed noise, over the loss's sigmas."""
    gen = torch.Generator().manual_seed(7)
    gaps = []
    with torch.no_grad():
        for s in (0.02, 0.1, 0.3, 1.0):
            noisy = images + s * torch.randn(images.shape, generator=gen)
            gaps.append(float(((student.denoise(noisy, s) - teacher.denoise(noisy, s)) ** 2).mean()))
    return float(np.mean(gaps))


def test_distilling_a_prior_moves_a_smaller_network_to_the_teachers_denoiser(tmp_path: Path) -> None:
    teacher_dir = train_prior(tiny_config(tmp_path / "teacher", steps=30))
    teacher = load_prior(teacher_dir)
    small = dict(ARCH_PRESETS["tiny"], channels=[4, 8], groups=2)
    cfg = tiny_config(tmp_path / "student", steps=40, arch=small, distill_from=str(teacher_dir), report=True)
    student = load_prior(train_prior(cfg))
    untrained = _new_prior(cfg, phantom_pool(4, 32, 0, 0.0, 1000.0)).eval()
    on_clean_images = load_prior(train_prior(tiny_config(tmp_path / "plain", steps=40, arch=small)))

    images = phantom_pool(4, 32, 99, 0.0, 1000.0).images
    gap = teacher_gap(student, teacher, images)
    # The same steps on the clean images leave the small network further from the teacher (3x when written).
    assert gap < 0.1 * teacher_gap(untrained, teacher, images)
    assert gap < 0.6 * teacher_gap(on_clean_images, teacher, images)
    assert sum(p.numel() for p in student.parameters()) < 0.5 * sum(p.numel() for p in teacher.parameters())
    assert student.config.training["distill_from"] == str(teacher_dir)
    assert f"distilled from `{teacher_dir}`" in (tmp_path / "student" / "TRAINING.md").read_text()
    with pytest.raises(TrainingError, match="distill_from: .* -> None"):
        train_prior(tiny_config(tmp_path / "student", steps=41, arch=small, resume=True))


def test_distilling_refuses_a_teacher_of_another_image_size(tmp_path: Path) -> None:
    teacher_dir = train_prior(tiny_config(tmp_path / "teacher", steps=1))
    with pytest.raises(TrainingError, match="cannot distil from .*teacher.*image size"):
        train_prior(tiny_config(tmp_path / "student", size=64, patch=16, steps=1, distill_from=str(teacher_dir)))
