"""Prior alignment: adapters, the measurement-only loss, provenance, resume, cancel, divergence."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PRIOR_SIZE
from torch import nn

from klviewer.errors import KlviewerInputError
from klviewer.inference.align import (
    AlignCancelled,
    AlignConfig,
    AlignDiverged,
    AlignError,
    AlignProgress,
    FewMeasurementsWarning,
    align_prior,
    sinogram_loss,
    weighted_trace,
)
from klviewer.inference.measurements import ct_measurement_model
from klviewer.io.safe_write import OutputExistsError
from klviewer.phantoms import make_phantom
from klviewer.physics import simulate_measurement
from klviewer.priors import load_prior
from klviewer.priors.adapters import LoRAConv2d, LoRALinear, apply_adapter, merged_state_dict
from klviewer.priors.checkpoint import prior_fingerprint

STEPS = 4


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight phantom slices at the tiny prior's size, as one .npy stack (enough to not warn)."""
    folder = tmp_path_factory.mktemp("study")
    hu = np.stack([make_phantom("healthy", TINY_PRIOR_SIZE, seed).hu for seed in range(8)]).astype(np.float32)
    np.save(folder / "stack.npy", hu)
    return folder


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def quick(tiny_prior: Path, study: Path, out: Path, **kw) -> AlignConfig:
    settings = dict(prior=tiny_prior, inputs=[study], out=out, steps=STEPS, recon_steps=3, views=8, device="cpu",
                    slices="0-7")
    settings.update(kw)
    return AlignConfig(**settings)


def changed_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


# ---- adapters -------------------------------------------------------------------------------------

def test_lora_layers_merge_into_exactly_the_same_function() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    linear = nn.Linear(7, 4)
    lora_conv, lora_linear = LoRAConv2d(conv, rank=2), LoRALinear(linear, rank=3)
    x, v = torch.randn(2, 6, 9, 9), torch.randn(3, 7)
    # up starts at zero: the adapted layer is the base layer until it trains.
    assert torch.equal(lora_conv(x), conv(x))
    for layer in (lora_conv, lora_linear):
        nn.init.normal_(layer.up.weight)
    assert not torch.allclose(lora_conv(x), conv(x))
    torch.testing.assert_close(lora_conv.merged()(x), lora_conv(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_linear.merged()(v), lora_linear(v), rtol=1e-5, atol=1e-5)


def test_apply_adapter_picks_the_trainable_parameters(tiny_prior: Path) -> None:
    total = sum(p.numel() for p in load_prior(tiny_prior).parameters())
    full = apply_adapter(load_prior(tiny_prior), "full")
    assert sum(p.numel() for p in full) == total

    model = load_prior(tiny_prior)
    norm_bias = apply_adapter(model, "norm-bias")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(".bias") or ".norm" in n for n in names)
    assert not any(n.endswith("conv1.weight") for n in names)
    assert sum(p.numel() for p in norm_bias) < 0.1 * total

    model = load_prior(tiny_prior)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora = apply_adapter(model, "lora", rank=2)
    assert all(p.requires_grad for p in lora)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(p.numel() for p in lora)
    # Merging untrained adapters gives back the base weights under the base names.
    merged = merged_state_dict(model)
    assert set(merged) == set(base_state)
    assert not changed_tensors(merged, base_state)


def test_unknown_mode_and_bad_rank_are_refused(tiny_prior: Path) -> None:
    with pytest.raises(KlviewerInputError, match="mode"):
        apply_adapter(load_prior(tiny_prior), "bitfit")
    with pytest.raises(KlviewerInputError, match="rank"):
        apply_adapter(load_prior(tiny_prior), "lora", rank=0)


# ---- the loss -------------------------------------------------------------------------------------

