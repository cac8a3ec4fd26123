"""Prior interface: config JSON, EDM preconditioning identities, the UNet's shape handling."""

from __future__ import annotations

import json

import pytest
import torch

from klviewer.errors import KlviewerInputError
from klviewer.priors import PriorConfig
from klviewer.priors.unet import ARCH_PRESETS, EDMUNetPrior, edm_coefficients, position_grid


def tiny_unet(size: int = 32, seed: int = 0, **overrides) -> EDMUNetPrior:
    torch.manual_seed(seed)
    config = PriorConfig(name="tiny", architecture="edm-unet", image_size=(size, size),
                         arch={**ARCH_PRESETS["tiny"], **overrides})
    prior = EDMUNetPrior(config).eval()
    # The output layer starts at zero (so training starts from D = c_skip x); randomise it so the
    # identities below are tested with a network that actually contributes.
    torch.nn.init.normal_(prior.net.conv_out.weight, std=0.5)
    torch.nn.init.normal_(prior.net.conv_out.bias, std=0.5)
    return prior


def test_config_json_round_trip() -> None:
    config = PriorConfig(name="p", architecture="gaussian", image_size=(16, 8), channels=1, hu_offset=-1000,
                         hu_scale=500, pixel_spacing_mm=0.7, arch={"image_shape": [1, 16, 8]},
                         training={"steps": 3})
    again = PriorConfig.from_json(config.to_json())
    assert again == config
    assert again.image_size == (16, 8)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(architecture="transformer"), "unknown architecture"),
        (lambda d: d.pop("image_size"), "image_size"),
        (lambda d: d.pop("format"), "not a klviewer prior config"),
        (lambda d: d.update(format_version=99), "version 99"),
        (lambda d: d.update(surprise=1), "unknown field"),
        (lambda d: d.update(sigma_min=5.0, sigma_max=1.0), "sigma_min"),
        (lambda d: d.update(image_size=[3]), "image_size"),
        (lambda d: d.update(hu_scale=0), "hu_scale"),
    ],
)
def test_config_validation_names_the_file(edit, message: str) -> None:
    doc = json.loads(PriorConfig(name="p", architecture="edm-unet", image_size=(8, 8)).to_json())
    edit(doc)
    with pytest.raises(KlviewerInputError, match=message) as info:
        PriorConfig.from_json(json.dumps(doc), source="some/config.json")
    assert str(info.value).startswith("some/config.json")


def test_malformed_json_is_an_input_error() -> None:
    with pytest.raises(KlviewerInputError, match="not valid JSON"):
        PriorConfig.from_json("{name: ", source="c.json")


def test_edm_coefficients_limits() -> None:
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor([1e-8, 1.0, 1e4], dtype=torch.float64), sd)
    assert c_skip[0] == pytest.approx(1.0) and c_out[0] == pytest.approx(0.0, abs=1e-7)
    assert c_skip[2] == pytest.approx(0.0, abs=1e-8) and c_out[2] == pytest.approx(sd, rel=1e-6)
    # Unit-variance network input at every sigma for data of variance sd^2.
    assert c_in[1] == pytest.approx(1 / (1 + sd**2) ** 0.5)
    assert c_noise[1] == pytest.approx(0.0)
    # EDM's design: the network's training target (x0 - c_skip (x0 + n)) / c_out has unit variance
    # when x0 has variance sd^2, at every sigma.
    for s in (0.01, 0.3, 7.0):
        cs, co, _, _ = edm_coefficients(torch.tensor(s, dtype=torch.float64), sd)
        assert float(((1 - cs) ** 2 * sd**2 + cs**2 * s**2) / co**2) == pytest.approx(1.0)


def test_denoiser_tends_to_identity_at_small_sigma() -> None:
    prior = tiny_unet()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        err = {s: float((prior.denoise(x, s) - x).abs().max()) for s in (1e-4, 1e-6, 1.0)}
    # c_out ~ sigma, so the network's contribution shrinks linearly with sigma, whatever it outputs.
    assert err[1e-6] < 1e-3 and err[1e-6] < err[1e-4] / 30
    assert err[1.0] > 1e-2


