"""Maps on the prior's grid land on the right source pixels, for the physical grid and for older results."""

from __future__ import annotations

import numpy as np
import pytest

from klviewer.export.geometry import patient_orientation, to_source_grid
from klviewer.physics.grid import GridTransform, square_pad_transform


@pytest.mark.parametrize(("shape", "spacing"), [((40, 48), (0.5, 0.5)), ((48, 40), (0.8, 0.8)), ((96, 96), (0.3, 0.3)),
                                                ((16, 24), (3.0, 2.0))])
def test_ramps_come_back_where_they_were(shape: tuple[int, int], spacing: tuple[float, float]) -> None:
    """A linear ramp survives the linear resampling onto a 32-pixel, 1.5 mm grid away from the image edge, so after
    placing it back each source pixel may differ only by the nearest-pixel offset: at most half a prior pixel,
    0.5 * 1.5 / spacing source pixels. A misplaced centre or an off-by-one adds a whole pixel."""
    grid = GridTransform.centred(shape, spacing, (32, 32), (1.5, 1.5))
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    for ramp, axis in ((rows, 0), (cols, 1)):
        back = to_source_grid(grid.resample_to_target(ramp + 100.0, fill=np.nan), grid) - 100.0
        margin = int(np.ceil(3 * 1.5 / spacing[axis])) + 1  # stay clear of the blur at the image edge
        inner = (slice(margin, h - margin), slice(margin, w - margin))
        half_prior_pixel = 0.5 * 1.5 / spacing[axis]
        finite = np.isfinite(back[inner])
        assert finite.all() or min(shape) * min(spacing) > 48, "inside the prior's field of view every pixel is mapped"
        assert np.abs(back - ramp)[inner][finite].max() <= max(half_prior_pixel, 0.5) + 0.1


def test_every_value_is_kept_exactly() -> None:
    grid = GridTransform.centred((64, 64), (0.5, 0.5), (32, 32), (1.0, 1.0))
    prior_map = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)
    placed = to_source_grid(prior_map, grid)
    assert set(np.unique(placed)) == set(np.unique(prior_map)), "a 2x downsampled map is hit everywhere"
    assert placed.dtype == np.float32 and placed.max() == prior_map.max()
    np.testing.assert_array_equal(placed[::2, ::2], prior_map)
    np.testing.assert_array_equal(placed[1::2, 1::2], prior_map)


def test_a_small_field_of_view_sits_in_the_middle_and_the_rest_is_outside() -> None:
    grid = GridTransform.centred((10, 10), (1.0, 1.0), (40, 40), (1.0, 1.0))
    assert grid.offset == (15.0, 15.0) and grid.scale == (1.0, 1.0)
    marked = np.zeros((40, 40), np.float32)
    marked[15:25, 15:25] = 1.0
    assert (to_source_grid(marked, grid) == 1.0).all()
    on_target = grid.resample_to_target(np.full((10, 10), 50.0))
    assert on_target[0, 0] == -1000.0 and on_target[20, 20] == pytest.approx(50.0)


def test_older_results_use_their_square_padding() -> None:
    """Results written before the grid was recorded were centre-padded to a square, then resampled by pixel count."""
    grid = square_pad_transform((40, 48), 48)  # same side: only the 4-row centre padding remains
    rows, cols = grid.to_target(np.arange(40), np.arange(48))
    np.testing.assert_allclose(rows, np.arange(4, 44))
    np.testing.assert_allclose(cols, np.arange(48))
    assert grid.spacing_assumed


def test_the_transform_reads_back_and_refuses_nonsense() -> None:
    grid = GridTransform.centred((40, 48), (0.7, 0.7), (32, 32), (1.5625, 1.5625))
    assert GridTransform.from_dict(grid.to_dict()) == grid
    with pytest.raises(ValueError, match="scale"):
        GridTransform.from_dict({**grid.to_dict(), "scale": [0.0, 1.0]})
    with pytest.raises(ValueError, match="source_shape"):
        GridTransform.from_dict({k: v for k, v in grid.to_dict().items() if k != "source_shape"})


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
