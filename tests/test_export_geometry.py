"""Maps on the prior's grid land on the right source pixels (checked against the analysis' own resampling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klviewer.export.geometry import patient_orientation, prior_indices, to_source_grid
from klviewer.priors.data import resize_square


def _round_trip(source: np.ndarray, prior_size: int) -> np.ndarray:
    prior = resize_square(torch.from_numpy(source.astype(np.float32))[None], prior_size)[0].numpy()
    return to_source_grid(prior, source.shape)


@pytest.mark.parametrize(("shape", "prior_size"), [((40, 48), 32), ((48, 40), 32), ((96, 96), 32), ((16, 24), 32)])
def test_ramps_come_back_where_they_were(shape: tuple[int, int], prior_size: int) -> None:
    """A linear ramp survives resize_square's linear resampling away from the padding (up to a bias
    of about 0.03 px from the antialiasing filter's discretised window), so after placing it back
    each source pixel may differ only by the nearest-pixel offset: at most half a prior pixel,
    0.5 * max(H, W) / N source pixels. Misplaced padding or an off-by-one adds a whole pixel."""
    h, w = shape
    half_prior_pixel = 0.5 * max(h, w) / prior_size
    margin = int(np.ceil(2 * max(h, w) / prior_size)) + 1  # stay clear of blur from the padded edge
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    for ramp in (rows, cols):
        back = _round_trip(ramp + 100.0, prior_size) - 100.0
        inner = (slice(margin, h - margin), slice(margin, w - margin))
        assert np.abs(back - ramp)[inner].max() <= max(half_prior_pixel, 0.5) + 0.1


def test_every_value_is_kept_exactly() -> None:
    prior_map = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)
    placed = to_source_grid(prior_map, (64, 64))
    assert set(np.unique(placed)) == set(np.unique(prior_map)), "a 2x downsampled map is hit everywhere"
    assert placed.dtype == np.float32 and placed.max() == prior_map.max()
    np.testing.assert_array_equal(placed[::2, ::2], prior_map)
    np.testing.assert_array_equal(placed[1::2, 1::2], prior_map)


def test_padding_offsets() -> None:
    rows, cols = prior_indices((40, 48), 48)  # same side: only the 4-row centre padding remains
    np.testing.assert_array_equal(rows, np.arange(4, 44))
    np.testing.assert_array_equal(cols, np.arange(48))
    with pytest.raises(ValueError):
        to_source_grid(np.zeros((4, 5)), (8, 8))


@pytest.mark.parametrize(("orientation", "letters"), [
    ((1, 0, 0, 0, 1, 0), ("L", "P")),
    ((-1, 0, 0, 0, -1, 0), ("R", "A")),
    ((1, 0, 0, 0, 0, -1), ("L", "F")),
    ((0, 1, 0, 0, 0, -1), ("P", "F")),
    ((0.98, 0.17, 0, -0.17, 0.98, 0), ("L", "P")),
    (None, ("L", "P")),
])
def test_patient_orientation(orientation, letters) -> None:
    assert patient_orientation(orientation) == letters
