"""The CPU's sparse-matrix projector is the grid_sample projector, to float32 rounding."""

from __future__ import annotations

import pytest
import torch

import klviewer.physics.radon as radon
from klviewer.physics import radon_matrix
from klviewer.physics.radon import ParallelBeamCT, sparse_view_angles


def _grid_pair(op: ParallelBeamCT, x: torch.Tensor, y: torch.Tensor,
               monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, torch.Tensor]:
    with monkeypatch.context() as m:
        m.setattr(radon, "projection_matrices", lambda op, dtype: None)
        return op.A(x), op.A_adjoint(y)


@pytest.mark.parametrize("size,views,spacing", [(32, 7, 1.0), ((24, 40), 12, 0.7), (33, 5, 2.5)])
def test_the_matrices_are_the_grid_sample_projector(size, views, spacing, monkeypatch: pytest.MonkeyPatch) -> None:
    op = ParallelBeamCT(size, sparse_view_angles(views), pixel_spacing_mm=spacing)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, *op.image_size, generator=g)
    y = torch.rand(3, 1, *op.sinogram_shape, generator=g)
    assert radon_matrix.projection_matrices(op, torch.float32) is not None
    by_grid = _grid_pair(op, x, y, monkeypatch)
    for mine, theirs in zip((op.A(x), op.A_adjoint(y)), by_grid):
        assert mine.shape == theirs.shape
        assert float((mine - theirs).norm() / theirs.norm()) < 1e-4


def test_the_matrices_are_an_adjoint_pair_in_float64() -> None:
    op = ParallelBeamCT(20, sparse_view_angles(9, 360.0), n_detectors=25, detector_spacing_mm=1.3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 20, 20, generator=g, dtype=torch.float64)
    y = torch.randn(2, 1, *op.sinogram_shape, generator=g, dtype=torch.float64)
    assert op.A(x).dtype == torch.float64
    assert float((op.A(x) * y).sum()) == pytest.approx(float((x * op.A_adjoint(y)).sum()), rel=1e-12)


def test_gradients_flow_through_the_matrices() -> None:
    op = ParallelBeamCT(16, sparse_view_angles(6))
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    y = torch.rand(1, 1, *op.sinogram_shape)
    (op.A(x) * y).sum().backward()
    assert torch.allclose(x.grad, op.A_adjoint(y), rtol=1e-5, atol=1e-6)


def test_one_geometry_is_built_once_and_few_are_kept() -> None:
    a = ParallelBeamCT(16, sparse_view_angles(6))
    b = ParallelBeamCT(16, sparse_view_angles(6))
    assert radon_matrix.projection_matrices(a, torch.float32) is radon_matrix.projection_matrices(b, torch.float32)
    for views in range(7, 7 + radon_matrix.KEPT_GEOMETRIES):
        radon_matrix.projection_matrices(ParallelBeamCT(16, sparse_view_angles(views)), torch.float32)
    assert len(radon_matrix._cache) <= radon_matrix.KEPT_GEOMETRIES


def test_a_geometry_over_the_budget_keeps_grid_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    op = ParallelBeamCT(16, sparse_view_angles(6))
    monkeypatch.setattr(radon_matrix, "MATRIX_BUDGET_BYTES", 1000)
    assert radon_matrix.projection_matrices(op, torch.float32) is None
    x = torch.rand(1, 1, 16, 16)
    by_grid = _grid_pair(op, x, op.A(x), monkeypatch)
    assert torch.equal(op.A(x), by_grid[0])
