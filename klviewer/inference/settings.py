"""The settings of one analysis: acquisition, sampler and KL map, as every output records them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from klviewer.inference.sampler import SamplerSettings


@dataclass
class AnalysisSettings:
    """Acquisition, sampler and map settings of one analysis, as recorded in every output."""

    views: int = 24
    dose_i0: float | None = None
    noise_sigma: float | None = None
    steps: int = 100
    samples: int = 1
    patch: int = 8
    sigma_window: tuple[float, float] | None = (0.01, 0.5)
    seed: int = 0
    device: str = "auto"
    guidance: str = "pigdm"
    dps_step: float = SamplerSettings.dps_step
    """Step size of `dps` guidance (see SamplerSettings)."""
    flag_threshold: float | None = None
    """Image score (nats) above which a slice is flagged; None = the prior's calibrated value."""
    sigma_min: float = SamplerSettings.sigma_min
    """The noise level the sampler stops at (then one last step to 0)."""
    sigma_max: float = SamplerSettings.sigma_max
    """The noise level the sampler starts from (pure noise)."""
    branch_sigma: float | None = None
    """None: every posterior sample is its own chain. A noise level: the samples share one chain of
    `steps` levels down to it and branch there (SamplerSettings.branch_sigma)."""
    branch_steps: int = 0
    trunks: int = 1
    """Branched: how many chains run down to `branch_sigma`, each branching into samples / trunks (SamplerSettings.trunks)."""
    high_guidance: str | None = None
    """With `high_sigma`: the guidance of the steps above that noise level (SamplerSettings.high_guidance)."""
    high_sigma: float | None = None
    precision: str = SamplerSettings.precision
    """The denoiser's arithmetic (SamplerSettings.precision)."""
    cg_iters: int = SamplerSettings.cg_iters
    """Conjugate-gradient iterations of each step's data-consistency solve (`dc`, `pigdm`)."""
    antithetic: bool = SamplerSettings.antithetic
    """Chains in antithetic pairs (SamplerSettings.antithetic)."""

    def sampler(self, slice_seed: int) -> SamplerSettings:
        return SamplerSettings(steps=self.steps, samples=self.samples, seed=slice_seed, guidance=self.guidance,  # type: ignore[arg-type]
                               dps_step=self.dps_step, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                               branch_sigma=self.branch_sigma,
                               branch_steps=self.branch_steps, trunks=self.trunks, high_guidance=self.high_guidance,
                               high_sigma=self.high_sigma, precision=self.precision, cg_iters=self.cg_iters,
                               antithetic=self.antithetic)

    @property
    def step_count(self) -> int:
        """Sampler steps per slice, every posterior sample's counted (what progress counts)."""
        return self.sampler(0).step_count

    def describe_chains(self) -> str:
        """The posterior chains and the denoiser's arithmetic, e.g. "4 independent sample(s) x 100 steps"."""
        if self.branch_sigma is None:
            kind = "antithetic" if self.antithetic else "independent"
            chains = f"{self.samples} {kind} sample(s) x {self.steps} steps"
            if self.sigma_max != SamplerSettings.sigma_max:
                chains += f" from sigma {self.sigma_max:g}"
            if self.sigma_min != SamplerSettings.sigma_min:
                chains += f" to sigma {self.sigma_min:g}"
        else:
            trunk = f"{self.steps} steps" if self.trunks == 1 else f"{self.trunks} chains x {self.steps} steps"
            chains = (f"{trunk} to sigma {self.branch_sigma:g}, then {self.samples} branches x "
                      f"{self.branch_steps} steps to {self.sigma_min:g}")
        solve = "" if self.cg_iters == SamplerSettings.cg_iters else f", {self.cg_iters} CG iteration(s) per step"
        return chains + solve + (", bfloat16 denoiser" if self.precision != "float32" else "")

    def describe_sampling(self) -> str:
        """One line: guidance, chains and map settings."""
        window = "" if self.sigma_window is None else f", sigma {self.sigma_window[0]:g}-{self.sigma_window[1]:g}"
        high = "" if self.high_sigma is None else f" ({self.high_guidance} above sigma {self.high_sigma:g})"
        return f"{self.guidance}{high}, {self.describe_chains()}, patch {self.patch}{window}"

    def changed_extras(self) -> dict[str, Any]:
        """The sampling settings added after calibrations were first written (EXTRA_SAMPLING_KEYS) that
        differ from their defaults; a calibration entry names only these, so older entries still match."""
        d = self.to_dict()
        return {k: d[k] for k in EXTRA_SAMPLING_KEYS if d[k] != _EXTRA_DEFAULTS[k]}

    def slice_seed(self, index: int) -> int:
        """The random stream of slice `index`: a slice keeps its measurement and samples whichever slices run with it."""
        return self.seed * 100_003 + index

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sigma_window"] = None if self.sigma_window is None else list(self.sigma_window)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnalysisSettings:
        d = dict(d)
        if d.get("sigma_window") is not None:
            d["sigma_window"] = tuple(d["sigma_window"])
        return cls(**d)


