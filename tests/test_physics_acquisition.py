"""From an HU slice or a measured sinogram to an Acquisition (operator, y, noise model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from klviewer.errors import KlviewerInputError
from klviewer.io.sinogram_acquisition import acquisition_from_sinogram
from klviewer.io.study import Sinogram
from klviewer.physics.acquisition import DEFAULT_SINOGRAM_SIGMA, simulate_measurement
from klviewer.physics.noise import GaussianNoise, PoissonNoise
from klviewer.physics.units import MU_WATER_PER_MM


def _water_disk(n: int, pixel_mm: float, radius_mm: float, outside_hu: float = -1000.0) -> np.ndarray:
    rows, cols = np.mgrid[:n, :n]
    dist_mm = np.hypot(rows - n // 2, cols - n // 2) * pixel_mm
    return np.where(dist_mm < radius_mm, 0.0, outside_hu).astype(np.float32)


def test_water_disk_line_integral_is_chord_times_mu_water() -> None:
    radius_mm, pixel_mm = 40.0, 0.8  # the image spans 102 mm
    acq = simulate_measurement(_water_disk(128, pixel_mm, radius_mm), pixel_spacing_mm=pixel_mm, n_views=24)
    assert acq.y.shape == (1, 1, 24, math.ceil(math.sqrt(2) * 128))
    assert acq.y.dtype == torch.float32
    centre = acq.y[0, 0, :, acq.operator.n_detectors // 2]
    # Every view passes through the centre; the chord is 2 r (pixelisation: within 1 %).
    np.testing.assert_allclose(centre.numpy(), 2 * radius_mm * MU_WATER_PER_MM, rtol=0.01)
    assert acq.reference_mu is not None
    assert float(acq.reference_mu.max()) == pytest.approx(MU_WATER_PER_MM)
    # FBP of the measurement returns attenuation in 1/mm (24 views: streaks, so a loose check).
    recon = acq.operator.fbp(acq.y)[0, 0]
    assert float(recon[54:74, 54:74].mean()) == pytest.approx(MU_WATER_PER_MM, rel=0.03)


def test_stack_shapes_and_padding_below_air() -> None:
    padded = _water_disk(32, 1.0, 10.0, outside_hu=-2048.0)
    stack = np.stack([padded, np.full((32, 32), -1000.0, dtype=np.float32), padded])
    acq = simulate_measurement(stack, pixel_spacing_mm=1.0, n_views=10)
    assert acq.y.shape == (3, 1, 10, acq.operator.n_detectors)
    assert acq.reference_mu is not None and acq.reference_mu.shape == (3, 1, 32, 32)
    assert float(acq.reference_mu.min()) == 0.0  # -2048 HU padding is read as air
    assert float(acq.y[1].abs().max()) == 0.0
    torch.testing.assert_close(acq.y[0], acq.y[2])


def test_noise_choice_and_seeds() -> None:
    hu = _water_disk(48, 1.0, 15.0)
    clean = simulate_measurement(hu, 1.0, n_views=12)
    assert clean.noise == GaussianNoise(0.0)
    poisson = simulate_measurement(hu, 1.0, n_views=12, i0=1e4, seed=7)
    assert isinstance(poisson.noise, PoissonNoise)
    torch.testing.assert_close(poisson.y, simulate_measurement(hu, 1.0, n_views=12, i0=1e4, seed=7).y, rtol=0, atol=0)
    assert not torch.equal(poisson.y, simulate_measurement(hu, 1.0, n_views=12, i0=1e4, seed=8).y)
    # The residual's scale is what the noise model says (1 / expected counts).
    z = (poisson.y - clean.y) / poisson.noise.variance(clean.y).sqrt()
    assert float(z.std()) == pytest.approx(1.0, abs=0.1)
    gaussian = simulate_measurement(hu, 1.0, n_views=12, noise_sigma=0.02, seed=1)
    assert float((gaussian.y - clean.y).std()) == pytest.approx(0.02, rel=0.1)


def test_describe_records_settings() -> None:
    acq = simulate_measurement(_water_disk(40, 0.8, 10.0), 0.8, n_views=30, i0=2e5, seed=3)
    info = json.loads(json.dumps(acq.describe()))
    assert info["n_views"] == 30 and info["arc_deg"] == pytest.approx(180.0)
    assert info["pixel_spacing_mm"] == 0.8 and info["detector_spacing_mm"] == 0.8
    assert info["n_detectors"] == math.ceil(math.sqrt(2) * 40)
    assert info["noise"] == {"model": "poisson", "i0": 2e5, "zero_count_floor": 0.5}
    assert info["seed"] == 3 and info["source"] == "simulated"
    assert acq.pixel_spacing_mm == 0.8 and acq.angles_rad.shape == (30,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hu": np.array([[0.0, np.nan], [0.0, 0.0]])}, "NaN or infinite"),
        ({"hu": np.array([[0.0, np.inf], [0.0, 0.0]])}, "NaN or infinite"),
        ({"hu": np.zeros(5)}, "must be"),
        ({"hu": np.zeros((4, 4), dtype=bool)}, "real numbers"),
        ({"pixel_spacing_mm": 0.0}, "pixel spacing"),
        ({"i0": 1e4, "noise_sigma": 0.1}, "not both"),
        ({"i0": -5.0}, "i0"),
        ({"n_views": 0}, "n_views"),
    ],
)
def test_bad_input_is_refused(kwargs: dict, message: str) -> None:
    args = {"hu": np.zeros((8, 8)), "pixel_spacing_mm": 1.0, **kwargs}
    with pytest.raises(KlviewerInputError, match=message):
        simulate_measurement(**args)


def _sinogram_of(acq, i0: float | None = None) -> Sinogram:
    op = acq.operator
    line_integrals = acq.y[:, 0].numpy()
    counts = None if i0 is None else np.round(i0 * np.exp(-line_integrals)).astype(np.float32)
    return Sinogram(
        line_integrals=line_integrals,
        angles_rad=op.angles_rad.numpy(),
        detector_spacing_mm=op.detector_spacing_mm,
        grid_size=op.image_size,
        grid_pixel_spacing_mm=(op.pixel_spacing_mm, op.pixel_spacing_mm),
        i0=i0,
        counts=counts,
    )


def test_acquisition_from_sinogram_rebuilds_the_geometry() -> None:
    hu = np.stack([_water_disk(40, 0.7, 10.0), _water_disk(40, 0.7, 5.0)])
    simulated = simulate_measurement(hu, 0.7, n_views=16)
    measured = acquisition_from_sinogram(_sinogram_of(simulated), slice_index=1)
    assert measured.source == "sinogram" and measured.reference_mu is None
    assert measured.noise == GaussianNoise(DEFAULT_SINOGRAM_SIGMA)
    assert measured.operator.describe() == simulated.operator.describe()
    torch.testing.assert_close(measured.y, simulated.y[1:2])
    assert acquisition_from_sinogram(_sinogram_of(simulated)).y.shape == simulated.y.shape
    assert acquisition_from_sinogram(_sinogram_of(simulated), [1, 0]).y.shape[0] == 2
    assert acquisition_from_sinogram(_sinogram_of(simulated), 0, noise_sigma=0.05).noise == GaussianNoise(0.05)


def test_acquisition_from_counts_uses_poisson() -> None:
    simulated = simulate_measurement(_water_disk(40, 1.0, 12.0), 1.0, n_views=8)
    measured = acquisition_from_sinogram(_sinogram_of(simulated, i0=1e5), slice_index=0)
    assert measured.noise == PoissonNoise(1e5)
    torch.testing.assert_close(measured.y, simulated.y, atol=1e-4, rtol=0)  # rounding to whole counts


def test_bad_sinograms_are_refused() -> None:
    sino = _sinogram_of(simulate_measurement(np.zeros((16, 16)), 1.0, n_views=4))
    with pytest.raises(KlviewerInputError, match="slice index"):
        acquisition_from_sinogram(sino, slice_index=3)
    sino.grid_pixel_spacing_mm = (1.0, 0.5)
    with pytest.raises(KlviewerInputError, match="square"):
        acquisition_from_sinogram(sino)
    sino.grid_pixel_spacing_mm = (1.0, 1.0)
    sino.line_integrals[0, 1, 2] = np.nan
    with pytest.raises(KlviewerInputError, match="NaN"):
        acquisition_from_sinogram(sino)
