"""Guided reverse diffusion with KL bookkeeping.

One function, `posterior_sample`, in the spirit of EDM's samplers: the VE reverse SDE on a
Karras sigma schedule, Euler-Maruyama, every step split into a prior update and a likelihood
update dx_lik. With g^2 dt = sigma_i^2 - sigma_{i+1}^2 the step adds 1/2 * dx_lik^2 / (g^2 dt)
nats per pixel to the EnergyField (Girsanov); with the exact likelihood score the total is
KL(p(x|y) || p(x)).

A run either draws every posterior sample as its own chain, or (`branch_sigma`) draws one chain
(or `trunks` chains) down to a noise level and branches it there into the samples. Each branch is marginally a chain
of its own, so its energy keeps its expectation; but the branches share the trunk's randomness,
and on the phantom benchmark they average out much less of the KL map's noise than independent
chains do (docs/screening.md).

Independent chains may also run in antithetic pairs (`antithetic`): the second of each pair
draws the first's noise negated.

`posterior_sample_slices` runs several slices measured with one geometry at once: their chains
share every forward pass, and each slice keeps its own measurement, random streams and energy.

The likelihood score comes from a guidance object, one class per algorithm, chosen by name
from a registry (GUIDANCES). Each computes (x0_hat, likelihood score) at x, so the step loop
does not know which approximation it runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch

from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.inference.energy import EnergyField, log_sigma_edges
from klviewer.inference.likelihood import (
    GaussianTerms,
    MeasurementModel,
    dense_matrix,
    dps_score,
    exact_gaussian_score,
    pigdm_score,
    stack_models,
    tmpd_score,
    tweedie_dc_score,
)
from klviewer.priors.base import Denoiser
from klviewer.priors.sampling import karras_sigmas

PRECISIONS = ("float32", "bfloat16")


class AnalysisCancelled(KlviewerError):
    """The user cancelled a run; nothing partial is returned."""


@dataclass
class SamplerSettings:
    steps: int = 100
    samples: int = 1
    seed: int = 0
    guidance: str = "pigdm"
    """A name from GUIDANCES."""
    sigma_max: float = 10.0
    sigma_min: float = 0.002
    rho: float = 7.0
    energy_bins: int = 10
    """Log-spaced sigma bins of the EnergyField; 10 keeps it 10x smaller than a 100-step record."""
    cg_iters: int = 2
    """Conjugate-gradient iterations per step for `dc` and `pigdm` guidance."""
    dps_step: float = 0.03
    """Step size zeta of `dps` guidance, in prior units per unit of the whitened residual norm.
    0.03 gave the best PSNR of {3e-4, 3e-3, 0.03, 0.3} on a 256² lesion phantom at 24 views
    with the shipped prior; 0.3 diverges."""
    tmpd_iters: int = 30
    """Most conjugate-gradient iterations per step for `tmpd` guidance (one vector-Jacobian
    product through the denoiser each)."""
    tmpd_tol: float = 1e-3
    """`tmpd` stops a step's solve once every sample's residual is below this fraction of its
    measurement residual."""
    max_batch: int | None = None
    """Most posterior samples per forward pass; None = all at once."""
    branch_sigma: float | None = None
    """None: each posterior sample is its own chain of `steps` noise levels. A noise level: the
    samples share one chain (the trunk: `steps` Karras levels from sigma_max down to branch_sigma)
    and branch there into `samples` chains of `branch_steps` log-spaced
    levels down to sigma_min, then a last step to 0."""
    branch_steps: int = 0
    trunks: int = 1
    """Branched: the chains down to branch_sigma; sample k branches from trunk k % trunks. More trunks
    share less of the samples' randomness, so their mean energy varies less, at the cost of the trunk steps."""
    high_guidance: str | None = None
    """With `high_sigma`: the guidance of the steps that start above `high_sigma` (a cheaper one, e.g. `dc`,
    where the prior dominates); None = `guidance` throughout."""
    high_sigma: float | None = None
    precision: str = "float32"
    """The denoiser's arithmetic: "float32", or "bfloat16" (autocast; its convolutions in bfloat16, about
    1.25x faster on a CPU with AVX-512 BF16; the guidance's linear algebra and the energy stay float32)."""
    first_sample: int = 0
    """The stream of the run's first posterior sample: a run with `first_sample` k draws samples k, k+1, ...
    of the seed, so it adds chains to an earlier run of k samples (`merge_runs`). Independent chains only."""
    antithetic: bool = False
    """Chains in antithetic pairs: sample 2i + 1 draws sample 2i's noise negated, at the start and at every
    step. Each chain is still a posterior chain, so the mean energy keeps its expectation. The pair's
    fluctuations cancel only where a step's energy is linear in the noise (high noise levels); in the
    detection window it is quadratic and a pair varies more than two independent chains (docs/screening.md).
    Independent chains only."""

    def validate(self) -> None:
        if self.steps < 2:
            raise KlviewerInputError(None, f"steps must be at least 2, got {self.steps}")
        if self.samples < 1:
            raise KlviewerInputError(None, f"samples must be at least 1, got {self.samples}")
        if self.cg_iters < 1:
            raise KlviewerInputError(None, f"cg_iters must be at least 1, got {self.cg_iters}")
        if self.guidance not in GUIDANCES:
            raise KlviewerInputError(None, f"guidance must be one of {GUIDANCES}, got {self.guidance!r}")
        if self.tmpd_iters < 1 or not self.tmpd_tol >= 0:
            raise KlviewerInputError(None, f"need tmpd_iters >= 1 and tmpd_tol >= 0, got {self.tmpd_iters}, {self.tmpd_tol}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise KlviewerInputError(None, f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.branch_sigma is not None:
            if not self.sigma_min < self.branch_sigma < self.sigma_max:
                raise KlviewerInputError(None, f"need sigma_min < branch_sigma < sigma_max, got {self.sigma_min}, "
                                               f"{self.branch_sigma}, {self.sigma_max}")
            if self.branch_steps < 2:
                raise KlviewerInputError(None, f"branch_steps must be at least 2, got {self.branch_steps}")
        if self.trunks < 1 or (self.trunks > 1 and (self.branch_sigma is None or self.samples % self.trunks)):
            raise KlviewerInputError(None, f"trunks must be at least 1, and above 1 only with branch_sigma and a number of "
                                           f"samples it divides; got {self.trunks} trunk(s) for {self.samples} sample(s)")
        if self.first_sample < 0 or (self.first_sample and self.branch_sigma is not None):
            raise KlviewerInputError(None, f"first_sample must be at least 0, and 0 for branched samples; got {self.first_sample}")
        if self.precision not in PRECISIONS:
            raise KlviewerInputError(None, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if (self.high_guidance is None) != (self.high_sigma is None):
            raise KlviewerInputError(None, "high_guidance and high_sigma go together")
        if self.antithetic and self.branch_sigma is not None:
            raise KlviewerInputError(None, "antithetic chains are independent chains: not with branch_sigma")
        if self.high_guidance is not None and self.high_guidance not in HIGH_GUIDANCES:
            raise KlviewerInputError(None, f"high guidance must be one of {HIGH_GUIDANCES}, got {self.high_guidance!r}")

    @property
    def step_count(self) -> int:
        """Sampler steps of the whole run, every sample's counted (what progress counts)."""
        if self.branch_sigma is None:
            return self.steps * self.samples
        return self.trunks * (self.steps - 1) + self.samples * self.branch_steps


@dataclass
class PosteriorRun:
    """What one posterior sampling run leaves behind: O(bins x H x W), never O(steps)."""

    mean: np.ndarray
    """(H, W) posterior mean in prior units (channels averaged)."""
    std: np.ndarray
    """(H, W) pixelwise standard deviation over samples (zeros with one sample)."""
    energy: EnergyField
    sigmas: np.ndarray
    settings: SamplerSettings
    seconds: float
    device: str
    notes: list[str] = field(default_factory=list)
    evaluations: dict[str, float] = field(default_factory=dict)
    """Network cost per posterior sample: denoiser forward passes ("denoiser") and
    vector-Jacobian products through the denoiser ("vjp")."""


# ---- guidances ------------------------------------------------------------------------------------

@dataclass
class Evaluations:
    """Network work done, counted per posterior sample (a call on a batch of B adds B), and how the
    guidance's linear solves went."""

    denoiser: int = 0
    vjp: int = 0
    solves: int = 0
    """Steps that solved a linear system for the likelihood score (`tmpd`), one per step and batch."""
    failed_solves: int = 0
    """Of those, the steps where some sample's solve ended with a residual above its right-hand side:
    its solution is no better than zero, and the step's score is not the likelihood score."""

    def __add__(self, other: Evaluations) -> Evaluations:
        return Evaluations(self.denoiser + other.denoiser, self.vjp + other.vjp, self.solves + other.solves,
                           self.failed_solves + other.failed_solves)


class Guidance(Protocol):
    """One approximation of the likelihood score, built for one batch of posterior samples."""

    evaluations: Evaluations

    def __call__(self, x: torch.Tensor, sigma: float, dsigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat = D(x; sigma), likelihood score grad_x log p(y | x)) at x; dsigma2 is the
        step's sigma_i^2 - sigma_{i+1}^2."""
        ...


class _Guidance:
    name = ""
    any_prior = True
    """False: the guidance needs a particular kind of prior and is not offered to users."""

    def __init__(self, prior: Denoiser, model: MeasurementModel, settings: SamplerSettings) -> None:
        self.prior, self.model, self.settings = prior, model, settings
        self.evaluations = Evaluations()

    def _denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.evaluations.denoiser += x.shape[0]
        if self.settings.precision == "bfloat16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self.prior.denoise(x, sigma).float()
        return self.prior.denoise(x, sigma)

    def _through_denoiser(self, x: torch.Tensor, sigma: float,
                          score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, score(x, x0_hat)) with autograd through the denoiser, for scores that take
        vector-Jacobian products of it (one is counted here)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0_hat = self._denoise(xg, sigma)
            likelihood = score(xg, x0_hat)
        self.evaluations.vjp += x.shape[0]
        return x0_hat.detach(), likelihood.detach()


class DataConsistency(_Guidance):
    """`dc`: the isotropic Tweedie step, no backpropagation (`tweedie_dc_score`)."""

    name = "dc"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: float, dsigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
        x0_hat = self._denoise(x, sigma)
        return x0_hat, tweedie_dc_score(self.model, x0_hat, sigma, self.prior.config.sigma_data, self.settings.cg_iters)


class Unguided(_Guidance):
    """`none`: the prior's own step, with no likelihood score and so no energy. Only for the steps above
    `high_sigma`, where the prior dominates: one forward pass, no vector-Jacobian product, no solve."""

    name = "none"
    any_prior = False

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: float, dsigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
        x0_hat = self._denoise(x, sigma)
        return x0_hat, torch.zeros_like(x0_hat)


class PiGDM(_Guidance):
    """`pigdm` (the default): the isotropic covariance with the denoiser's own Jacobian (`pigdm_score`)."""

    name = "pigdm"

    def __call__(self, x: torch.Tensor, sigma: float, dsigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
        sigma_data, iters = self.prior.config.sigma_data, self.settings.cg_iters
        return self._through_denoiser(x, sigma, lambda xg, x0: pigdm_score(self.model, xg, x0, sigma, sigma_data, iters))


class DPS(_Guidance):
    """`dps`: a fixed-size step down the residual norm's gradient through the denoiser (`dps_score`)."""

    name = "dps"

    def __call__(self, x: torch.Tensor, sigma: float, dsigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.settings.dps_step
        return self._through_denoiser(x, sigma, lambda xg, x0: dps_score(self.model, xg, x0, step, dsigma2))


class TMPD(_Guidance):
    """`tmpd`: the Tweedie covariance sigma^2 dD/dx by vector-Jacobian products inside a
    conjugate-gradient solve (`tmpd_score`); exact for Gaussian priors, any prior works. Each
    step warm-starts its solve from the previous step's solution, which changes slowly."""

    name = "tmpd"

    def __init__(self, prior: Denoiser, model: MeasurementModel, settings: SamplerSettings) -> None:
        super().__init__(prior, model, settings)
        self._start: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: float, dsigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
        solves = []

        def score(xg: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
            likelihood, solve = tmpd_score(self.model, xg, x0_hat, sigma, self.settings.tmpd_iters,
                                           self.settings.tmpd_tol, self._start)
            solves.append(solve)
            return likelihood

        out = self._through_denoiser(x, sigma, score)
        self._start = solves[0].solution.detach()
        self.evaluations.vjp += x.shape[0] * solves[0].iterations  # the solve's products; the score's is counted
        self.evaluations.solves += 1
        self.evaluations.failed_solves += int(bool((solves[0].relative_residual > 1).any()))
        return out


class ExactGaussian(_Guidance):
    """`exact`: the closed-form likelihood score of a Gaussian prior, with K as a dense matrix (tests)."""

    name = "exact"
    any_prior = False

    def __init__(self, prior: Denoiser, model: MeasurementModel, settings: SamplerSettings) -> None:
        super().__init__(prior, model, settings)
        mean, cov = getattr(prior, "mean", None), getattr(prior, "cov", None)
        if not (isinstance(mean, torch.Tensor) and isinstance(cov, torch.Tensor)):
            raise KlviewerInputError(None, "exact guidance needs a Gaussian prior (with mean and covariance)")
        c = prior.config
        self.terms = GaussianTerms.build(mean, cov, dense_matrix(model, (c.channels, *c.image_size)))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: float, dsigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._denoise(x, sigma), exact_gaussian_score(self.model, x, sigma, self.terms)


_REGISTRY: dict[str, type[_Guidance]] = {g.name: g for g in (PiGDM, DataConsistency, DPS, TMPD, ExactGaussian, Unguided)}
GUIDANCES: tuple[str, ...] = tuple(name for name in _REGISTRY if name != Unguided.name)
"""The guidances a run can take: each gives energy; `none` serves only above `high_sigma`."""
ANY_PRIOR_GUIDANCES: tuple[str, ...] = tuple(name for name, g in _REGISTRY.items() if g.any_prior)
"""The guidances offered to users; `exact` needs a Gaussian prior and serves the tests."""
HIGH_GUIDANCES: tuple[str, ...] = (*ANY_PRIOR_GUIDANCES, Unguided.name)
"""The guidances offered above `high_sigma`: any of those, or none (the prior alone)."""


def make_guidance(prior: Denoiser, model: MeasurementModel, settings: SamplerSettings,
                  name: str | None = None) -> Guidance:
    """The guidance that `name` (default `settings.guidance`) names, for one batch of posterior samples."""
    name = settings.guidance if name is None else name
    if name not in _REGISTRY:
        raise KlviewerInputError(None, f"guidance must be one of {GUIDANCES}, got {name!r}")
    return _REGISTRY[name](prior, model, settings)


class SigmaSwitch:
    """`high` for the steps that start above `sigma`, `low` for the others: a cheap guidance where the
    prior dominates and the one whose energy is kept where the decision is made."""

    def __init__(self, high: Guidance, low: Guidance, sigma: float) -> None:
        self.high, self.low, self.sigma = high, low, sigma

    @property
    def evaluations(self) -> Evaluations:  # type: ignore[override]
        return self.high.evaluations + self.low.evaluations

    def __call__(self, x: torch.Tensor, sigma: float, dsigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.high if sigma > self.sigma else self.low)(x, sigma, dsigma2)


def run_guidance(prior: Denoiser, model: MeasurementModel, settings: SamplerSettings) -> Guidance:
    """The guidance of one batch of a run: `settings.guidance`, switched to `high_guidance` above `high_sigma`."""
    low = make_guidance(prior, model, settings)
    if settings.high_guidance is None or settings.high_sigma is None:
        return low
    return SigmaSwitch(make_guidance(prior, model, settings, settings.high_guidance), low, settings.high_sigma)


# ---- the sampler ----------------------------------------------------------------------------------

@dataclass
class Streams:
    """The random streams of a batch of chains: chain i draws from generators[i], times signs[i]."""

    generators: list[torch.Generator]
    signs: list[float]

    @classmethod
    def of(cls, chains: Sequence[tuple[int, int]], antithetic: bool) -> Streams:
        """Stream k of seed s for each (s, k); antithetic, stream 2i + 1 is stream 2i negated."""
        def paired(k: int) -> tuple[int, float]:
            return (k - k % 2, -1.0 if k % 2 else 1.0) if antithetic else (k, 1.0)

        drawn = [(seed, *paired(k)) for seed, k in chains]
        return cls([torch.Generator().manual_seed(sample_seed(seed, k)) for seed, k, _ in drawn], [sign for *_, sign in drawn])

    def noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        # Drawn on the CPU whatever the device, so a seed gives the same noise on CPU and GPU and
        # the two differ only by rounding; the copy is tiny next to one denoiser call.
        return torch.stack([sign * torch.randn(shape, generator=g) for g, sign in zip(self.generators, self.signs)]).to(device)


FINAL_STEP_SPAN = 10.0
"""A run's last step (sigma_min -> 0) is binned from sigma_min / FINAL_STEP_SPAN to sigma_min."""


@dataclass
class Schedule:
    """The noise levels of a run and the energy bin of each step.

    Unbranched, `trunk` runs every sample from sigma_max to 0 and `branch` is empty. Branched,
    `trunk` ends at branch_sigma and `branch` runs from there to 0; the bin edges then pass
    through branch_sigma, so a sigma window ending there holds branch energy only. Either way the
    last step, sigma_min -> 0, denoises in one go: its energy is all the energy below sigma_min, so it
    gets a bin of its own under sigma_min (nominally down to sigma_min / FINAL_STEP_SPAN), and a window
    starting at sigma_min leaves it out. (A run that stops at the window's low end would otherwise put
    it into the window, where it swamps the lesions.)
    """

    trunk: np.ndarray
    branch: np.ndarray
    edges: np.ndarray
    trunk_bins: np.ndarray
    branch_bins: np.ndarray

    @classmethod
    def of(cls, settings: SamplerSettings) -> Schedule:
        s = settings
        if s.branch_sigma is None:
            trunk = karras_sigmas(s.steps, s.sigma_min, s.sigma_max, s.rho).numpy()
            edges = _with_final_bin(log_sigma_edges(s.sigma_min, s.sigma_max, s.energy_bins), s.sigma_min)
            return cls(trunk, np.zeros(0), edges, _final_step_bins(trunk, edges, len(edges) - 2), np.zeros(0, int))
        trunk = karras_sigmas(s.steps, s.branch_sigma, s.sigma_max, s.rho).numpy()[:-1]
        branch = np.append(np.geomspace(s.branch_sigma, s.sigma_min, s.branch_steps), 0.0)
        share = np.log(s.branch_sigma / s.sigma_min) / np.log(s.sigma_max / s.sigma_min)
        below = int(np.clip(round(s.energy_bins * share), 1, s.energy_bins - 1))
        edges = _with_final_bin(np.concatenate([log_sigma_edges(s.sigma_min, s.branch_sigma, below)[:-1],
                                                log_sigma_edges(s.branch_sigma, s.sigma_max, s.energy_bins - below)]),
                                s.sigma_min)
        edges[below + 1] = s.branch_sigma
        return cls(trunk, branch, edges, _bins(trunk[:-1], edges, below + 1, len(edges) - 2),
                   _final_step_bins(branch, edges, below))


def _with_final_bin(edges: np.ndarray, sigma_min: float) -> np.ndarray:
    """Bin edges from sigma_min up, with the last step's bin below them and sigma_min exactly on an edge."""
    out = np.concatenate([[sigma_min / FINAL_STEP_SPAN], edges])
    out[1] = sigma_min
    return out


def _final_step_bins(sigmas: np.ndarray, edges: np.ndarray, highest: int) -> np.ndarray:
    """The bins of the steps from sigmas[0] to the final 0: the last step's own bin 0, the others from bin 1 up."""
    return np.append(_bins(sigmas[:-2], edges, 1, highest), 0)


def _bins(sigmas: np.ndarray, edges: np.ndarray, lowest: int, highest: int) -> np.ndarray:
    """The energy bin of each step, by the noise level it starts from, kept within [lowest, highest]."""
    return np.clip(np.searchsorted(edges, sigmas, side="right") - 1, lowest, highest)


def _run_steps(guidance: Guidance, x: torch.Tensor, sigmas: np.ndarray, bins: np.ndarray, energy: torch.Tensor,
               owners: torch.Tensor, streams: Streams, tick: Callable[[int], None]) -> torch.Tensor:
    """Take one chain per stream from sigmas[0] to sigmas[-1], adding each step's energy to its bin of
    `energy` (bins, slices, H, W), summed over the chains of each slice (chain i belongs to slice
    owners[i]); return the chains' last states."""
    shape = tuple(x.shape[1:])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        dsigma2 = sigma**2 - sigma_next**2
        x0_hat, lik = guidance(x, sigma, dsigma2)
        prior_score = (x0_hat - x) / sigma**2
        dx_lik = dsigma2 * lik
        energy[bins[i]].index_add_(0, owners, (0.5 * dx_lik**2 / dsigma2).sum(dim=1))
        x = x + dsigma2 * prior_score + dx_lik
        if sigma_next > 0:
            x = x + np.sqrt(dsigma2) * streams.noise(shape, x.device)
        tick(len(streams.generators))
    return x


def posterior_sample(
    prior: Denoiser,
    model: MeasurementModel,
    settings: SamplerSettings,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> PosteriorRun:
    """Draw `settings.samples` posterior samples in batches and accumulate their KL energy.

    Sample k has its own random stream seeded from (seed, k), so results do not depend on how
    samples are batched. `progress(done, total)` is called after every step of every batch;
    setting `cancel` stops the run within one step. On CUDA out-of-memory the batch is halved
    and the run restarts; the note says so.
    """
    return posterior_sample_slices(prior, [model], settings, [settings.seed], device=device, progress=progress,
                                   cancel=cancel)[0]


def posterior_sample_slices(
    prior: Denoiser,
    models: Sequence[MeasurementModel],
    settings: SamplerSettings,
    seeds: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[PosteriorRun]:
    """`posterior_sample` for several slices at once, slice j measured by models[j] and seeded with
    seeds[j]: the chains of all slices share the forward passes, `settings.max_batch` chains (default
    all) at a time. The models must share a geometry and gain (`shares_batch`).

    Each chain keeps its own random stream, so a slice's run differs from its run alone by
    rounding only. Progress counts the steps of every chain of every slice; each run's `seconds`
    is its share of the whole. `tmpd` notes failed solves per batch, so its slices run one at a time.
    """
    if len(models) != len(seeds) or not models:
        raise ValueError(f"need one seed per model, got {len(models)} model(s) and {len(seeds)} seed(s)")
    if settings.guidance == "tmpd" and len(models) > 1:
        total = settings.step_count * len(models)
        return [posterior_sample(prior, model, replace(settings, seed=seed), device=device, cancel=cancel,
                                 progress=None if progress is None else _offset(progress, j * settings.step_count, total))
                for j, (model, seed) in enumerate(zip(models, seeds))]
    settings.validate()
    device = torch.device(device)
    schedule = Schedule.of(settings)
    notes: list[str] = []
    chains = settings.samples * len(models)
    batch = min(settings.max_batch or chains, chains)
    start = time.perf_counter()
    while True:
        try:
            final, energy, work = _sample_all(prior, models, seeds, settings, schedule, batch, device, progress, cancel)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise KlviewerError("out of GPU memory even with one posterior sample per batch") from None
            batch = max(1, batch // 2)
            notes.append(f"out of GPU memory: retried with {batch} posterior sample(s) per batch")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    seconds = (time.perf_counter() - start) / len(models)
    final = final.mean(dim=2)  # channels
    runs = []
    for j, seed in enumerate(seeds):
        mean = final[j].mean(dim=0)
        std = final[j].std(dim=0, unbiased=False) if settings.samples > 1 else torch.zeros_like(mean)
        runs.append(PosteriorRun(
            mean=mean.cpu().numpy().astype(np.float32),
            std=std.cpu().numpy().astype(np.float32),
            energy=EnergyField(energy[:, j].cpu().numpy().astype(np.float32), schedule.edges, samples=settings.samples),
            sigmas=np.concatenate([schedule.trunk, schedule.branch[1:]]),
            settings=replace(settings, seed=seed),
            seconds=seconds,
            device=str(device),
            evaluations={"denoiser": work.denoiser / chains, "vjp": work.vjp / chains},
            notes=notes + _solve_notes(settings.guidance, work) + _branch_notes(settings),
        ))
    return runs


def merge_runs(first: PosteriorRun, more: PosteriorRun) -> PosteriorRun:
    """One run of the two runs' chains together: `more` continues `first` (its `first_sample` is the
    samples of `first`, same seed and schedule), so the result is the run of all their samples at once,
    up to rounding. Mean, spread and energy are pooled by chain count; seconds add up."""
    a, b = first.settings, more.settings

    def run_of(s: SamplerSettings) -> SamplerSettings:  # what makes chains of one run, whatever their batching
        return replace(s, samples=0, first_sample=0, max_batch=None)

    if b.first_sample != a.first_sample + a.samples or run_of(a) != run_of(b):
        raise ValueError(f"run of samples {b.first_sample}.. with {b} does not continue samples "
                         f"{a.first_sample}..{a.first_sample + a.samples - 1} with {a}")
    na, nb = a.samples, b.samples
    n = na + nb
    mean = (na * first.mean.astype(np.float64) + nb * more.mean) / n
    # Pool the second moments about zero, then subtract the pooled mean's square (population spread, as each run's).
    second = (na * (first.std.astype(np.float64) ** 2 + first.mean.astype(np.float64) ** 2)
              + nb * (more.std.astype(np.float64) ** 2 + more.mean.astype(np.float64) ** 2)) / n
    std = np.sqrt(np.maximum(second - mean ** 2, 0.0))
    energy = (na * first.energy.energy.astype(np.float64) + nb * more.energy.energy) / n
    evaluations = {k: (na * first.evaluations.get(k, 0.0) + nb * more.evaluations.get(k, 0.0)) / n
                   for k in {*first.evaluations, *more.evaluations}}
    return PosteriorRun(
        mean=mean.astype(np.float32), std=std.astype(np.float32),
        energy=EnergyField(energy.astype(np.float32), first.energy.sigma_edges, samples=n),
        sigmas=first.sigmas, settings=replace(a, samples=n), seconds=first.seconds + more.seconds,
        device=first.device, notes=list(dict.fromkeys(first.notes + more.notes)), evaluations=evaluations)


def _offset(progress: Callable[[int, int], None], base: int, total: int) -> Callable[[int, int], None]:
    return lambda done, _total: progress(base + done, total)


def _solve_notes(guidance: str, work: Evaluations) -> list[str]:
    """A note when the guidance's solves failed: its nats are then not the KL it is exact for."""
    if not work.failed_solves:
        return []
    return [f"{guidance}: the covariance solve ended with a residual above its right-hand side on "
            f"{work.failed_solves} of {work.solves} steps (the prior's Jacobian is not a covariance there), "
            f"so these nats are not a calibrated KL (docs/nats.md)"]


def _branch_notes(settings: SamplerSettings) -> list[str]:
    if settings.branch_sigma is None or settings.samples < 2:
        return []
    if settings.trunks == 1:
        return [f"the {settings.samples} posterior samples branch from one chain at sigma {settings.branch_sigma:g}: "
                f"their spread is the posterior's below that noise level only"]
    return [f"the {settings.samples} posterior samples branch from {settings.trunks} chains at sigma "
            f"{settings.branch_sigma:g}: their spread is partly the posterior's below that noise level only"]


def sample_seed(seed: int, k: int) -> int:
    """The random stream of posterior sample k of a run seeded with `seed`."""
    return seed * 1_000_003 + k


def _sample_all(prior: Denoiser, models: Sequence[MeasurementModel], seeds: Sequence[int], settings: SamplerSettings,
                schedule: Schedule, batch: int, device: torch.device, progress: Callable[[int, int], None] | None,
                cancel: threading.Event | None) -> tuple[torch.Tensor, torch.Tensor, Evaluations]:
    """The final states (slices, samples, C, H, W), each slice's (bins, slices, H, W) energy per sample,
    and the work done.

    Branched, each trunk's energy counts once per branch of it and the sum is averaged over the
    samples: each branch continues its trunk, so trunk plus branch energy is one chain's.
    """
    n_slices, samples = len(models), settings.samples
    total = settings.step_count * n_slices
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        if cancel is not None and cancel.is_set():
            raise AnalysisCancelled("analysis cancelled")
        done += n
        if progress is not None:
            progress(done, total)

    shape = (prior.config.channels, *prior.config.image_size)
    energy = torch.zeros((len(schedule.edges) - 1, n_slices, *shape[1:]), dtype=torch.float32, device=device)
    guidances: list[Guidance] = []

    def run(chains: list[tuple[int, int]], sigmas: np.ndarray, bins: np.ndarray,
            starts: torch.Tensor | None) -> torch.Tensor:
        """Chains (slice j, stream k) in batches, chain i from `starts[i]` or else from noise at sigmas[0]."""
        finals = []
        for first in range(0, len(chains), batch):
            part = chains[first:first + batch]
            owners = [j for j, _ in part]
            streams = Streams.of([(seeds[j], k) for j, k in part], settings.antithetic)
            x = streams.noise(shape, device) * float(sigmas[0]) if starts is None else starts[first:first + batch]
            guidances.append(run_guidance(prior, stack_models(models, owners), settings))
            owner_index = torch.tensor(owners, device=device)
            finals.append(_run_steps(guidances[-1], x, sigmas, bins, energy, owner_index, streams, tick))
        return torch.cat(finals)

    chains = [(j, k) for j in range(n_slices) for k in range(settings.first_sample, settings.first_sample + samples)]
    starts: torch.Tensor | None = None
    sigmas, bins = schedule.trunk, schedule.trunk_bins
    if settings.branch_sigma is not None:
        trunks = settings.trunks
        # Trunk t follows stream -1 - t, so a run's first trunk is the same whatever the number of trunks.
        ends = run([(j, -1 - t) for j in range(n_slices) for t in range(trunks)], schedule.trunk, schedule.trunk_bins, None)
        starts = ends[[j * trunks + k % trunks for j, k in chains]]
        energy *= samples // trunks  # each trunk's energy, once per branch of it before the mean over samples below
        sigmas, bins = schedule.branch, schedule.branch_bins
    final = run(chains, sigmas, bins, starts)
    work = sum((g.evaluations for g in guidances), Evaluations())
    return final.view(n_slices, samples, *shape), energy / samples, work