def test_sinogram_loss_reads_as_a_per_pixel_mean_square(tiny_prior: Path) -> None:
    prior = load_prior(tiny_prior)
    phantom = make_phantom("healthy", TINY_PRIOR_SIZE, 3)
    acq = simulate_measurement(phantom.hu, phantom.pixel_spacing_mm, n_views=12)
    model = ct_measurement_model(acq, prior)
    shape = (1, TINY_PRIOR_SIZE, TINY_PRIOR_SIZE)
    trace = weighted_trace(model, shape, probes=64)
    # Hutchinson against the exact trace (the sum of squared entries of W^(1/2) K, column by column).
    basis = torch.eye(TINY_PRIOR_SIZE**2).reshape(-1, *shape)
    exact = float((model.forward(basis) ** 2 / model.variance).sum())
    assert trace == pytest.approx(exact, rel=0.05)

    # The simulation reads HU below -1000 as air, so that is the image the data fit exactly.
    x = prior.hu_to_x(torch.from_numpy(np.maximum(phantom.hu, -1000.0))).reshape(1, *shape)
    assert float(sinogram_loss(model, x, trace)) < 1e-6  # noise-free data: the true image fits exactly
    g = torch.Generator().manual_seed(0)
    losses = [float(sinogram_loss(model, x + 0.1 * torch.randn(x.shape, generator=g), trace)) for _ in range(20)]
    assert np.mean(losses) == pytest.approx(0.01, rel=0.15)


# ---- runs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["norm-bias", "lora", "full"])
def test_alignment_writes_a_new_prior_and_never_touches_the_base(tiny_prior: Path, study: Path, tmp_path: Path,
                                                                  mode: str) -> None:
    before = folder_digest(tiny_prior)
    seen: list[AlignProgress] = []
    out = align_prior(quick(tiny_prior, study, tmp_path / mode, mode=mode, lr=1e-2, command="klviewer align ..."),
                      progress=seen.append)
    assert folder_digest(tiny_prior) == before
    assert [p.step for p in seen if p.stage == "reconstruct"] == list(range(1, 9))
    assert [p.step for p in seen if p.stage == "align"] == list(range(1, STEPS + 1))
    assert all(np.isfinite(p.loss) for p in seen if p.stage == "align")

    base, aligned = load_prior(tiny_prior), load_prior(out)  # an ordinary checkpoint, whatever the mode
    changed = changed_tensors(aligned.state_dict(), base.state_dict())
    if mode == "norm-bias":
        assert changed and all(k.endswith(".bias") or ".norm" in k for k in changed)
    elif mode == "lora":
        assert changed and all(k.endswith(".weight") and ".norm" not in k for k in changed)
    else:
        assert len(changed) > 0.9 * len(base.state_dict())

    training = json.loads((out / "config.json").read_text())["training"]
    assert training["kind"] == "alignment"
    assert training["base_prior"] == {"name": "tiny-test", "path": str(tiny_prior),
                                      "sha256": prior_fingerprint(tiny_prior)}
    assert training["data"]["n_measurements"] == 8
    assert training["data"]["inputs"] == [str(study)]
    assert training["mode"] == mode and training["steps"] == STEPS and training["lr"] == 1e-2
    assert training["loss"]["name"] == "posterior-dsm" and training["data"]["input_image"] == "recon"
    assert training["command"] == "klviewer align ..."
    assert training["stopped"] is None
    assert (out / "alignment" / "loss.csv").read_text().count("\n") == STEPS + 1
    assert aligned.config.image_size == base.config.image_size and aligned.config.name == mode


def test_pinv_images_use_the_sinogram_loss_and_need_no_sampling(tiny_prior: Path, study: Path, tmp_path: Path) -> None:
    seen: list[AlignProgress] = []
    out = align_prior(quick(tiny_prior, study, tmp_path / "pinv", input_image="pinv", steps=2), progress=seen.append)
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["loss"]["name"] == "sinogram-dsm" and training["data"]["recon_steps"] is None
    assert all(np.isfinite(p.loss) for p in seen if p.stage == "align")
    changed = changed_tensors(load_prior(out).state_dict(), load_prior(tiny_prior).state_dict())
    assert changed


def test_same_seed_same_aligned_prior(tiny_prior: Path, study: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)  # the global RNG state must not matter
    first = align_prior(quick(tiny_prior, study, tmp_path / "a", mode="lora", input_image="pinv", steps=2, lr=1e-2))
    torch.manual_seed(456)
    second = align_prior(quick(tiny_prior, study, tmp_path / "b", mode="lora", input_image="pinv", steps=2, lr=1e-2))
    assert not changed_tensors(load_prior(first).state_dict(), load_prior(second).state_dict())
    third = align_prior(quick(tiny_prior, study, tmp_path / "c", mode="lora", input_image="pinv", steps=2, lr=1e-2,
                              seed=1))
    assert changed_tensors(load_prior(first).state_dict(), load_prior(third).state_dict())


