"""Placing maps made on the prior's grid back onto the source image's pixel grid, and DICOM orientation.

Each result records how its source grid maps onto the prior's (`klviewer.physics.grid`); older
results get the square padding by pixel count they were made with. Maps are carried back with a
nearest-pixel lookup: a KL patch value is a sum over a patch, not an intensity, so interpolating
between patches would invent values; nearest keeps every value (and the score, the map's maximum)
exact and patch edges sharp.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from klviewer.physics.grid import GridTransform


def to_source_grid(prior_map: np.ndarray, grid: GridTransform) -> np.ndarray:
    """A map on the prior's grid as a map on the source grid (nearest prior pixel; 0 outside the prior's grid)."""
    return grid.resample_to_source(prior_map, nearest=True, fill=0.0)


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
