"""The Prior interface every diffusion prior implements, and its JSON configuration.

A prior is a denoiser in the EDM/VE convention: ``D(x; sigma) ~= E[x0 | x0 + sigma * n]`` in
*prior units* ``x = (HU - hu_offset) / hu_scale``. The score follows from Tweedie's formula,
``grad log p_sigma(x) = (D(x; sigma) - x) / sigma^2``, so samplers and KL estimators only need
``denoise``.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from klviewer import __version__
from klviewer.errors import KlviewerInputError, brief
from klviewer.io.json_input import Fields, parse_json

ARCHITECTURES = ("edm-unet", "gaussian", "gmm", "diffusers-unet2d")
CONFIG_FORMAT = "klviewer.prior"
CONFIG_FORMAT_VERSION = 1
MAX_IMAGE_SIDE = 8192
MAX_CHANNELS = 16
"""CT priors have one channel; a config declaring thousands is not a CT prior (and would size a network by it)."""
MAX_NAME_CHARS = 256


@dataclass
class PriorConfig:
    """Everything needed to rebuild a prior's network and to interpret its numbers."""

    name: str
    architecture: str
    image_size: tuple[int, int]
    channels: int = 1
    hu_offset: float = 0.0
    hu_scale: float = 1000.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    pixel_spacing_mm: float | None = None
    arch: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    klviewer_version: str = __version__

    def __post_init__(self) -> None:
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    def validate(self, source: str | Path | None = None) -> None:
        """Raise KlviewerInputError (naming ``source``) listing every problem found."""
        problems = []
        if self.architecture not in ARCHITECTURES:
            problems.append(f"unknown architecture {brief(self.architecture)} (known: {', '.join(ARCHITECTURES)})")
        if not self.name or len(self.name) > MAX_NAME_CHARS:
            problems.append(f"name must be a non-empty string of at most {MAX_NAME_CHARS} characters")
        if not (all(1 <= n <= MAX_IMAGE_SIDE for n in self.image_size) and 1 <= self.channels <= MAX_CHANNELS):
            problems.append(f"image_size {brief(self.image_size)} must lie in 1..{MAX_IMAGE_SIDE} per side and channels "
                            f"{brief(self.channels)} in 1..{MAX_CHANNELS}")
        if not (math.isfinite(self.hu_scale) and self.hu_scale != 0) or not math.isfinite(self.hu_offset):
            problems.append(f"hu_offset {self.hu_offset} / hu_scale {self.hu_scale} must be finite, scale non-zero")
        if not (0 < self.sigma_min < self.sigma_max < math.inf and 0 < self.sigma_data < math.inf):
            problems.append(f"need 0 < sigma_min < sigma_max and sigma_data > 0, all finite, got "
                            f"{self.sigma_min}, {self.sigma_max}, {self.sigma_data}")
        if self.pixel_spacing_mm is not None and not 0 < self.pixel_spacing_mm <= 1000:
            problems.append(f"pixel_spacing_mm must lie in (0, 1000] or be null, got {self.pixel_spacing_mm}")
        if problems:
            raise KlviewerInputError(source, "invalid prior config: " + "; ".join(problems))

    def to_json(self) -> str:
        doc = {"format": CONFIG_FORMAT, "format_version": CONFIG_FORMAT_VERSION, **asdict(self)}
        doc["image_size"] = list(self.image_size)
        return json.dumps(doc, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str | Path | None = None) -> PriorConfig:
        """Parse and validate; every refusal names ``source`` (the config file) and the problem."""
        doc = parse_json(text, source, "prior config")
        if doc.get("format") != CONFIG_FORMAT:
            raise KlviewerInputError(source, f"not a klviewer prior config (format is {brief(doc.get('format'))}, "
                                             f"expected {CONFIG_FORMAT!r})")
        if doc.get("format_version") != CONFIG_FORMAT_VERSION:
            raise KlviewerInputError(source, f"prior config version {brief(doc.get('format_version'))} is not supported "
                                             f"(this klviewer reads version {CONFIG_FORMAT_VERSION})")
        missing = [k for k in ("name", "architecture", "image_size") if k not in doc]
        if missing:
            raise KlviewerInputError(source, f"prior config lacks required field(s): {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(doc) - known - {"format", "format_version"})
        if unknown:
            raise KlviewerInputError(source, f"prior config has unknown field(s): {brief(', '.join(unknown))}")
        fields = Fields(doc, source, what="prior config field")
        values: dict[str, Any] = {
            "name": fields.text("name", max_chars=MAX_NAME_CHARS),
            "architecture": fields.text("architecture", max_chars=64),
            "image_size": tuple(fields.numbers("image_size", length=2, integer=True, positive=True, hi=MAX_IMAGE_SIDE)),
            "channels": fields.integer("channels", 1, lo=1, hi=MAX_CHANNELS),
            "pixel_spacing_mm": fields.number("pixel_spacing_mm", None, positive=True, hi=1000, optional=True),
            "arch": fields.section("arch", {}).doc,
            "training": fields.section("training", {}).doc,
        }
        for key in ("hu_offset", "hu_scale", "sigma_min", "sigma_max", "sigma_data"):
            if key in doc:
                values[key] = fields.number(key, lo=-1e9, hi=1e9)
        if "klviewer_version" in doc:
            values["klviewer_version"] = fields.text("klviewer_version", max_chars=64)
        config = cls(**values)
        config.validate(source)
        return config


def sigma_column(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a (B, 1, ..., 1) tensor on x's device and dtype, broadcastable against x."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a float or a ({x.shape[0]},) tensor, got shape {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser(Protocol):
    """What samplers and estimators need from a prior: the denoiser, the shapes and scale its
    config records, and the HU mapping. ``Prior`` subclasses satisfy it; so can a wrapper."""

    config: PriorConfig

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor: ...

    def x_to_hu(self, x): ...


class Prior(torch.nn.Module):
    """A denoiser D(x; sigma) in prior units, with its HU mapping.

    Subclasses implement ``denoise`` and ``from_config`` (build an untrained module with the shapes
    the config describes, so a checkpoint's weights can be loaded into it).
    """

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config

    @classmethod
    def from_config(cls, config: PriorConfig) -> Prior:
        raise NotImplementedError

    @classmethod
    def state_shapes(cls, config: PriorConfig) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor the config's network holds, found without allocating it (the module
        is built on the meta device), so a checkpoint is checked against its config before any weight
        is read or any network sized by an absurd config is built."""
        with torch.device("meta"):
            module = cls.from_config(config)
        return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """E[x0 | x0 + sigma n = x] for x of shape (B, C, H, W) and sigma a float or a (B,) tensor."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        return self.denoise(x, sigma)

    def score(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """grad_x log p_sigma(x), via Tweedie's formula."""
        s = sigma_column(sigma, x)
        return (self.denoise(x, sigma) - x) / s**2

    def hu_to_x(self, hu):  # numpy arrays and torch tensors alike
        return (hu - self.config.hu_offset) / self.config.hu_scale

    def x_to_hu(self, x):
        return x * self.config.hu_scale + self.config.hu_offset