def test_cancel_then_resume_ends_where_an_uninterrupted_run_ends(tiny_prior: Path, study: Path, tmp_path: Path) -> None:
    steps = 6
    straight = align_prior(quick(tiny_prior, study, tmp_path / "straight", steps=steps, mode="full", lr=1e-3))

    cancel = threading.Event()

    def progress(p: AlignProgress) -> None:
        if p.stage == "align" and p.step == 3:
            cancel.set()

    out = tmp_path / "interrupted"
    with pytest.raises(AlignCancelled) as info:
        align_prior(quick(tiny_prior, study, out, steps=steps, mode="full", lr=1e-3), progress=progress, cancel=cancel)
    assert info.value.step == 3 and not (out / "config.json").exists()

    seen: list[AlignProgress] = []
    align_prior(quick(tiny_prior, study, out, steps=steps, mode="full", lr=1e-3, resume=True), progress=seen.append)
    # The resumed run reuses the saved input images (no reconstruction) and continues at step 4.
    assert [p.step for p in seen] == [4, 5, 6] and {p.stage for p in seen} == {"align"}
    a, b = load_prior(straight).state_dict(), load_prior(out).state_dict()
    assert not changed_tensors(a, b)
    training = json.loads((out / "config.json").read_text())["training"]
    assert len(training["commands"]) == 2


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_used_folders(tiny_prior: Path, study: Path,
                                                                            tmp_path: Path) -> None:
    out = align_prior(quick(tiny_prior, study, tmp_path / "run"))
    with pytest.raises(OutputExistsError):
        align_prior(quick(tiny_prior, study, out))
    with pytest.raises(AlignError, match="lr"):
        align_prior(quick(tiny_prior, study, out, steps=STEPS + 2, lr=5e-4, resume=True))
    with pytest.raises(KlviewerInputError, match="nothing to resume"):
        align_prior(quick(tiny_prior, study, tmp_path / "never-started", resume=True))


def test_a_diverging_run_stops_and_keeps_the_last_good_weights(tiny_prior: Path, study: Path, tmp_path: Path) -> None:
    out = tmp_path / "diverged"
    with pytest.raises(AlignDiverged) as info:
        align_prior(quick(tiny_prior, study, out, mode="full", lr=1e30, steps=50, ema=0.0))
    assert info.value.step < 50 and "lower --lr" in str(info.value)
    aligned = load_prior(out)
    assert all(bool(torch.isfinite(v).all()) for v in aligned.state_dict().values())
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["steps"] == info.value.step
    assert training["stopped"].startswith(f"diverged at step {info.value.step + 1}")


def test_few_measurements_warn_with_the_count(tiny_prior: Path, study: Path, tmp_path: Path) -> None:
    with pytest.warns(FewMeasurementsWarning, match="only 3 measurement"):
        align_prior(quick(tiny_prior, study, tmp_path / "few", slices="0-2", steps=1))


def test_outputs_inside_the_base_prior_or_the_inputs_are_refused(tiny_prior: Path, study: Path) -> None:
    before = folder_digest(tiny_prior)
    for out in (tiny_prior, tiny_prior / "aligned", study / "aligned"):
        with pytest.raises(KlviewerInputError, match="outside|overlaps"):
            align_prior(quick(tiny_prior, study, out))
    assert folder_digest(tiny_prior) == before
    assert not (study / "aligned").exists()


def test_invalid_settings_are_refused_before_any_work(tiny_prior: Path, study: Path, tmp_path: Path) -> None:
    with pytest.raises(AlignError, match="mode"):
        quick(tiny_prior, study, tmp_path / "x", mode="bitfit")
    with pytest.raises(AlignError, match="either dose_i0 or noise_sigma"):
        quick(tiny_prior, study, tmp_path / "x", dose_i0=1e4, noise_sigma=0.01)
    with pytest.raises(AlignError, match="steps"):
        quick(tiny_prior, study, tmp_path / "x", steps=0)
