"""KL divergence between two diffusion priors, from clean images or from measurements only.

Image domain (Shoushtari et al. Eq. 4 with Tweedie):

    KL(p || q) = int_0^inf E_{x~p} || D_p(x + s n) - D_q(x + s n) ||^2 s^-3 ds .

Measurement domain: both denoisers see the *same* noisy zero-filled measurement
``u = V P (V^T x + s n)`` (noise on the observed coefficients only), and the squared difference
is counted on the observed coefficients with the weight 1 / E[P] (``weighting="derived"``; the
paper's printed ``W = E[P]^(-3/2)`` on all coefficients is ``"paper"``). Exact for product
distributions along V under random masks (inpainting, masked Fourier). Sparse-view CT has one
fixed operator: the observed coefficients are the row space of A, found by conjugate gradients,
and the estimate is an approximation. docs/shift_kl.md has the derivation, the sigma grid and
quadrature, the CT approximation and the measured errors.

Every estimator draws its noise from one CPU generator seeded with ``seed`` in a fixed order, so
the same seed gives the same noise for every pair of priors (common random numbers: rankings
compare priors on identical draws) and on every device.
"""

from klviewer.inference.shift_kl.core import (
    Progress,
    ShiftCurve,
    check_compatible,
    check_sigma_grid,
    cumulative_integral,
    default_sigma_grid,
    image_kl,
    image_kl_curves,
)
from klviewer.inference.shift_kl.ct import (
    CT_WEIGHTINGS,
    DEFAULT_CG_ITERS,
    measurement_kl,
    measurement_kl_curves,
    radial_index,
)
from klviewer.inference.shift_kl.masked import (
    DENOISERS,
    RATE_STEP,
    WEIGHTINGS,
    MaskedMeasurements,
    MaskFamily,
    fourier_family,
    inpainting_family,
    marginal_denoise,
    measurement_kl_operator,
    measurement_kl_operator_curves,
    simulate_masked,
    thin_measurements,
)

__all__ = [
    "CT_WEIGHTINGS",
    "DEFAULT_CG_ITERS",
    "DENOISERS",
    "RATE_STEP",
    "WEIGHTINGS",
    "MaskFamily",
    "MaskedMeasurements",
    "Progress",
    "ShiftCurve",
    "check_compatible",
    "check_sigma_grid",
    "cumulative_integral",
    "default_sigma_grid",
    "fourier_family",
    "image_kl",
    "image_kl_curves",
    "inpainting_family",
    "marginal_denoise",
    "measurement_kl",
    "measurement_kl_curves",
    "measurement_kl_operator",
    "measurement_kl_operator_curves",
    "radial_index",
    "simulate_masked",
    "thin_measurements",
]
