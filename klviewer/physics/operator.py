"""The linear-operator protocol every forward model follows (deepinv's convention: A and its adjoint on one object)."""

from __future__ import annotations

from typing import Protocol

import torch


class LinearOperator(Protocol):
    """x -> A x and its exact adjoint; the Radon, inpainting and masked-Fourier operators all satisfy it."""

    def A(self, x: torch.Tensor) -> torch.Tensor: ...

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor: ...
