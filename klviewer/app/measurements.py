"""Measurements drawn on a slice, as plain data: distance, and ellipse or rectangle ROIs with HU mean,
SD and area, plus the KL and KL z-score inside them.

No Qt here: `measure_tools` draws and moves the shapes; this module says what they measure, the
session file stores them, and the PDF report lists them. Geometry is in the viewer's coordinates:
native pixels of the series, x to the right and y down.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

KINDS = ("distance", "ellipse", "rectangle")


@dataclass
class Measurement:
    kind: str
    series_uid: str
    slice_index: int
    geometry: tuple[float, float, float, float]
    """distance: (x0, y0, x1, y1); ellipse and rectangle: their bounding box (x, y, width, height)."""
    text: str = ""
    """What it reads, as last computed (see `describe`)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> Measurement:
        kind = str(doc["kind"])
        if kind not in KINDS:
            raise ValueError(f"unknown measurement kind {kind!r}")
        geometry = tuple(float(v) for v in doc["geometry"])
        if len(geometry) != 4 or not all(math.isfinite(v) for v in geometry):
            raise ValueError(f"measurement geometry must be 4 finite numbers, got {doc['geometry']!r}")
        return cls(kind, str(doc["series_uid"]), int(doc["slice_index"]), geometry, str(doc.get("text", "")))


def inside_roi(kind: str, geometry: tuple[float, float, float, float], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which of the points (x, y), in view coordinates, lie inside the ellipse or rectangle."""
    gx, gy, w, h = geometry
    if kind == "rectangle":
        return (x >= min(gx, gx + w)) & (x <= max(gx, gx + w)) & (y >= min(gy, gy + h)) & (y <= max(gy, gy + h))
    rx, ry = abs(w) / 2, abs(h) / 2
    if rx == 0 or ry == 0:
        return np.zeros(np.broadcast(x, y).shape, bool)
    return ((x - (gx + w / 2)) / rx) ** 2 + ((y - (gy + h / 2)) / ry) ** 2 <= 1.0


def roi_mask(kind: str, geometry: tuple[float, float, float, float], extent: tuple[int, int],
             shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels of an image of `shape`, stretched over `extent` (height, width in view units),
    whose centres lie inside the ellipse or rectangle."""
    rows, cols = shape
    y = (np.arange(rows) + 0.5)[:, None] * (extent[0] / rows)
    x = (np.arange(cols) + 0.5)[None, :] * (extent[1] / cols)
    return np.broadcast_to(inside_roi(kind, geometry, x, y), shape).copy()


@dataclass(frozen=True)
class RoiStats:
    pixels: int
    hu_mean: float
    hu_sd: float
    area_mm2: float | None
    kl_nats: float | None
    """Sum of the per-pixel KL energy inside (nats): the KL the region carries, at the map's sigma window."""
    z_max: float | None
    """The largest KL z-score of the windows covering the region."""

    def text(self, kind: str) -> str:
        area = f"{self.area_mm2:.0f} mm²" if self.area_mm2 is not None else f"{self.pixels} px"
        parts = [f"{kind}: HU {self.hu_mean:.0f} ± {self.hu_sd:.0f}", area]
        if self.kl_nats is not None:
            parts.append(f"KL {self.kl_nats:.3g} nats")
        if self.z_max is not None:
            parts.append(f"KL z max {self.z_max:.3g}")
        return " · ".join(parts)


def roi_stats(mask: np.ndarray, hu: np.ndarray, mm_per_px: float | None, pixel_kl: np.ndarray | None = None,
              z_pixels: np.ndarray | None = None) -> RoiStats | None:
    """Statistics of `hu` (and of the per-pixel KL and z maps, on the same grid) inside `mask`; None when empty.
    `mm_per_px` is the pixel size of that grid."""
    if not mask.any():
        return None
    values = hu[mask].astype(np.float64)
    kl = float(pixel_kl[mask].sum()) if pixel_kl is not None and pixel_kl.shape == mask.shape else None
    z = None
    if z_pixels is not None and z_pixels.shape == mask.shape:
        inside = z_pixels[mask]
        inside = inside[np.isfinite(inside)]
        z = float(inside.max()) if inside.size else None
    area = float(mask.sum()) * mm_per_px ** 2 if mm_per_px else None
    return RoiStats(int(mask.sum()), float(values.mean()), float(values.std()), area, kl, z)


def distance_text(geometry: tuple[float, float, float, float], mm_per_unit: float | None) -> str:
    """A distance line's length, in mm when the pixel spacing is known."""
    x0, y0, x1, y1 = geometry
    length = math.hypot(x1 - x0, y1 - y0)
    return f"distance: {length * mm_per_unit:.1f} mm" if mm_per_unit else f"distance: {length:.1f} px"
