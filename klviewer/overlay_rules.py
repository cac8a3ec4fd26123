"""How a KL map is coloured over a CT slice: one set of rules for the app and for exported pictures.

Colours run from 0 to twice the flag threshold when one applies, so slices compare at a glance
(anything saturated is well above it), otherwise from 0 to the slice's own largest patch.
Patches below a fraction of that largest patch stay transparent, so the base image shows
through where the map says little.
"""

from __future__ import annotations

COLORMAP = "inferno"
OVERLAY_OPACITY = 0.6
DISPLAY_FRACTION = 0.2
"""Patches below this fraction of the slice's largest patch are not coloured."""
OUTLINE_RGB = (0.0, 230 / 255, 1.0)
"""Cyan outline of flagged patches (0..1 RGB)."""


def overlay_levels(peak: float, flag_threshold: float | None) -> tuple[float, float]:
    """Colour range in nats for a slice whose largest patch holds `peak` nats."""
    upper = 2.0 * flag_threshold if flag_threshold is not None else peak
    return (0.0, upper if upper > 0 else 1.0)


def display_cut(peak: float, fraction: float = DISPLAY_FRACTION) -> float:
    """KL (nats) below which a patch is left transparent."""
    return fraction * peak