EXTRA_SAMPLING_KEYS = ("sigma_min", "sigma_max", "branch_sigma", "branch_steps", "trunks", "high_guidance", "high_sigma",
                       "precision", "cg_iters", "antithetic")
_EXTRA_DEFAULTS = {k: getattr(AnalysisSettings, k) for k in EXTRA_SAMPLING_KEYS}
MAP_ONLY_KEYS = ("patch", "sigma_window", "flag_threshold")


def sampling_key(settings: AnalysisSettings) -> tuple[tuple[str, Any], ...]:
    """The settings that need a new sampling run when they change."""
    d = settings.to_dict()
    return tuple(sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in d.items() if k not in MAP_ONLY_KEYS))


DETECTION_SETTINGS = AnalysisSettings(samples=4, patch=4, sigma_window=(0.01, 0.05))
"""The detection settings: 4 independent chains, z-scores over 4 px patches in the sigma window where lesions show."""
FAST_SETTINGS = AnalysisSettings(precision="bfloat16")
"""The standard settings with the denoiser in bfloat16: about 1.25x faster on a CPU with AVX-512 BF16, with
the same detection on the phantom benchmark (docs/screening.md)."""
SCREENING_SETTINGS = AnalysisSettings(samples=2, patch=4, sigma_window=(0.01, 0.05), precision="bfloat16",
                                      high_guidance="dc", high_sigma=1.0, steps=89, sigma_min=0.01)
"""Two chains with the bfloat16 denoiser and the detection map, `dc` guidance (no vector-Jacobian product) on the
steps above sigma 1, and no steps below the detection window: the chains stop at sigma 0.01 and denoise from there
in one step (the standard schedule's first 89 of 100 noise levels). A series costs about 2.4x the prior's 100
forward passes on a CPU with AVX-512 BF16 (where bfloat16 is not native: `klviewer.inference.precision`), 0.87
of the same chains to sigma 0.002, with the dataset AUROC of those within the phantom benchmark's noise and the
localisation about 0.008 lower (docs/screening.md)."""
MAX_SAMPLES = 64
"""Most posterior samples per slice that the commands and the app offer. A slice's chains share one batch, so
this bounds the memory a run's options can ask for."""
PROFILES = {"standard": AnalysisSettings(), "fast": FAST_SETTINGS, "screening": SCREENING_SETTINGS,
            "detection": DETECTION_SETTINGS}
"""Named settings a prior is calibrated for; `--profile` picks one and the other options change it."""
DEFAULT_PROFILE = "standard"
NAMED_SETTINGS = {"default": PROFILES[DEFAULT_PROFILE], **PROFILES}
"""Settings a prior is calibrated for by name (`klviewer adapt --calibrate`)."""
