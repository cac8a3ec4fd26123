"""Import of local diffusers UNet2DModel + DDPMScheduler folders as sigma-parameterised priors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from klviewer.errors import KlviewerInputError  # noqa: E402
from klviewer.priors import load_prior, save_prior  # noqa: E402
from klviewer.priors.diffusers_import import (  # noqa: E402
    DiffusersPrior,
    import_diffusers,
    sigma_table,
    timestep_for_sigma,
)


def tiny_ddpm(folder: Path, prediction_type: str = "epsilon", nested: bool = False) -> Path:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    unet.save_pretrained(folder / "unet" if nested else folder)
    scheduler.save_pretrained(folder / "scheduler" if nested else folder)
    return folder


def test_denoiser_matches_a_manual_ddpm_computation(tmp_path: Path) -> None:
    prior = import_diffusers(tiny_ddpm(tmp_path / "ddpm"), hu_offset=-200.0, hu_scale=800.0)
    assert isinstance(prior, DiffusersPrior)
    assert prior.config.architecture == "diffusers-unet2d" and prior.config.hu_offset == -200.0
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "ddpm")
    abar = diffusers.DDPMScheduler.from_pretrained(tmp_path / "ddpm").alphas_cumprod.double()
    x = torch.randn(2, 1, 16, 16)
    for t in (0, 37, 500, 999):
        sigma = float(torch.sqrt((1 - abar[t]) / abar[t]))
        with torch.no_grad():
            eps = unet(x * abar[t].sqrt().float(), torch.tensor([float(t)] * 2)).sample
            got = prior.denoise(x, sigma)
        # Compare the implied noise estimate: D - x is eps scaled by sigma (up to 157 here).
        assert torch.allclose((x - got) / sigma, eps, atol=1e-5), t
    assert prior.config.sigma_min == pytest.approx(float(torch.sqrt((1 - abar[0]) / abar[0])))


def test_timesteps_interpolate_between_table_entries() -> None:
    abar = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    table = sigma_table(abar)
    t = timestep_for_sigma(table[[3, 400]], table)
    assert torch.allclose(t, torch.tensor([3.0, 400.0], dtype=torch.float64))
    mid = torch.sqrt(table[10] * table[11])  # halfway in log sigma
    assert float(timestep_for_sigma(mid[None], table)) == pytest.approx(10.5, abs=1e-9)
    # Outside the trained range the timestep is clamped to the ends.
    assert timestep_for_sigma(torch.tensor([1e-6, 1e6]), table).tolist() == [0.0, 999.0]


def test_nested_pipeline_folder_and_round_trip(tmp_path: Path) -> None:
    prior = import_diffusers(tiny_ddpm(tmp_path / "pipe", nested=True), name="tiny-ddpm")
    folder = save_prior(prior, tmp_path / "converted")
    loaded = load_prior(folder)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        # A module rebuilt from its config may pick other CPU kernels: equal to float32 rounding.
        assert torch.allclose(loaded.denoise(x, 0.7), prior.denoise(x, 0.7), atol=1e-5)
    assert loaded.config.name == "tiny-ddpm"


def test_other_prediction_types_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KlviewerInputError, match="prediction_type 'v_prediction'"):
        import_diffusers(tiny_ddpm(tmp_path / "v", prediction_type="v_prediction"))


def test_unloadable_folders_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(KlviewerInputError, match="not a folder"):
        import_diffusers(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KlviewerInputError, match="cannot load") as info:
        import_diffusers(tmp_path / "empty")
    assert info.value.path == tmp_path / "empty"
