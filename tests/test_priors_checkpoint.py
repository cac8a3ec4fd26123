"""Prior checkpoints: round trips, name resolution, and every way a checkpoint can be broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_priors_base import tiny_unet

from klviewer.errors import KlviewerInputError
from klviewer.io.safe_write import OutputExistsError
from klviewer.priors import GaussianMixturePrior, GaussianPrior, list_priors, load_prior, save_prior
from klviewer.priors.checkpoint import CONFIG_FILE, WEIGHTS_FILE, resources_dir


@pytest.fixture
def unet_folder(tmp_path: Path) -> Path:
    return save_prior(tiny_unet(seed=3), tmp_path / "unet")


def _same_prior(a, b, x: torch.Tensor, sigma) -> None:
    """Identical weights, and outputs equal to float32 rounding (a loaded prior's convolutions run
    channels-last on the CPU, which sums in another order)."""
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.no_grad():
        torch.testing.assert_close(a.denoise(x, sigma), b.denoise(x, sigma), rtol=1e-5, atol=1e-5)


def test_unet_round_trip_gives_the_same_prior(unet_folder: Path) -> None:
    original = tiny_unet(seed=3)
    loaded = load_prior(unet_folder)
    assert loaded.config == original.config
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    _same_prior(loaded, original, torch.randn(2, 1, 32, 32), torch.tensor([0.1, 3.0]))
    assert not (unet_folder / WEIGHTS_FILE).read_bytes().startswith(b"\x80")  # no pickle


def test_a_prior_loaded_on_the_cpu_keeps_its_convolutions_channels_last_and_saves_them_contiguous(
        unet_folder: Path, tmp_path: Path) -> None:
    loaded = load_prior(unet_folder, device="cpu")
    kernels = [p for p in loaded.parameters() if p.dim() == 4]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert any(not p.is_contiguous() for p in kernels)
    again = save_prior(loaded, tmp_path / "again")
    assert _safetensors_parts(again / WEIGHTS_FILE) == _safetensors_parts(unet_folder / WEIGHTS_FILE)


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header, tensor bytes) of a safetensors file; the header as a dict, because safetensors writes
    its metadata keys in an order that changes from one save to the next."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_gaussian_and_mixture_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    gaussian = GaussianPrior(torch.randn(4, generator=g), a @ a.T + 0.1 * torch.eye(4), (4,), name="g")
    mixture = GaussianMixturePrior(torch.tensor([1.0, 3.0]), torch.randn(2, 4, generator=g),
                                   torch.stack([a @ a.T + torch.eye(4), torch.eye(4)]), (4,), name="m")
    x = torch.randn(3, 4, dtype=torch.float64)
    for prior in (gaussian, mixture):
        loaded = load_prior(save_prior(prior, tmp_path / prior.config.name))
        assert type(loaded) is type(prior)
        assert torch.allclose(loaded.denoise(x, 0.3), prior.denoise(x, 0.3), atol=1e-12)
        assert torch.allclose(loaded.log_prob(x, 0.3), prior.log_prob(x, 0.3), atol=1e-12)


def test_save_refuses_to_overwrite_unless_asked(unet_folder: Path) -> None:
    with pytest.raises(OutputExistsError):
        save_prior(tiny_unet(seed=4), unet_folder)
    save_prior(tiny_unet(seed=4), unet_folder, overwrite=True)
    _same_prior(load_prior(unet_folder), tiny_unet(seed=4), torch.randn(1, 1, 32, 32), 0.5)
    assert sorted(p.name for p in unet_folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files left


def test_bare_names_resolve_in_the_resources_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLVIEWER_RESOURCES", str(tmp_path))
    assert resources_dir() == tmp_path and list_priors() == []
    save_prior(tiny_unet(), tmp_path / "priors" / "my-prior")
    (tmp_path / "priors" / "not-a-prior").mkdir()
    assert list_priors() == ["my-prior"]
    assert load_prior("my-prior").config.name == "tiny"
    with pytest.raises(KlviewerInputError, match="shipped: my-prior"):
        load_prior("other-prior")


def test_a_file_is_not_a_prior(unet_folder: Path) -> None:
    with pytest.raises(KlviewerInputError, match="not a file"):
        load_prior(unet_folder / WEIGHTS_FILE)


def _expect(path: Path, message: str, folder: Path) -> None:
    with pytest.raises(KlviewerInputError, match=message) as info:
        load_prior(folder)
    assert info.value.path == path, f"error should name {path}, named {info.value.path}"


def test_missing_files(unet_folder: Path) -> None:
    (unet_folder / WEIGHTS_FILE).unlink()
    _expect(unet_folder / WEIGHTS_FILE, "missing", unet_folder)
    (unet_folder / CONFIG_FILE).unlink()
    _expect(unet_folder / CONFIG_FILE, "missing", unet_folder)


def test_malformed_config(unet_folder: Path) -> None:
    config = unet_folder / CONFIG_FILE
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    _expect(config, "not valid JSON", unet_folder)
    doc = json.loads(text)
    doc["architecture"] = "vit"
    config.write_text(json.dumps(doc))
    _expect(config, "unknown architecture 'vit'", unet_folder)
    doc = json.loads(text)
    doc["arch"]["channels"] = "many"
    config.write_text(json.dumps(doc))
    _expect(config, "cannot build", unet_folder)


def test_truncated_and_corrupt_weights(unet_folder: Path) -> None:
    weights = unet_folder / WEIGHTS_FILE
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    _expect(weights, "truncated or corrupt", unet_folder)
    weights.write_bytes(b"\x00" * 64)
    _expect(weights, "truncated or corrupt", unet_folder)
    weights.write_bytes(b"")
    _expect(weights, "truncated or corrupt", unet_folder)


def test_missing_and_extra_tensors(unet_folder: Path) -> None:
    weights = unet_folder / WEIGHTS_FILE
    tensors = tiny_unet().state_dict()
    dropped = dict(tensors)
    dropped.pop("net.conv_in.weight")
    dropped["net.surprise"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in dropped.items()}, str(weights))
    with pytest.raises(KlviewerInputError, match=r"missing tensors: net\.conv_in\.weight.*unexpected tensors: "
                                                 r"net\.surprise") as info:
        load_prior(unet_folder)
    assert info.value.path == weights


def test_weights_of_another_architecture(tmp_path: Path) -> None:
    """config.json says one network; model.safetensors holds another (wider) one."""
    folder = save_prior(tiny_unet(), tmp_path / "a")
    wider = tiny_unet(channels=[8, 24])
    save_file({k: v.contiguous() for k, v in wider.state_dict().items()}, str(folder / WEIGHTS_FILE))
    with pytest.raises(KlviewerInputError, match="wrong shapes") as info:
        load_prior(folder)
    assert info.value.path == folder / WEIGHTS_FILE
    # Gaussian weights behind a UNet config: nothing matches.
    save_file({"mean": torch.zeros(4), "cov": torch.eye(4)}, str(folder / WEIGHTS_FILE))
    _expect(folder / WEIGHTS_FILE, "missing tensors", folder)


def test_shipped_default_prior_loads_and_denoises_a_phantom() -> None:
    from klviewer.phantoms import make_phantom
    from klviewer.priors import DEFAULT_PRIOR

    assert DEFAULT_PRIOR in list_priors()
    prior = load_prior(DEFAULT_PRIOR)
    assert prior.config.image_size == (256, 256) and prior.config.hu_scale == 1000.0
    x0 = torch.from_numpy(prior.hu_to_x(make_phantom("healthy", 256, seed=123).hu))[None, None].float()
    sigma = 0.1
    noisy = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mse = float(((prior.denoise(noisy, sigma) - x0) ** 2).mean())
    assert mse < 0.2 * sigma**2  # the held-out report says about 0.05 sigma^2 here
