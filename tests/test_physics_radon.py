"""The parallel-beam operator: skimage agreement, exact adjoint, FBP accuracy and units."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon, resize

from klviewer.physics.radon import ParallelBeamCT, fbp_view_weights, sparse_view_angles


def _phantom(n: int) -> np.ndarray:
    return resize(shepp_logan_phantom(), (n, n), anti_aliasing=True)


def _rel(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _disk(shape: tuple[int, int], radius_px: float) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (np.hypot(rows - shape[0] // 2, cols - shape[1] // 2) < radius_px).astype(np.float64)


def test_sparse_view_angles_exclude_the_endpoint() -> None:
    angles = sparse_view_angles(4)
    assert angles.dtype == torch.float64
    np.testing.assert_allclose(angles.numpy(), [0, math.pi / 4, math.pi / 2, 3 * math.pi / 4])
    np.testing.assert_allclose(sparse_view_angles(3, arc_deg=360.0).numpy(), np.deg2rad([0, 120, 240]))


@pytest.mark.parametrize("n", [64, 128])
def test_forward_matches_skimage_radon(n: int) -> None:
    image = _phantom(n)
    angles = sparse_view_angles(45)
    op = ParallelBeamCT(n, angles)
    ours = op.A(torch.from_numpy(image).float()[None, None])[0, 0].numpy()
    reference = radon(image, theta=np.rad2deg(angles.numpy()), circle=False)  # (n_det, n_angles)
    assert op.n_detectors == reference.shape[0]
    # Same bilinear rotation-and-sum; we see ~3e-7 (float32 rounding).
    assert _rel(ours, reference.T) < 1e-5


def test_forward_matches_skimage_on_a_non_square_image() -> None:
    image = np.random.default_rng(0).random((37, 52))
    angles = torch.tensor([0.1, 0.7, 1.9, 2.5, 3.0], dtype=torch.float64)
    op = ParallelBeamCT((37, 52), angles)
    ours = op.A(torch.from_numpy(image)[None, None])[0, 0].numpy()
    reference = radon(image, theta=np.rad2deg(angles.numpy()), circle=False)
    assert _rel(ours, reference.T) < 1e-10  # float64 input runs in float64


@pytest.mark.parametrize(
    ("size", "n_detectors", "detector_spacing_mm", "pixel_spacing_mm"),
    [
        ((32, 32), None, None, 1.0),
        ((33, 47), None, None, 0.8),
        ((47, 33), 40, 1.7, 0.8),
        ((31, 31), 90, 0.4, 0.5),
    ],
)
def test_adjoint_is_exact(size, n_detectors, detector_spacing_mm, pixel_spacing_mm) -> None:
    op = ParallelBeamCT(size, sparse_view_angles(17, 200.0), n_detectors, detector_spacing_mm, pixel_spacing_mm)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, *op.sinogram_shape, generator=g, dtype=torch.float64)
    lhs, rhs = (op.A(x) * y).sum(), (x * op.A_adjoint(y)).sum()
    assert abs(float(lhs - rhs)) / abs(float(lhs)) < 1e-12
    lhs32, rhs32 = (op.A(x.float()) * y.float()).sum(), (x.float() * op.A_adjoint(y.float())).sum()
    assert abs(float(lhs32 - rhs32)) / abs(float(lhs32)) < 1e-5


def test_batches_and_channels_are_independent() -> None:
    op = ParallelBeamCT((24, 20), sparse_view_angles(7))
    x = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    y = op.A(x)
    assert y.shape == (2, 3, 7, op.n_detectors)
    torch.testing.assert_close(y[1, 2:3], op.A(x[1:2, 2:3])[0])
    torch.testing.assert_close(op.A_adjoint(y)[0, 1], op.A_adjoint(y[:1, 1:2])[0, 0])
    torch.testing.assert_close(op.fbp(y)[1, 0], op.fbp(y[1:2, :1])[0, 0])


def test_uncached_grids_give_the_same_results() -> None:
    angles = sparse_view_angles(9)
    cached, uncached = ParallelBeamCT(32, angles), ParallelBeamCT(32, angles, cache_mb=0)
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    y = cached.A(x)
    torch.testing.assert_close(uncached.A(x), y)
    torch.testing.assert_close(uncached.A_adjoint(y), cached.A_adjoint(y))
    torch.testing.assert_close(uncached.fbp(y), cached.fbp(y))
    assert not uncached._grids and cached._grids


def test_autograd_uses_the_adjoint() -> None:
    op = ParallelBeamCT((10, 9), sparse_view_angles(3))
    x = torch.rand(1, 1, 10, 9, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 1, *op.sinogram_shape, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(op.A, (x,))
    torch.autograd.gradcheck(op.A_adjoint, (y,))
    torch.autograd.gradgradcheck(lambda v: (op.A(v) ** 2).sum(), (x,))


def test_fbp_reconstructs_the_phantom_and_agrees_with_iradon() -> None:
    n = 128
    image = _phantom(n)
    angles = sparse_view_angles(180)
    op = ParallelBeamCT(n, angles)
    sino = op.A(torch.from_numpy(image).float()[None, None])
    recon = op.fbp(sino)[0, 0].numpy()
    # Shepp-Logan's sharp edges dominate: we see 0.137 (skimage's own iradon: the same).
    assert _rel(recon, image) < 0.15
    reference = iradon(sino[0, 0].numpy().T.astype(np.float64), theta=np.rad2deg(angles.numpy()), output_size=n, circle=False)
    assert _rel(recon, reference) < 1e-3  # we see 1.1e-4; the filters are built the same way
    assert _rel(op.A_dagger(sino)[0, 0].numpy(), image) < 0.15


def test_fbp_of_a_smooth_object_is_accurate_with_every_filter() -> None:
    n = 96
    rows, cols = np.mgrid[:n, :n] - n // 2
    image = np.exp(-(rows**2 + cols**2) / (2 * 12.0**2)) + 0.5 * np.exp(-((rows - 10) ** 2 + (cols + 15) ** 2) / (2 * 5.0**2))
    op = ParallelBeamCT(n, sparse_view_angles(180))
    sino = op.A(torch.from_numpy(image).float()[None, None])
    errors = {f: _rel(op.fbp(sino, filter=f)[0, 0].numpy(), image) for f in ("ramp", "shepp-logan", "hann")}
    # We see ramp 0.0023, shepp-logan 0.0029, hann 0.0057 (the window smooths the small blob).
    assert errors["ramp"] < 0.005
    assert errors["shepp-logan"] < 0.006
    assert errors["hann"] < 0.012
    with pytest.raises(ValueError, match="unknown FBP filter"):
        op.fbp(sino, filter="cosine")  # type: ignore[arg-type]


@pytest.mark.parametrize(("arc_deg", "n_views"), [(180.0, 180), (360.0, 360), (360.0, 181)])
@pytest.mark.parametrize(("pixel_mm", "detector_mm"), [(1.0, 1.0), (0.5, 0.5), (0.7, 1.05)])
def test_fbp_recovers_attenuation_in_mm_units(arc_deg: float, n_views: int, pixel_mm: float, detector_mm: float) -> None:
    mu = 0.02  # 1/mm, about water
    n = 96
    disk = _disk((n, n), radius_px=30) * mu
    op = ParallelBeamCT(
        n,
        sparse_view_angles(n_views, arc_deg),
        n_detectors=math.ceil(math.sqrt(2) * n * pixel_mm / detector_mm),
        detector_spacing_mm=detector_mm,
        pixel_spacing_mm=pixel_mm,
    )
    recon = op.fbp(op.A(torch.from_numpy(disk).float()[None, None]))[0, 0].numpy()
    inner = _disk((n, n), radius_px=20).astype(bool)
    # The central line integral is the chord, 2 * radius (59 of 60 px are inside "< 30 px").
    assert float(op.A(torch.from_numpy(disk).float()[None, None])[0, 0, 0].max()) == pytest.approx(2 * 30 * pixel_mm * mu, rel=0.03)
    assert recon[inner].mean() == pytest.approx(mu, rel=0.003)  # we see at most 0.04 % off


def test_view_weights_cover_half_a_turn() -> None:
    for angles in (sparse_view_angles(24), sparse_view_angles(24, 360.0), sparse_view_angles(23, 360.0)):
        w = fbp_view_weights(angles)
        assert float(w.sum()) == pytest.approx(math.pi)
    # Opposite views share a direction, so a 360 degree scan halves each view's weight.
    np.testing.assert_allclose(fbp_view_weights(sparse_view_angles(24, 360.0)).numpy(), math.pi / 24)
    # A limited arc is a Riemann sum over the views; the missing wedge gets no weight.
    np.testing.assert_allclose(fbp_view_weights(sparse_view_angles(12, 90.0)).numpy(), math.radians(90 / 12))
    assert float(fbp_view_weights(torch.tensor([0.4])).item()) == pytest.approx(math.pi)
    # Angles stored as float32 (as sinogram files do) still pair up opposite views.
    stored = sparse_view_angles(36, 360.0).float()
    np.testing.assert_allclose(fbp_view_weights(stored).numpy(), math.pi / 36, rtol=1e-5)
    # Golden-angle gaps are uneven but not a wedge: the weights still cover half a turn.
    golden = torch.arange(40, dtype=torch.float64) * (2 * math.pi / (1 + math.sqrt(5)))  # pi / phi
    assert float(fbp_view_weights(golden).sum()) == pytest.approx(math.pi)


def test_describe_and_shape_checks() -> None:
    op = ParallelBeamCT((20, 30), sparse_view_angles(6, 120.0), pixel_spacing_mm=0.5)
    info = op.describe()
    assert info["n_views"] == 6 and info["arc_deg"] == pytest.approx(120.0) and info["n_detectors"] == math.ceil(math.sqrt(2) * 30)
    assert info["detector_spacing_mm"] == 0.5
    with pytest.raises(ValueError, match="image must have shape"):
        op.A(torch.zeros(1, 1, 30, 20))
    with pytest.raises(ValueError, match="sinogram must have shape"):
        op.A_adjoint(torch.zeros(1, 6, op.n_detectors))
    with pytest.raises(ValueError, match="float32 or float64"):
        op.A(torch.zeros(1, 1, 20, 30, dtype=torch.int32))
    with pytest.raises(ValueError, match="finite"):
        ParallelBeamCT(8, torch.tensor([0.0, float("nan")]))
