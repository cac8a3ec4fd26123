"""Which arithmetic a profile's denoiser runs in on a device: bfloat16 only where the device has it in hardware."""

from __future__ import annotations

import dataclasses

from klviewer.devices import bfloat16_is_native, resolve_device
from klviewer.errors import KlviewerError
from klviewer.inference.settings import AnalysisSettings


def precision_for_device(settings: AnalysisSettings) -> tuple[AnalysisSettings, str | None]:
    """A profile's settings as they run on their device: the bfloat16 denoiser where the device has bfloat16
    in hardware, else float32 (the same chains, 13x faster for `screening` on an AVX2 CPU, with calibration
    entries of their own), and the notice that says so. A device that cannot be resolved is left to the run
    to refuse."""
    if settings.precision != "bfloat16":
        return settings, None
    try:
        device = resolve_device(settings.device)
    except KlviewerError:
        return settings, None
    if bfloat16_is_native(device):
        return settings, None
    where = "this GPU" if device.type == "cuda" else "this CPU (oneDNN has it with AVX-512 or ARM BF16)"
    return (dataclasses.replace(settings, precision="float32"),
            f"bfloat16 is not native on {where}, so the denoiser runs in float32, many times faster here; "
            "the thresholds are the prior's float32 calibration")
