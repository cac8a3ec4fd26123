"""Placing maps made on the prior's grid back onto the source image's pixel grid.

The analysis puts a (H, W) source slice on the prior's N x N grid with `resize_square`:
centre-pad to a square of side S = max(H, W) (pad_h // 2 rows on top, pad_w // 2 columns on
the left), then resample S -> N. So source pixel (r, c) lies at padded position
(r + pad_h // 2, c + pad_w // 2), and its centre falls in prior pixel
floor((position + 0.5) * N / S). Maps are carried back with exactly that nearest-pixel lookup:
a KL patch value is a sum over a patch, not an intensity, so interpolating between patches
would invent values; nearest keeps every value (and the score, the map's maximum) exact and
patch edges sharp.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def prior_indices(source_shape: tuple[int, int], prior_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each source row and column, the prior-grid row and column its centre falls in."""
    h, w = source_shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    rows = np.floor((np.arange(h) + top + 0.5) * prior_size / side).astype(np.int64)
    cols = np.floor((np.arange(w) + left + 0.5) * prior_size / side).astype(np.int64)
    return np.clip(rows, 0, prior_size - 1), np.clip(cols, 0, prior_size - 1)


def to_source_grid(prior_map: np.ndarray, source_shape: tuple[int, int]) -> np.ndarray:
    """A (N, N) map on the prior's grid as a (H, W) map on the source grid (nearest prior pixel)."""
    n = prior_map.shape[0]
    if prior_map.shape != (n, n):
        raise ValueError(f"prior-grid maps are square, got {prior_map.shape}")
    rows, cols = prior_indices(source_shape, n)
    return prior_map[np.ix_(rows, cols)]


_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))


def patient_orientation(image_orientation: Sequence[float] | None) -> tuple[str, str]:
    """DICOM PatientOrientation letters (row direction, column direction) from ImageOrientationPatient.

    Each direction is named by its dominant patient axis (+x = L, +y = P, +z = H); an image
    without orientation is taken as a standard axial slice (L, P).
    """
    if image_orientation is None or len(image_orientation) != 6:
        return "L", "P"
    letters = []
    for vector in (image_orientation[:3], image_orientation[3:]):
        axis = int(np.argmax(np.abs(vector)))
        letters.append(_AXIS_LETTERS[axis][1 if vector[axis] > 0 else 0])
    return letters[0], letters[1]
