"""The EnergyField: per-pixel KL energy per noise-level bin, and KL maps cut from it.

A posterior run adds, at every step, 1/2 * dx_lik^2 / (g^2 dt) to the bin holding that step's
sigma. Any patch size and any sigma window then come from a cumulative sum over bins and a
summed-area table over pixels, so the GUI sliders never need a new sampling run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from klviewer.errors import KlviewerInputError


def log_sigma_edges(sigma_min: float, sigma_max: float, bins: int) -> np.ndarray:
    """Bin edges, log-spaced, slightly widened so the end points fall inside the outer bins."""
    if not 0 < sigma_min < sigma_max:
        raise KlviewerInputError(None, f"sigma range must satisfy 0 < min < max, got {sigma_min}, {sigma_max}")
    return np.geomspace(sigma_min * 0.999, sigma_max * 1.001, bins + 1)


def patch_starts(length: int, patch: int, stride: int) -> np.ndarray:
    """Patch start positions along one axis.

    Tiling (stride == patch) keeps a partial last patch so every pixel counts once. Overlapping
    patches stay inside the image, and the last one is moved flush with the edge.
    """
    if stride >= patch:
        return np.arange(0, length, stride)
    last = max(length - patch, 0)
    return np.unique(np.append(np.arange(0, last + 1, stride), last))


def _sliding_max(grid: np.ndarray, patch: int, axis: int) -> np.ndarray:
    """out[p] = max(grid[p - patch + 1 .. p]) along `axis`."""
    pad = [(0, 0), (0, 0)]
    pad[axis] = (patch - 1, 0)
    padded = np.pad(grid, pad, constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(padded, patch, axis=axis).max(axis=-1)


@dataclass
class KLMap:
    """KL (nats) per patch on a grid, for one patch size, stride and sigma window."""

    values: np.ndarray
    """(rows, cols) patch sums, float64."""
    row_starts: np.ndarray
    col_starts: np.ndarray
    patch: int
    stride: int
    image_shape: tuple[int, int]
    sigma_window: tuple[float, float]

    @property
    def score(self) -> float:
        """The image score: the largest patch KL."""
        return float(self.values.max())

    @property
    def total(self) -> float:
        return float(self.values.sum())

    def patch_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(r0, r1, c0, c1) pixel bounds of one patch, clipped to the image."""
        h, w = self.image_shape
        r0, c0 = int(self.row_starts[row]), int(self.col_starts[col])
        return r0, min(r0 + self.patch, h), c0, min(c0 + self.patch, w)

    def sums_of(self, values: np.ndarray) -> np.ndarray:
        """Sums of a per-pixel (H, W) map over this map's patches, e.g. how much of a mask each touches."""
        return _box_sums(values, self.row_starts, self.col_starts, self.patch)

    def to_pixels(self) -> np.ndarray:
        """(H, W) image where each pixel shows the largest KL among the patches covering it."""
        h, w = self.image_shape
        if self.stride >= self.patch:
            rows = np.searchsorted(self.row_starts, np.arange(h), side="right") - 1
            cols = np.searchsorted(self.col_starts, np.arange(w), side="right") - 1
            return self.values[np.ix_(rows, cols)]
        grid = np.full((h, w), -np.inf)
        grid[np.ix_(self.row_starts, self.col_starts)] = self.values
        covered = _sliding_max(_sliding_max(grid, self.patch, 0), self.patch, 1)
        return np.where(np.isfinite(covered), covered, 0.0)


@dataclass
class EnergyField:
    """KL energy in nats per pixel, per log-spaced sigma bin, averaged over posterior samples."""

    energy: np.ndarray
    """(bins, H, W) float32."""
    sigma_edges: np.ndarray
    """(bins + 1,) increasing."""
    samples: int = 1
    _cumulative: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.energy.ndim != 3 or self.sigma_edges.shape != (self.energy.shape[0] + 1,):
            raise KlviewerInputError(None, f"energy {self.energy.shape} does not match {self.sigma_edges.shape} sigma edges")

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.energy.shape[1]), int(self.energy.shape[2])

    @property
    def sigma_range(self) -> tuple[float, float]:
        return float(self.sigma_edges[0]), float(self.sigma_edges[-1])

    def _cum(self) -> np.ndarray:
        if self._cumulative is None:
            cum = np.zeros((self.energy.shape[0] + 1, *self.image_shape), np.float64)
            np.cumsum(self.energy, axis=0, dtype=np.float64, out=cum[1:])
            self._cumulative = cum
        return self._cumulative

    def _cum_at(self, sigma: float) -> np.ndarray:
        """Cumulative energy below `sigma`, interpolated linearly in log sigma inside a bin."""
        log_edges = np.log(self.sigma_edges)
        s = float(np.clip(np.log(sigma), log_edges[0], log_edges[-1]))
        k = int(np.clip(np.searchsorted(log_edges, s, side="right") - 1, 0, len(log_edges) - 2))
        t = (s - log_edges[k]) / (log_edges[k + 1] - log_edges[k])
        cum = self._cum()
        return cum[k] + t * (cum[k + 1] - cum[k])

    def windowed(self, sigma_window: tuple[float, float] | None = None) -> np.ndarray:
        """(H, W) energy summed over the sigma window (the whole run when None)."""
        if sigma_window is None:
            return self._cum()[-1]
        lo, hi = sigma_window
        if not 0 < lo <= hi:
            raise KlviewerInputError(None, f"sigma window must satisfy 0 < low <= high, got ({lo}, {hi})")
        return self._cum_at(hi) - self._cum_at(lo)

    def total(self, sigma_window: tuple[float, float] | None = None) -> float:
        return float(self.windowed(sigma_window).sum())

    def kl_map(self, patch: int, sigma_window: tuple[float, float] | None = None, stride: int | None = None) -> KLMap:
        """Patch sums of the windowed energy (see `patch_sums`)."""
        window = sigma_window if sigma_window is not None else self.sigma_range
        return patch_sums(self.windowed(sigma_window), patch, stride, (float(window[0]), float(window[1])))


def patch_sums(values: np.ndarray, patch: int, stride: int | None = None,
               sigma_window: tuple[float, float] = (0.0, 0.0)) -> KLMap:
    """Sums of a per-pixel (H, W) map over square patches, via a summed-area table.

    With stride == patch (the default) patches tile the image, the last row/column of patches
    may be partial, and the patch values add up to the map's total.
    """
    stride = patch if stride is None else stride
    h, w = values.shape
    if not 1 <= patch <= max(h, w) or not 1 <= stride <= patch:
        raise KlviewerInputError(None, f"patch must be 1..{max(h, w)} and stride 1..patch, got patch {patch}, stride {stride}")
    r0, c0 = patch_starts(h, patch, stride), patch_starts(w, patch, stride)
    return KLMap(values=_box_sums(values, r0, c0, patch), row_starts=r0, col_starts=c0, patch=patch, stride=stride,
                 image_shape=(h, w), sigma_window=sigma_window)


def _box_sums(values: np.ndarray, r0: np.ndarray, c0: np.ndarray, patch: int) -> np.ndarray:
    """Sums over the square boxes starting at every (r0, c0), clipped to the image, via a summed-area table."""
    h, w = values.shape
    table = np.zeros((h + 1, w + 1), np.float64)
    np.cumsum(np.cumsum(values, axis=0, dtype=np.float64), axis=1, out=table[1:, 1:])
    r1, c1 = np.minimum(r0 + patch, h), np.minimum(c0 + patch, w)
    return table[np.ix_(r1, c1)] - table[np.ix_(r0, c1)] - table[np.ix_(r1, c0)] + table[np.ix_(r0, c0)]
