"""Diffusion priors: the Prior interface, the EDM UNet, analytic Gaussian/GMM priors,
checkpoints (config.json + model.safetensors), import of diffusers UNet2DModel folders, training.

Heavy or optional pieces (training, diffusers) are imported from their modules on demand.
"""

from klviewer.priors.base import ARCHITECTURES, Prior, PriorConfig
from klviewer.priors.checkpoint import DEFAULT_PRIOR, list_priors, load_prior, save_prior
from klviewer.priors.gaussian import GaussianMixturePrior, GaussianPrior
from klviewer.priors.unet import EDMUNetPrior

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_PRIOR",
    "EDMUNetPrior",
    "GaussianMixturePrior",
    "GaussianPrior",
    "Prior",
    "PriorConfig",
    "list_priors",
    "load_prior",
    "save_prior",
]
