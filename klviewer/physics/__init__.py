"""CT physics: parallel-beam Radon operator, noise models, HU <-> attenuation, measurements."""

from klviewer.physics.acquisition import Acquisition, acquisition_from_sinogram, simulate_measurement
from klviewer.physics.inpainting import Inpainting, random_mask
from klviewer.physics.noise import GaussianNoise, NoiseModel, PoissonNoise, from_counts
from klviewer.physics.radon import ParallelBeamCT, sparse_view_angles
from klviewer.physics.units import MU_WATER_PER_MM, hu_to_mu, mu_to_hu

__all__ = [
    "MU_WATER_PER_MM",
    "Acquisition",
    "GaussianNoise",
    "Inpainting",
    "NoiseModel",
    "ParallelBeamCT",
    "PoissonNoise",
    "acquisition_from_sinogram",
    "from_counts",
    "hu_to_mu",
    "mu_to_hu",
    "random_mask",
    "simulate_measurement",
    "sparse_view_angles",
]
