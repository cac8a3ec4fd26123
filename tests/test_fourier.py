"""The masked-Fourier operator: line masks, adjointness, and the zero-filled projection."""

import pytest
import torch

from klviewer.physics.fourier import (
    MaskedFourier,
    fft2c,
    ifft2c,
    is_hermitian_symmetric,
    line_frequencies,
    line_keep_probabilities,
    random_line_mask,
)


def test_orthonormal_fft_round_trip_and_norm():
    x = torch.randn(2, 1, 8, 6, dtype=torch.float64)
    k = fft2c(x)
    assert torch.allclose(k.abs().pow(2).sum(), x.pow(2).sum())
    assert torch.allclose(ifft2c(k).real, x)


def test_line_mask_keeps_whole_mirrored_rows_and_acs():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = random_line_mask((16, 12), 0.4, g, acs=3)
        assert mask.shape == (16, 12) and mask.dtype == torch.bool
        assert torch.equal(mask, mask[:, :1].expand(16, 12))  # whole rows
        assert is_hermitian_symmetric(mask)
        freq = line_frequencies(16)
        assert bool(mask[freq.abs() <= 1, 0].all())  # the 3 centre lines


def test_line_mask_keep_rate_matches_keep_probabilities():
    g = torch.Generator().manual_seed(1)
    masks = torch.stack([random_line_mask((32, 4), 0.3, g, acs=5)[:, 0] for _ in range(4000)]).double()
    expected = line_keep_probabilities(32, 0.3, acs=5)
    assert expected[line_frequencies(32).abs() <= 2].eq(1.0).all()
    assert (expected == 0.3).sum() == 27
    assert torch.allclose(masks.mean(0), expected, atol=0.03)


@pytest.mark.parametrize("acs", [2, -1, 41])
def test_bad_acs_is_refused(acs):
    with pytest.raises(ValueError, match="acs"):
        line_keep_probabilities(32, 0.5, acs)


def test_adjoint_is_exact_for_the_real_inner_product():
    g = torch.Generator().manual_seed(2)
    op = MaskedFourier(random_line_mask((8, 8), 0.5, g, acs=1))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.complex(torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64))
    lhs = (op.A(x).conj() * y).real.sum()
    rhs = (x * op.A_adjoint(y)).sum()
    assert torch.allclose(lhs, rhs)


def test_zero_filled_projection_is_real_idempotent_and_symmetric():
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[[0, 2, 8, 5]] = True  # DC, the pair +-2, and the Nyquist row
    op = MaskedFourier(mask)
    x, z = torch.randn(2, 1, 1, 10, 10, dtype=torch.float64)
    px = op.project(x)
    assert px.dtype == torch.float64
    assert torch.allclose(op.project(px), px)
    assert torch.allclose((px * z).sum(), (x * op.project(z)).sum())
    assert torch.allclose(op.A_dagger(op.A(x)), px)
    assert px.norm() < x.norm()
    assert torch.allclose(fft2c(px)[..., [1, 3, 4, 6, 7, 9], :].abs(), torch.zeros(1, dtype=torch.float64))


def test_full_mask_is_identity():
    op = MaskedFourier(torch.ones(6, 6, dtype=torch.bool))
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    assert torch.allclose(op.project(x), x)


def test_asymmetric_or_non_boolean_masks_are_refused():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[1] = True  # row +1 without its mirror row -1
    with pytest.raises(ValueError, match="Hermitian"):
        MaskedFourier(mask)
    with pytest.raises(ValueError, match="boolean"):
        MaskedFourier(torch.ones(8, 8))
