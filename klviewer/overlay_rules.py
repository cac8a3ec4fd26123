"""How a KL map is coloured over a CT slice: one set of rules for the app and for exported pictures.

Where a calibrated threshold applies, the colour range is fixed by it: 0 to `THRESHOLD_SPAN`
times the threshold, so the threshold always sits at the same colour (two thirds up the bar)
and slices compare at a glance; anything saturated is well above it. Without a calibrated
threshold there is no fixed scale, and colours run from 0 to the slice's own largest patch.
The colour bar marks the threshold and the slice's maximum. Patches below a fraction of that
maximum stay transparent, so the base image shows through where the map says little.
"""

from __future__ import annotations

import math

import numpy as np

COLORMAP = "inferno"
OVERLAY_OPACITY = 0.6
DISPLAY_FRACTION = 0.2
"""Patches below this fraction of the slice's largest patch are not coloured."""
OUTLINE_RGB = (0.0, 230 / 255, 1.0)
"""Cyan outline of the patches the flag rule flags (0..1 RGB); nothing else is outlined."""
THRESHOLD_SPAN = 1.5
"""A calibrated colour range ends at this multiple of the threshold."""


def overlay_levels(peak: float, threshold: float | None) -> tuple[float, float]:
    """Colour range for a slice whose largest patch holds `peak`, in the unit of `threshold` (nats or KL z).

    `threshold` is the calibrated threshold of the shown quantity, or None when it has none.
    """
    upper = THRESHOLD_SPAN * threshold if threshold is not None and threshold > 0 else peak
    return (0.0, upper if upper > 0 else 1.0)


def display_cut(peak: float, fraction: float = DISPLAY_FRACTION) -> float:
    """Value below which a patch is left transparent."""
    return fraction * peak


def colorbar_ticks(levels: tuple[float, float], peak: float, threshold: float | None,
                   count: int = 4) -> list[tuple[float, str]]:
    """Tick values and labels of a colour bar over `levels`: round numbers, plus the threshold ("thr")
    and the slice's maximum ("max"; at the top end when it is beyond the range). Round numbers too
    close to a mark give way to it."""
    lo, hi = levels
    span = hi - lo
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    # A maximum beyond the range is labelled just below the top end, where its label is not cut off.
    beyond = "↑" if peak > hi else ""
    marks = [(min(peak, hi - 0.04 * span), f"max {tick_label(peak)}{beyond}")]
    if threshold is not None and lo <= threshold <= hi:
        marks.append((threshold, f"thr {tick_label(threshold)}"))
    ticks = [(float(v), tick_label(float(v))) for v in np.arange(lo, hi + step / 2, step)
             if all(abs(v - m) > 0.12 * span for m, _ in marks)]
    return ticks + marks


def tick_label(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
