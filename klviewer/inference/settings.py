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

    def sampler(self, slice_seed: int) -> SamplerSettings:
        return SamplerSettings(steps=self.steps, samples=self.samples, seed=slice_seed, guidance=self.guidance,  # type: ignore[arg-type]
                               dps_step=self.dps_step)

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


MAP_ONLY_KEYS = ("patch", "sigma_window", "flag_threshold")


def sampling_key(settings: AnalysisSettings) -> tuple[tuple[str, Any], ...]:
    """The settings that need a new sampling run when they change."""
    d = settings.to_dict()
    return tuple(sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in d.items() if k not in MAP_ONLY_KEYS))


DETECTION_SETTINGS = AnalysisSettings(samples=4, patch=4, sigma_window=(0.01, 0.05))
"""The detection settings: 4 samples, z-scores over 4 px patches in the sigma window where lesions show."""
NAMED_SETTINGS = {"default": AnalysisSettings(), "detection": DETECTION_SETTINGS}
"""Settings a prior is calibrated for by name (`klviewer adapt --calibrate`)."""
