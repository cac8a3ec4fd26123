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


def bfloat16_is_native(device: torch.device) -> bool:
    """Whether `device` runs the denoiser's bfloat16 convolutions in hardware. Where it does not, autocast
    still works but the convolutions fall back to a slow reference path: on an AVX2-only CPU a forward pass
    of the shipped prior took 348 ms in bfloat16 against 58 ms in float32, and a `screening` slice 200 against
    15 s (docs/screening.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:  # the check PyTorch gates oneDNN's bfloat16 convolution on (AVX-512 or ARM BF16); private, so guarded
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
