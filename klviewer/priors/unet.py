"""A small EDM-preconditioned UNet, sized to run 100 times per posterior sample on a laptop CPU.

Preconditioning (Karras et al. 2022): ``D(x; s) = c_skip x + c_out F(c_in x; c_noise)`` with
``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd / sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``,
``c_noise = ln(s)/4``. So as s -> 0 the denoiser tends to the identity for any network F.

Optional positional channels (as in PaDIS): two extra inputs holding each pixel's (row, col)
position as a fraction of the *full* image, in [-1, 1]. They let a network trained on random
patches know where a patch sits, so full-image samples have one body in the usual place.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from klviewer.priors.base import Prior, PriorConfig, sigma_column

# Measured on 2 CPU cores at 256x256: ~30 ms per batch-1 call, versus ~55 ms for
# channels (16, 32, 64, 128) without the stem, whose full-resolution level dominated the cost.
DEFAULT_ARCH: dict[str, Any] = {
    "channels": [32, 64, 128, 128],
    "emb_dim": 128,
    "fourier_features": 32,
    "groups": 8,
    "attention": False,
    "pos_channels": 2,
    "stem": 2,
}

ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "default": DEFAULT_ARCH,
    # Half the channels at every level: a quarter of the convolutions' work, 2.5x faster per
    # network evaluation on a 2-core AVX2 CPU. Meant to be distilled from a default-size prior.
    "half": {**DEFAULT_ARCH, "channels": [16, 32, 64, 64]},
    # For tests and smoke runs: same structure, a fraction of the cost.
    "tiny": {**DEFAULT_ARCH, "channels": [8, 16], "emb_dim": 32, "fourier_features": 16, "groups": 4},
}


ARCH_LIMITS = {"emb_dim": (1, 8192), "fourier_features": (2, 4096), "groups": (1, 1024), "pos_channels": (0, 2),
               "stem": (1, 8)}
MAX_LEVELS, MAX_WIDTH = 8, 4096


def checked_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """The UNet settings, each an integer in its range: a config names them, and a network is sized
    by them (ValueError names the field)."""

    def integer(value: Any, name: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"arch.{name} must be an integer in {lo}..{hi}, got {str(value)[:80]}")
        return value

    channels = arch["channels"]
    if not isinstance(channels, list) or not 1 <= len(channels) <= MAX_LEVELS:
        raise ValueError(f"arch.channels must list 1 to {MAX_LEVELS} widths, got {str(channels)[:80]}")
    checked = {**arch, "channels": [integer(c, "channels", 1, MAX_WIDTH) for c in channels]}
    for key, (lo, hi) in ARCH_LIMITS.items():
        checked[key] = integer(arch[key], key, lo, hi)
    if not isinstance(arch["attention"], bool):
        raise ValueError(f"arch.attention must be true or false, got {str(arch['attention'])[:80]}")
    return checked


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) for the EDM preconditioning, elementwise in sigma."""
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / torch.sqrt(sigma**2 + sd2)
    c_in = 1.0 / torch.sqrt(sigma**2 + sd2)
    c_noise = torch.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