def test_zero_network_gives_c_skip_times_x() -> None:
    prior = tiny_unet()
    torch.nn.init.zeros_(prior.net.conv_out.weight)
    torch.nn.init.zeros_(prior.net.conv_out.bias)
    x = torch.randn(1, 1, 32, 32)
    s = 0.7
    with torch.no_grad():
        assert torch.allclose(prior.denoise(x, s), x * 0.25 / (s**2 + 0.25), atol=1e-6)


def test_score_is_tweedie() -> None:
    prior = tiny_unet()
    x = torch.randn(2, 1, 32, 32)
    sigma = torch.tensor([0.2, 1.5])
    with torch.no_grad():
        expected = (prior.denoise(x, sigma) - x) / sigma[:, None, None, None] ** 2
        assert torch.allclose(prior.score(x, sigma), expected)


def test_sigma_tensor_matches_per_item_calls() -> None:
    prior = tiny_unet()
    x = torch.randn(3, 1, 32, 32)
    sigma = torch.tensor([0.05, 0.5, 5.0])
    with torch.no_grad():
        batched = prior.denoise(x, sigma)
        single = torch.cat([prior.denoise(x[i:i + 1], float(sigma[i])) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_sizes_not_divisible_are_padded_and_cropped() -> None:
    prior = tiny_unet()
    assert prior.multiple == 4
    x = torch.randn(2, 1, 30, 37)
    with torch.no_grad():
        out = prior.denoise(x, 0.3)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_full_image_positions_match_training_patches() -> None:
    full = position_grid((8, 8), 0, 0, 8, 8)
    patch = position_grid((8, 8), 2, 4, 4, 4)
    assert torch.equal(full[:, 2:6, 4:8], patch)
    assert full[0, 0, 0] == pytest.approx(-1 + 1 / 8) and full[1, 0, -1] == pytest.approx(1 - 1 / 8)


def test_input_gradients_flow_through_the_denoiser() -> None:
    prior = tiny_unet().requires_grad_(False)
    x = torch.randn(1, 1, 32, 32, requires_grad=True)
    prior.denoise(x, 0.1).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_hu_mapping_comes_from_the_config() -> None:
    config = PriorConfig(name="p", architecture="edm-unet", image_size=(32, 32), hu_offset=-1000.0, hu_scale=2000.0,
                         arch=ARCH_PRESETS["tiny"])
    prior = EDMUNetPrior(config)
    hu = torch.tensor([-1000.0, 0.0, 1000.0])
    assert torch.allclose(prior.hu_to_x(hu), torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(prior.x_to_hu(prior.hu_to_x(hu)), hu)


def test_optional_attention_and_no_position_channels() -> None:
    x = torch.randn(2, 1, 32, 32)
    for overrides in ({"attention": True}, {"pos_channels": 0, "stem": 1}):
        prior = tiny_unet(**overrides)
        with torch.no_grad():
            out = prior.denoise(x, 0.5)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_group_norm_runs_in_float32_under_autocast() -> None:
    """Under the CPU's bfloat16 autocast the norm is computed in float32 and handed back in bfloat16;
    outside autocast it is nn.GroupNorm; its parameters keep nn.GroupNorm's names, so checkpoints load."""
    from klviewer.priors.unet import FloatGroupNorm

    torch.manual_seed(0)
    norm, plain = FloatGroupNorm(4, 8), torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    plain.load_state_dict(norm.state_dict())
    x = torch.randn(2, 8, 6, 6) * 3 + 1
    torch.testing.assert_close(norm(x), plain(x), rtol=0, atol=0)
    low = x.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(low)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, plain(low.detach().float()).bfloat16(), rtol=0, atol=0)
    out.float().square().sum().backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32
    assert all(isinstance(m, FloatGroupNorm) for m in tiny_unet().modules() if isinstance(m, torch.nn.GroupNorm))
