"""Choosing the compute device: one rule for every command and the GUI."""

from __future__ import annotations

import torch

from klviewer.errors import KlviewerError, KlviewerInputError


class DeviceUnavailableError(KlviewerError):
    """CUDA was asked for on a machine or torch build without it."""


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; asking for CUDA without it is a clear error."""
    if isinstance(device, torch.device):
        name = device.type
    else:
        name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise KlviewerInputError(None, f"device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "CUDA was requested but is not available (this torch build or machine has no GPU); use --device auto or cpu"
        )
    return torch.device(device)