class FourierEmbedding(nn.Module):
    """Fixed log-spaced sinusoids of c_noise; c_noise = ln(sigma)/4 spans only about [-2, 1.5]."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        freqs = 2 * math.pi * torch.logspace(0, math.log10(32.0), n_features // 2)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        arg = c_noise[:, None] * self.freqs[None, :]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class FloatGroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 under autocast, its output in the input's dtype.

    CUDA's autocast already runs group_norm in float32; the CPU's runs it in bfloat16, where its
    backward took 29 % of a bfloat16 `pigdm` step (3.2x its float32 time per call). In float32 the step is
    8 % faster (docs/screening.md). The parameters are nn.GroupNorm's, so checkpoints load unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the noise embedding modulates the second norm (scale, shift)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = FloatGroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = FloatGroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        # Each block starts as (nearly) the identity, which keeps early training stable.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(torch.addcmul(shift, self.norm2(h), scale + 1)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, groups: int, heads: int = 4) -> None:
        super().__init__()
        self.norm = FloatGroupNorm(min(groups, channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.heads = heads
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """F(x_in, c_noise, pos): one residual block per level in the encoder and the decoder."""

    def __init__(self, in_channels: int, out_channels: int, channels: list[int], emb_dim: int,
                 fourier_features: int, groups: int, attention: bool, pos_channels: int, stem: int) -> None:
        super().__init__()
        self.pos_channels = pos_channels
        self.stem = stem
        self.embed = nn.Sequential(
            FourierEmbedding(fourier_features),
            nn.Linear(fourier_features, emb_dim), nn.SiLU(),
            nn.Linear(emb_dim, emb_dim), nn.SiLU(),
        )
        # A stem > 1 folds stem x stem pixel blocks into channels (lossless), so the costly
        # full-resolution level runs on 1/stem^2 as many positions.
        self.conv_in = nn.Conv2d((in_channels + pos_channels) * stem**2, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        prev = channels[0]
        for c in channels:
            self.down.append(ResBlock(prev, c, emb_dim, groups))
            prev = c
        self.mid = ResBlock(prev, prev, emb_dim, groups)
        self.attn = SelfAttention(prev, groups) if attention else None
        self.up = nn.ModuleList()
        for c in reversed(channels):
            self.up.append(ResBlock(prev + c, c, emb_dim, groups))
            prev = c
        self.norm_out = FloatGroupNorm(min(groups, prev), prev)
        self.conv_out = nn.Conv2d(prev, out_channels * stem**2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def levels(self) -> int:
        return len(self.down)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        emb = self.embed(c_noise)
        if self.pos_channels:
            x = torch.cat([x, pos], dim=1)
        if self.stem > 1:
            x = F.pixel_unshuffle(x, self.stem)
        h = self.conv_in(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < self.levels - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid(h, emb)
        if self.attn is not None:
            h = self.attn(h)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < self.levels - 1:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.stem) if self.stem > 1 else out


def position_grid(full_size: tuple[int, int], top: int, left: int, height: int, width: int,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(2, height, width): pixel centres of the window at (top, left), as fractions of the full
    image in [-1, 1]. Windows may extend past the image (padding); positions then go past +-1."""
    rows = (torch.arange(top, top + height, device=device, dtype=dtype) + 0.5) / full_size[0] * 2 - 1
    cols = (torch.arange(left, left + width, device=device, dtype=dtype) + 0.5) / full_size[1] * 2 - 1
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"))


class EDMUNetPrior(Prior):
    """The trained CT prior: an EDM-preconditioned UNet, fully convolutional."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__(config)
        arch = checked_arch({**DEFAULT_ARCH, **config.arch})
        config.arch = arch
        self.net = UNet(config.channels, config.channels, list(arch["channels"]), int(arch["emb_dim"]),
                        int(arch["fourier_features"]), int(arch["groups"]), bool(arch["attention"]),
                        int(arch["pos_channels"]), int(arch["stem"]))

    @classmethod
    def from_config(cls, config: PriorConfig) -> EDMUNetPrior:
        return cls(config)

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this; ``denoise`` pads others."""
        return self.net.stem * 2 ** (self.net.levels - 1)

    def precondition(self, x: torch.Tensor, sigma: float | torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """D(x; sigma) on a window whose sides are multiples of ``multiple``; ``pos`` is (B, 2, H, W)."""
        s = sigma_column(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(s, self.config.sigma_data)
        out = self.net(c_in * x, c_noise.reshape(-1), pos)
        return c_skip * x + c_out * out.to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        top, left = ph // 2, pw // 2
        if ph or pw:
            # Replicate keeps the border's intensity (air, usually) instead of inventing a zero edge.
            x_in = F.pad(x, (left, pw - left, top, ph - top), mode="replicate")
        else:
            x_in = x
        pos = None
        if self.net.pos_channels:
            pos = position_grid((h, w), -top, -left, h + ph, w + pw, x.device, x.dtype)
            pos = pos.unsqueeze(0).expand(b, -1, -1, -1)
        out = self.precondition(x_in, sigma, pos)
        return out[:, :, top:top + h, left:left + w]
