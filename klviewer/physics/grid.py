"""Physical grids: how a source image's pixels map onto a prior's grid, and back.

A prior is trained at one pixel spacing over one field of view (its config's `pixel_spacing_mm`
times `image_size`). A source slice is put on that grid by its own pixel spacing in mm, never by
its pixel count: the two field-of-view centres coincide, the image is resampled by the ratio of
the spacings, and whatever the prior's field of view holds beyond the source image is air.

Coordinates are 0-based pixel centres. Along each axis a source pixel i lands at target
coordinate `scale * i + offset`, with `scale = source spacing / target spacing`; the transform
is an axis-aligned affine map, so masks, boxes and coordinates map both ways exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

AIR_HU = -1000.0


@dataclass(frozen=True)
class GridTransform:
    """Source pixel (r, c) -> target pixel (scale[0] * r + offset[0], scale[1] * c + offset[1])."""

    source_shape: tuple[int, int]
    source_spacing_mm: tuple[float, float]
    """(row, column) spacing of the source pixels."""
    target_shape: tuple[int, int]
    target_spacing_mm: tuple[float, float]
    scale: tuple[float, float]
    offset: tuple[float, float]
    spacing_assumed: bool = False
    """The source gave no usable pixel spacing; `source_spacing_mm` is an assumption (see the notes)."""

    @classmethod
    def centred(cls, source_shape: tuple[int, int], source_spacing_mm: tuple[float, float],
                target_shape: tuple[int, int], target_spacing_mm: tuple[float, float],
                spacing_assumed: bool = False) -> GridTransform:
        """Both fields of view centred on each other, pixels scaled by their physical size."""
        scale = tuple(float(s) / float(t) for s, t in zip(source_spacing_mm, target_spacing_mm))
        offset = tuple((n_t - 1) / 2 - k * (n_s - 1) / 2 for n_s, n_t, k in zip(source_shape, target_shape, scale))
        return cls(tuple(int(n) for n in source_shape), tuple(float(s) for s in source_spacing_mm),  # type: ignore[arg-type]
                   tuple(int(n) for n in target_shape), tuple(float(t) for t in target_spacing_mm),  # type: ignore[arg-type]
                   scale, offset, spacing_assumed)  # type: ignore[arg-type]

    @property
    def source_fov_mm(self) -> tuple[float, float]:
        return tuple(n * s for n, s in zip(self.source_shape, self.source_spacing_mm))  # type: ignore[return-value]

    @property
    def target_fov_mm(self) -> tuple[float, float]:
        return tuple(n * s for n, s in zip(self.target_shape, self.target_spacing_mm))  # type: ignore[return-value]

    def to_target(self, rows: np.ndarray | float, cols: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Target coordinates of source coordinates (pixel centres, 0-based)."""
        return (np.asarray(rows) * self.scale[0] + self.offset[0], np.asarray(cols) * self.scale[1] + self.offset[1])

    def to_source(self, rows: np.ndarray | float, cols: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Source coordinates of target coordinates."""
        return ((np.asarray(rows) - self.offset[0]) / self.scale[0], (np.asarray(cols) - self.offset[1]) / self.scale[1])

    def resample_to_target(self, image: np.ndarray, fill: float = AIR_HU) -> np.ndarray:
        """The source image on the target grid (linear interpolation; low-pass first when shrinking, so fine
        detail averages instead of aliasing); `fill` where the source has no pixels."""
        image = np.asarray(image, np.float64)
        # A Gaussian of this width per axis suppresses what the coarser target grid cannot carry.
        blur = [0.5 * math.sqrt(max(1.0 / k**2 - 1.0, 0.0)) for k in self.scale]
        if any(b > 0 for b in blur):
            image = ndimage.gaussian_filter(image, blur, mode="nearest")
        rows, cols = np.meshgrid(np.arange(self.target_shape[0]), np.arange(self.target_shape[1]), indexing="ij")
        src_r, src_c = self.to_source(rows, cols)
        out = ndimage.map_coordinates(image, [src_r, src_c], order=1, mode="constant", cval=fill)
        return out.astype(np.float32)

    def resample_to_source(self, image: np.ndarray, *, nearest: bool = False, fill: float = np.nan) -> np.ndarray:
        """A target-grid image on the source grid: linear for images, `nearest` for maps whose pixels are
        patch sums or labels (no value is invented between two patches); `fill` outside the target grid."""
        rows, cols = np.meshgrid(np.arange(self.source_shape[0]), np.arange(self.source_shape[1]), indexing="ij")
        tgt_r, tgt_c = self.to_target(rows, cols)
        data = np.asarray(image, np.float64)
        if nearest:
            r, c = np.floor(tgt_r + 0.5).astype(np.int64), np.floor(tgt_c + 0.5).astype(np.int64)
            inside = (r >= 0) & (r < data.shape[0]) & (c >= 0) & (c < data.shape[1])
            out = np.full(self.source_shape, fill, np.float64)
            out[inside] = data[r[inside], c[inside]]
            return out.astype(np.float32)
        out = ndimage.map_coordinates(data, [tgt_r, tgt_c], order=1, mode="constant", cval=fill)
        return out.astype(np.float32)

    def box_to_source(self, box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        """A target box (r0, r1, c0, c1), edges in pixel units (r1, c1 exclusive), as source pixel edges."""
        r0, r1, c0, c1 = box
        (sr0, sr1), (sc0, sc1) = self.to_source(np.array([r0 - 0.5, r1 - 0.5]), np.array([c0 - 0.5, c1 - 0.5]))
        return float(sr0 + 0.5), float(sr1 + 0.5), float(sc0 + 0.5), float(sc1 + 0.5)

    def is_identity(self) -> bool:
        return (self.source_shape == self.target_shape and all(math.isclose(k, 1.0, rel_tol=1e-9) for k in self.scale)
                and all(abs(o) < 1e-9 for o in self.offset))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> GridTransform:
        """Read what `to_dict` wrote; ValueError names the field that does not fit."""
        try:
            pairs = {k: tuple(float(v) for v in doc[k]) for k in
                     ("source_spacing_mm", "target_spacing_mm", "scale", "offset")}
            shapes = {k: tuple(int(v) for v in doc[k]) for k in ("source_shape", "target_shape")}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"grid_transform: {exc}") from exc
        for key, value in {**pairs, **shapes}.items():
            if len(value) != 2 or not all(math.isfinite(v) for v in value):
                raise ValueError(f"grid_transform.{key} must hold two finite numbers, got {doc[key]!r}")
        if min(pairs["scale"]) <= 0 or min(pairs["source_spacing_mm"]) <= 0 or min(shapes["source_shape"]) < 1:
            raise ValueError("grid_transform: scale, spacing and shape must be positive")
        return cls(shapes["source_shape"], pairs["source_spacing_mm"], shapes["target_shape"],  # type: ignore[arg-type]
                   pairs["target_spacing_mm"], pairs["scale"], pairs["offset"],  # type: ignore[arg-type]
                   bool(doc.get("spacing_assumed", False)))


def square_pad_transform(source_shape: tuple[int, int], prior_size: int) -> GridTransform:
    """The grid of results written before physical resampling: the slice centre-padded to a square
    (the odd row or column at the far side) and resampled by pixel count to the prior's size."""
    h, w = source_shape
    side = max(h, w)
    k = prior_size / side
    top, left = (side - h) // 2, (side - w) // 2
    spacing = (1.0, 1.0)
    return GridTransform((h, w), spacing, (prior_size, prior_size), (1.0 / k, 1.0 / k), (k, k),
                         ((top + 0.5) * k - 0.5, (left + 0.5) * k - 0.5), spacing_assumed=True)
