"""Pixel-masking operator, the simplest linear inverse problem; used by tests of the inference math.

Measurements keep the image shape with unobserved pixels set to zero, so ``A`` is diagonal:
``A = A_adjoint``, and ``A_dagger`` divides by the mask where it is non-zero.
"""

from __future__ import annotations

import torch


def random_mask(shape: tuple[int, ...], keep_prob: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask where each pixel is kept independently with probability ``keep_prob``.

    The mask is created on the generator's device.
    """
    if not 0.0 <= keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob}")
    return torch.rand(shape, generator=generator, device=generator.device) < keep_prob


class Inpainting:
    """``y = mask * x`` for images ``(B, C, H, W)``; ``mask`` is ``(H, W)`` or broadcastable ``(B, C, H, W)``, bool or float."""

    def __init__(self, mask: torch.Tensor) -> None:
        if mask.ndim not in (2, 4):
            raise ValueError(f"mask must be (H, W) or (B, C, H, W), got shape {tuple(mask.shape)}")
        m = mask.to(torch.float32) if mask.dtype == torch.bool else mask
        self.mask = m if m.ndim == 4 else m[None, None]

    def _weights(self, like: torch.Tensor) -> torch.Tensor:
        return self.mask.to(device=like.device, dtype=like.dtype)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._weights(x)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self._weights(y)

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        """Moore-Penrose pseudo-inverse: ``y / mask`` where the mask is non-zero, 0 elsewhere."""
        m = self._weights(y)
        observed = m != 0
        return torch.where(observed, y / torch.where(observed, m, torch.ones_like(m)), torch.zeros_like(y))

    def describe(self) -> dict:
        return {"operator": "inpainting", "shape": list(self.mask.shape), "kept_fraction": float((self.mask != 0).float().mean())}
