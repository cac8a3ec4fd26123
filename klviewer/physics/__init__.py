"""CT physics: the linear-operator protocol, parallel-beam Radon operator, noise models, HU <-> attenuation,
simulated measurements."""

from klviewer.physics.acquisition import Acquisition, simulate_measurement
from klviewer.physics.inpainting import Inpainting, random_mask
from klviewer.physics.noise import GaussianNoise, NoiseModel, PoissonNoise, from_counts
from klviewer.physics.operator import LinearOperator
from klviewer.physics.radon import ParallelBeamCT, sparse_view_angles
from klviewer.physics.units import MU_WATER_PER_MM, hu_to_mu, mu_to_hu

__all__ = [
    "MU_WATER_PER_MM",
    "Acquisition",
    "GaussianNoise",
    "Inpainting",
    "LinearOperator",
    "NoiseModel",
    "ParallelBeamCT",
    "PoissonNoise",
    "from_counts",
    "hu_to_mu",
    "mu_to_hu",
    "random_mask",
    "simulate_measurement",
    "sparse_view_angles",
]
