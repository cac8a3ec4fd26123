"""Use a local diffusers ``UNet2DModel`` + ``DDPMScheduler`` folder as a klviewer prior.

A DDPM is variance-preserving: ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` with ``a = alphabar_t``.
Dividing by ``sqrt(a)`` gives the VE form ``x_sigma = x0 + sigma eps`` with
``sigma = sqrt((1 - a) / a)``, i.e. ``a = 1 / (1 + sigma^2)``. So for any sigma:
``x_t = sqrt(a) x_sigma``, the timestep is found by interpolating the scheduler's sigma table
(the UNet takes fractional timesteps), and ``D(x_sigma; sigma) = x_sigma - sigma eps(x_t, t)``.

Nothing is downloaded: loading runs with ``HF_HUB_OFFLINE=1`` and ``local_files_only``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.priors.base import Prior, PriorConfig, sigma_column


def _require_diffusers():
    try:
        import diffusers
    except ImportError as exc:
        raise KlviewerError("diffusers priors need the optional 'diffusers' package "
                            "(pip install 'klviewer[diffusers]')") from exc
    return diffusers


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _json_config(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON, without its bookkeeping keys (``_class_name`` etc.)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def sigma_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE noise level of each DDPM timestep (increasing with t)."""
    a = alphas_cumprod.to(torch.float64)
    return torch.sqrt((1 - a) / a)


def timestep_for_sigma(sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Fractional timestep with that noise level: linear in log sigma between table entries, clamped."""
    log_table = torch.log(table)
    log_s = torch.log(sigma.to(torch.float64)).clamp(log_table[0], log_table[-1])
    upper = torch.searchsorted(log_table, log_s).clamp(1, len(table) - 1)
    lo, hi = log_table[upper - 1], log_table[upper]
    frac = ((log_s - lo) / (hi - lo)).clamp(0, 1)
    return upper - 1 + frac


class DiffusersPrior(Prior):
    """An epsilon-prediction UNet2DModel behind the EDM/VE denoiser interface."""

    def __init__(self, config: PriorConfig, unet: torch.nn.Module, alphas_cumprod: torch.Tensor) -> None:
        super().__init__(config)
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64).clone())

    @classmethod
    def from_config(cls, config: PriorConfig) -> DiffusersPrior:
        diffusers = _require_diffusers()
        unet_config, steps = config.arch["unet"], config.arch["num_train_timesteps"]
        # diffusers reads a string as the name of a Hub repository to download: only an inline
        # config (a JSON object) is accepted, and loading runs offline all the same.
        if not isinstance(unet_config, dict):
            raise ValueError(f"arch.unet must be the UNet's config as a JSON object, got {str(unet_config)[:80]}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 100_000:
            raise ValueError(f"arch.num_train_timesteps must be an integer in 2..100000, got {str(steps)[:80]}")
        with _offline():
            unet = diffusers.UNet2DModel.from_config(unet_config)
        return cls(config, unet, torch.linspace(0.999, 0.001, steps, dtype=torch.float64))

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        s = sigma_column(sigma, x)
        table = sigma_table(self.alphas_cumprod)
        t = timestep_for_sigma(s.reshape(-1), table).to(x.dtype)
        x_t = x / torch.sqrt(1 + s**2)
        eps = self.unet(x_t, t).sample
        return x - s * eps.to(x.dtype)


def import_diffusers(folder: str | Path, name: str | None = None, hu_offset: float = 0.0, hu_scale: float = 1000.0,
                     pixel_spacing_mm: float | None = None) -> DiffusersPrior:
    """Wrap a local diffusers folder: either a pipeline folder with ``unet/`` and ``scheduler/``,
    or one folder holding the UNet (config.json + weights) and ``scheduler_config.json``.

    The model is assumed to work on data in [-1, 1]; ``hu_offset``/``hu_scale`` say which HU map
    there (the default, x = HU/1000, maps -1000..1000 HU onto [-1, 1]). Save the result with
    :func:`klviewer.priors.save_prior` to get an ordinary klviewer checkpoint.
    """
    diffusers = _require_diffusers()
    folder = Path(folder)
    if not folder.is_dir():
        raise KlviewerInputError(folder, "not a folder (expected a local diffusers UNet2DModel folder)")
    nested = (folder / "unet").is_dir()
    unet_dir = folder / "unet" if nested else folder
    scheduler_dir = folder / "scheduler" if nested else folder
    try:
        with _offline():
            unet = diffusers.UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
            scheduler = diffusers.DDPMScheduler.from_pretrained(scheduler_dir, local_files_only=True)
    except (OSError, ValueError, EnvironmentError, json.JSONDecodeError) as exc:
        raise KlviewerInputError(folder, f"cannot load a diffusers UNet2DModel + DDPMScheduler from it ({exc})") from exc
    prediction = scheduler.config.prediction_type
    if prediction != "epsilon":
        raise KlviewerInputError(scheduler_dir, f"prediction_type {prediction!r} is not supported; klviewer imports "
                                                f"epsilon-prediction DDPM models only")
    if unet.config.time_embedding_type != "positional":
        raise KlviewerInputError(unet_dir, f"time_embedding_type {unet.config.time_embedding_type!r} is not "
                                           f"supported; a DDPM UNet with positional timestep embedding is expected")
    if unet.config.in_channels != unet.config.out_channels:
        raise KlviewerInputError(unet_dir, "in_channels and out_channels differ; an epsilon model maps an image "
                                           "to noise of the same shape")
    size = unet.config.sample_size
    image_size = (size, size) if isinstance(size, int) else tuple(size)
    table = sigma_table(scheduler.alphas_cumprod)
    config = PriorConfig(
        name=name or folder.name, architecture="diffusers-unet2d", image_size=image_size,
        channels=int(unet.config.in_channels), hu_offset=hu_offset, hu_scale=hu_scale,
        sigma_min=float(table[0]), sigma_max=float(table[-1]), sigma_data=0.5, pixel_spacing_mm=pixel_spacing_mm,
        arch={"unet": _json_config(unet.config), "num_train_timesteps": int(len(table)),
              "prediction_type": prediction, "imported_from": str(folder.resolve())},
    )
    return DiffusersPrior(config, unet, scheduler.alphas_cumprod).eval().requires_grad_(False)
