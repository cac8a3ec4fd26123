"""Pictures of a result: windowed CT, the KL heat map blended over it, and a version with a colour bar.

The overlay follows `klviewer.overlay_rules`, as the app does, so an exported picture looks
like the screen; the patches the flag rule flags, and only those, are outlined in cyan.
Figures are drawn with matplotlib's Agg canvas directly (no pyplot), so exporting from a
background thread of the app is safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import BinaryIO

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colorbar import Colorbar
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image  # matplotlib's own image dependency

from klviewer.overlay_rules import COLORMAP, OUTLINE_RGB, OVERLAY_OPACITY, colorbar_ticks, display_cut, overlay_levels

SOFT_TISSUE_WINDOW = (40.0, 400.0)
"""(center, width) in HU when the source has no window of its own."""
_MIN_FIGURE_PIXELS = 384


@dataclass(frozen=True)
class OverlayStyle:
    """How one slice's KL map is coloured."""

    levels: tuple[float, float]
    """Colour bar range in nats."""
    cut: float
    """KL below this is left transparent."""
    threshold: float | None
    """The nats rule's threshold: patches above it are outlined and it is marked on the colour bar.
    None under the KL z rule (whose windows the caller outlines) and where no rule applies."""
    peak: float = 0.0
    """The slice's largest patch KL, marked on the colour bar."""

    @classmethod
    def for_map(cls, kl_pixels: np.ndarray, threshold: float | None, nats_rule: bool = True) -> OverlayStyle:
        """The style of a slice's map: colours over the calibrated range of `threshold` (nats) when there is one;
        the threshold is the flag rule's only under the nats rule (`nats_rule`)."""
        peak = float(np.max(kl_pixels)) if kl_pixels.size else 0.0
        return cls(levels=overlay_levels(peak, threshold), cut=display_cut(peak),
                   threshold=threshold if nats_rule else None, peak=peak)

    def flagged_mask(self, kl_pixels: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            return np.zeros(kl_pixels.shape, bool)
        return kl_pixels > self.threshold


def windowed(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU to 0..1 grey with a (center, width) window."""
    center, width = window
    return np.clip((np.asarray(hu, np.float64) - (center - width / 2.0)) / width, 0.0, 1.0)


def grey_uint8(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    return np.round(windowed(hu, window) * 255).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it (image borders count as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay_rgb(base_hu: np.ndarray, kl_pixels: np.ndarray, window: tuple[float, float], style: OverlayStyle,
                opacity: float = OVERLAY_OPACITY, flagged: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8: the windowed base image, the KL heat map blended in, flagged patches outlined.

    `flagged` marks the pixels the flag rule flags (the KL z rule's windows); by default those
    above the style's nats threshold."""
    if base_hu.shape != kl_pixels.shape:
        raise ValueError(f"base image {base_hu.shape} and KL map {kl_pixels.shape} differ in shape")
    grey = windowed(base_hu, window)[..., None].repeat(3, axis=2)
    lo, hi = style.levels
    colours = matplotlib.colormaps[COLORMAP](np.clip((kl_pixels - lo) / (hi - lo), 0.0, 1.0))[..., :3]
    shown = (kl_pixels > 0) & (kl_pixels >= style.cut)
    alpha = np.where(shown, opacity, 0.0)[..., None]
    rgb = grey * (1.0 - alpha) + colours * alpha
    rgb[_outline(style.flagged_mask(kl_pixels) if flagged is None else flagged)] = OUTLINE_RGB
    return np.round(rgb * 255).astype(np.uint8)


def add_colorbar(rgb: np.ndarray, style: OverlayStyle, caption: str) -> np.ndarray:
    """The picture with a KL colour bar (nats) on its right and a caption line above, as uint8 RGB.

    Small images are enlarged by a whole factor (nearest) so the text stays readable.
    """
    h, w = rgb.shape[:2]
    scale = max(1, math.ceil(_MIN_FIGURE_PIXELS / max(h, w)))
    image = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    dpi = 100
    bar_px, caption_px = 110, 28
    fig_w, fig_h = w * scale + bar_px, h * scale + caption_px
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="black")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, w * scale / fig_w, h * scale / fig_h))
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    cax = fig.add_axes(((w * scale + 14) / fig_w, 0.08, 18 / fig_w, 0.8 * h * scale / fig_h))
    bar = fig.colorbar(ScalarMappable(Normalize(*style.levels), COLORMAP), cax=cax)
    bar.set_label("KL (nats)", color="white")
    mark_colorbar(bar, style)
    bar.ax.tick_params(colors="white", labelsize=8)
    fig.text(0.01, 1 - 0.5 * caption_px / fig_h, caption, color="white", fontsize=9, va="center")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def mark_colorbar(bar: Colorbar, style: OverlayStyle) -> None:
    """Ticks as in the app (round numbers, "thr", "max"), the threshold line in the outline colour and the
    slice's maximum as a dashed white line."""
    ticks = colorbar_ticks(style.levels, style.peak, style.threshold)
    bar.set_ticks([v for v, _ in ticks], labels=[label for _, label in ticks])
    line = bar.ax.axvline if bar.orientation == "horizontal" else bar.ax.axhline
    if style.threshold is not None and style.levels[0] <= style.threshold <= style.levels[1]:
        line(style.threshold, color=OUTLINE_RGB, linewidth=1.5)
    line(min(style.peak, style.levels[1]), color="white", linewidth=1.2, linestyle="--")


def write_png(handle: BinaryIO, image: np.ndarray) -> None:
    """Write a (H, W) grey or (H, W, 3) RGB uint8 image as PNG."""
    Image.fromarray(image).save(handle, format="PNG")
