"""The parallel-beam projector as a sparse matrix, for the CPU.

`ParallelBeamCT.A` samples each ray bilinearly with `grid_sample`; its adjoint is that kernel's
input gradient, a scatter that the CPU runs serially per view chunk, and it cost about three
quarters of every application of the normal operator AᵀWA in a `pigdm` step. The same map
written out as a sparse matrix (one row per ray, the bilinear weights of its samples summed per
pixel) gives A and Aᵀ as two sparse-dense products, Aᵀ through its own CSR copy so that neither
product scatters. The weights are computed in float64 from the same ray geometry, so the pair
matches `grid_sample` to its float32 rounding of the sample positions (about 1e-5 relative).

Building a matrix sorts every ray sample's four pixel weights once per geometry (a second or two
for 24 views at 256²); the matrices are kept for the last few geometries, since the slices of a
series share one. A geometry whose matrices would take too much memory to build keeps `grid_sample`.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from klviewer.physics.radon import ParallelBeamCT

MATRIX_BUDGET_BYTES = 2**30
"""Most memory a geometry's matrices may take to build: every ray sample's four pixel weights with their
keys and sort order, before the samples that share a pixel are merged. The kept pair is about a
sixth of that (82 MB for 24 views at 256²)."""
KEPT_GEOMETRIES = 2
_BUILD_BYTES_PER_ENTRY = 32  # int64 key, float64 weight, int64 inverse index, and the sort's copy

_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_lock = threading.Lock()


def fits_budget(op: ParallelBeamCT) -> bool:
    """Whether building the geometry's matrices stays within MATRIX_BUDGET_BYTES."""
    entries = 4 * op.n_angles * op.n_detectors * op.n_ray_samples
    return entries * _BUILD_BYTES_PER_ENTRY <= MATRIX_BUDGET_BYTES


def projection_matrices(op: ParallelBeamCT, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, Aᵀ) of `op` as CSR matrices in `dtype`, (views x detectors, H x W) and its transpose;
    None when building them would pass the budget."""
    if not fits_budget(op):
        return None
    key = (op.geometry_key, dtype)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        pair = _build(op, dtype)
        _cache[key] = pair
        while len(_cache) > KEPT_GEOMETRIES:
            _cache.popitem(last=False)
        return pair


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from entries sorted by row, then column, with no repeats."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    with warnings.catch_warnings():  # torch calls its sparse CSR support beta on every construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, size=shape)


def _build(op: ParallelBeamCT, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = op.image_size
    rays, pixels = op.n_angles * op.n_detectors, h * w
    grid = op._forward_grid(slice(None), torch.device("cpu"), torch.float64)  # (views, samples, detectors, 2)
    col = (grid[..., 0] + 1) * 0.5 * (w - 1)  # grid_sample's align_corners=True unnormalisation
    row = (grid[..., 1] + 1) * 0.5 * (h - 1)
    col0, row0 = torch.floor(col), torch.floor(row)
    fc, fr = col - col0, row - row0
    col0, row0 = col0.long(), row0.long()
    ray = (torch.arange(op.n_angles)[:, None, None] * op.n_detectors + torch.arange(op.n_detectors)).expand_as(col0)
    keys, weights = [], []
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        r, c = row0 + dr, col0 + dc
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w) & (weight != 0)  # zeros padding: outside adds nothing
        keys.append(ray[inside] * pixels + r[inside] * w + c[inside])
        weights.append(weight[inside])
    unique, inverse = torch.unique(torch.cat(keys), sorted=True, return_inverse=True)
    values = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, torch.cat(weights))
    values = (values * op.pixel_spacing_mm).to(dtype)
    ray_of, pixel_of = unique // pixels, unique % pixels
    forward = _csr(ray_of, pixel_of, values, (rays, pixels))
    order = torch.argsort(pixel_of * rays + ray_of)
    return forward, _csr(pixel_of[order], ray_of[order], values[order], (pixels, rays))
