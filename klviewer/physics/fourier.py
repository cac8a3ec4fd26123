"""Masked-Fourier operator (single-coil MRI-like): ``y = M * F x`` with F the orthonormal 2-D DFT.

F is unitary, so ``A = M F`` has right singular vectors F^H for every mask M: the operators of a
random-mask family share V, the setting in which the measurement-domain KL is exact. Masks keep
whole k-space *lines* (rows, the phase-encode direction) and are Hermitian-symmetric: a line is
kept together with its mirror line, so the zero-filled image ``F^H (M y)`` of a real image is
real and ``A_dagger A`` is an orthogonal projector on real images.

Frequencies are unshifted (DC at index 0, as torch.fft orders them).
"""

from __future__ import annotations

import torch


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DFT over the last two axes: ``||fft2c(x)|| == ||x||``."""
    return torch.fft.fft2(x, norm="ortho")


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Inverse of ``fft2c``."""
    return torch.fft.ifft2(k, norm="ortho")


def line_frequencies(n_lines: int) -> torch.Tensor:
    """Signed frequency index of each k-space row: 0, 1, ..., -2, -1 (torch.fft order)."""
    return torch.fft.fftfreq(n_lines, d=1.0 / n_lines).round().long()


def _mirror(n_lines: int) -> torch.Tensor:
    return (-torch.arange(n_lines)) % n_lines


def _acs_lines(n_lines: int, acs: int) -> torch.Tensor:
    if acs < 0 or (acs > 0 and acs % 2 == 0) or acs > n_lines:
        raise ValueError(f"acs must be 0 or an odd number of centre lines up to {n_lines}, got {acs}")
    return line_frequencies(n_lines).abs() <= (acs - 1) // 2 if acs else torch.zeros(n_lines, dtype=torch.bool)


def line_keep_probabilities(n_lines: int, keep_prob: float, acs: int = 0) -> torch.Tensor:
    """E[M] per k-space row (float64): 1 on the ``acs`` centre (autocalibration) lines, keep_prob elsewhere."""
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}")
    probs = torch.full((n_lines,), float(keep_prob), dtype=torch.float64)
    probs[_acs_lines(n_lines, acs)] = 1.0
    return probs


def random_line_mask(size: tuple[int, int], keep_prob: float, generator: torch.Generator, acs: int = 0) -> torch.Tensor:
    """Boolean (H, W) k-space mask of whole rows: the ``acs`` centre lines always, every other
    line with its mirror line independently with probability ``keep_prob``.

    Created on the generator's device.
    """
    h, w = int(size[0]), int(size[1])
    probs = line_keep_probabilities(h, keep_prob, acs)
    draws = torch.rand(h, generator=generator, device=generator.device).cpu() < probs
    mirror = _mirror(h)
    representative = torch.minimum(torch.arange(h), mirror)  # a line and its mirror share one draw
    rows = draws[representative]
    return rows[:, None].expand(h, w).to(generator.device)


def is_hermitian_symmetric(mask: torch.Tensor) -> bool:
    """True when mask[k1, k2] == mask[-k1, -k2] for every frequency (over the last two axes)."""
    h, w = mask.shape[-2:]
    mirrored = mask[..., _mirror(h).to(mask.device), :][..., _mirror(w).to(mask.device)]
    return bool(torch.equal(mask, mirrored))


class MaskedFourier:
    """``y = mask * fft2c(x)`` for real images ``(B, C, H, W)``; mask ``(H, W)`` or ``(B, C, H, W)``, bool.

    Measurements are complex k-space arrays of the image shape with zeros off the mask.
    ``A_adjoint`` is the adjoint for the real inner product ``Re <y, A x>``; since F is unitary
    and the mask a projection, ``A_dagger == A_adjoint`` (the zero-filled inverse FFT).
    """

    def __init__(self, mask: torch.Tensor) -> None:
        if mask.ndim not in (2, 4):
            raise ValueError(f"mask must be (H, W) or (B, C, H, W), got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be boolean, got {mask.dtype}")
        if not is_hermitian_symmetric(mask):
            raise ValueError("mask must be Hermitian-symmetric (each frequency kept with its mirror), "
                             "or the zero-filled image of a real image is not real")
        self.mask = mask if mask.ndim == 4 else mask[None, None]

    def _mask(self, like: torch.Tensor) -> torch.Tensor:
        return self.mask.to(like.device)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        k = fft2c(x)
        return torch.where(self._mask(k), k, torch.zeros((), dtype=k.dtype, device=k.device))

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        kept = torch.where(self._mask(y), y, torch.zeros((), dtype=y.dtype, device=y.device))
        return ifft2c(kept).real

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        """Zero-filled inverse FFT, the Moore-Penrose pseudo-inverse of A."""
        return self.A_adjoint(y)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``A_dagger A x``: the orthogonal projection of a real image onto the observed frequencies."""
        return self.A_adjoint(self.A(x))

    def describe(self) -> dict:
        m = self.mask
        return {"operator": "fourier", "shape": list(m.shape), "kept_fraction": float(m.float().mean()),
                "lines": "rows"}
