"""Align a prior to a set of studies using their measurements only (no clean images).

A copy of the base prior is fine-tuned with the EDM denoising loss on images made from the
measurements alone. Two such images are offered (docs/alignment.md explains the choice and
measures both):

- ``recon`` (default): u is one posterior sample under the base prior, a complete image, and the
  loss is the plain EDM loss ``lambda(sigma) mean (D(u + sigma n; sigma) - u)^2`` on all pixels.
  This is one step of expectation-maximisation: what the data determine comes from y, what
  they leave open comes from the base prior.
- ``pinv``: u is the minimum-norm least-squares image (the CT counterpart of the paper's
  zero-filled measurement), which is only trustworthy in the row space of K. So the loss is
  counted on the measured data only: ``lambda(sigma) ||K D(u + sigma n; sigma) - y||^2_W / tr(K^T W K)``
  with W the inverse noise variance per ray; whatever K does not see gets no gradient.

n is white noise on every pixel and lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 the EDM
weight; both losses read as per-pixel mean squares (see `sinogram_loss`).

The loop follows `klviewer.priors.train`: Adam, optional EMA, resume state under OUT/resume/
(safetensors + JSON), a progress callback, a cancel event honoured within one step. A
non-finite loss or gradient stops the run before the weights are touched; the last good
weights are saved as the prior and the run is reported as diverged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from klviewer import __version__
from klviewer.devices import resolve_device
from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.inference.likelihood import MeasurementModel, data_consistent_estimate
from klviewer.inference.measurements import PreparedSlice, ct_measurement_model, prepare_slice
from klviewer.inference.plan import SeriesPlan, as_plan
from klviewer.inference.sampler import AnalysisCancelled, posterior_sample
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.json_input import Fields, read_json
from klviewer.io.safe_write import atomic_write, atomic_write_text, check_output_folder
from klviewer.priors.adapters import ADAPTER_MODES, count_parameters
from klviewer.priors.base import Prior
from klviewer.priors.checkpoint import (
    CONFIG_FILE,
    load_prior,
    prior_fingerprint,
    read_weights,
    resolve_prior_path,
    save_prior,
    state_bytes,
)
from klviewer.priors.finetune import (
    RESUME_STATE,
    FineTuneDiverged,
    FineTuner,
    FineTuneSettings,
    check_outside_base,
    draw_sigmas,
    edm_weight,
)
from klviewer.priors.resume_state import MAX_STATE_BYTES, read_resume_state, refuse_earlier_run, require_same_settings
from klviewer.priors.train import write_loss_csv
from klviewer.priors.unet import EDMUNetPrior

RESUME_DIR = "resume"
RESUME_INPUTS = "inputs.safetensors"
RESUME_INPUTS_STATE = "inputs.json"
REPORT_DIR = "alignment"
FINAL_LOSS_STEPS = 50
MIN_MEASUREMENTS = 8
"""Fewer measurements than this get a warning: the paper aligned on 64 or 128."""
INPUT_IMAGES = ("recon", "pinv")
LOSSES = {
    "recon": ("posterior-dsm", "lambda(sigma) mean((D(u + sigma n; sigma) - u)^2), u = one posterior sample of y under "
                               "the base prior (EDM loss on all pixels; one EM step)"),
    "pinv": ("sinogram-dsm", "lambda(sigma) ||K D(u + sigma n; sigma) - y||_W^2 / tr(K^T W K), u = minimum-norm "
                             "least-squares image of y (EDM loss counted on the measured line integrals only)"),
}
"""Loss name and formula for each input image, as recorded in the aligned prior's config."""
PINV_ITERS = 100
"""Conjugate-gradient iterations for the "pinv" image. Its fit must be tight: lambda(sigma) grows
like 1/sigma^2, so a misfit left in u is multiplied by about 2.5e5 at the smallest noise levels.
100 iterations leave about 2e-7 (per-pixel units) at 64², 24 views."""
PINV_PRIOR_VARIANCE = 1e6
"""r2 of that solve (prior units squared): large enough to fit the data, finite so that directions
the measurement barely sees are not amplified."""
# Settings that must not change when a run is resumed (steps may grow, to train longer).
FIXED_ON_RESUME = ("prior_sha256", "inputs", "slices", "mode", "lr", "batch", "lora_rank", "seed", "views",
                   "dose_i0", "noise_sigma", "ema", "warmup", "p_mean", "p_std", "input_image", "recon_steps")


class AlignError(KlviewerError):
    """Alignment could not start, or its resume state does not fit the request."""


class AlignCancelled(KlviewerError):
    """The cancel event was set; a resume checkpoint was written at ``step`` (none when 0)."""

    def __init__(self, out: Path, step: int) -> None:
        self.out, self.step = out, step
        super().__init__(f"alignment cancelled at step {step}; continue with --resume (output {out})")


class AlignDiverged(KlviewerError):
    """A non-finite loss or gradient stopped the run; the last good weights were saved as the prior."""

    def __init__(self, out: Path, step: int, loss: float) -> None:
        self.out, self.step, self.loss = out, step, loss
        super().__init__(f"alignment diverged at step {step + 1} (loss {loss}); the prior in {out} holds the last good "
                         f"weights (after step {step}); lower --lr")


class FewMeasurementsWarning(UserWarning):
    """Alignment runs on fewer than MIN_MEASUREMENTS measurements."""


@dataclass
class AlignConfig:
    prior: str | Path
    """The base prior (shipped name or folder). It is read, never written."""
    inputs: list[str | Path]
    """Studies whose measurements drive the alignment (anything `klviewer analyze` reads)."""
    out: Path
    """Folder of the new prior (config.json + model.safetensors), alignment/ and resume/."""
    mode: str = "norm-bias"
    steps: int = 1000
    lr: float = 1e-3
    """Adam learning rate. benchmarks/results/align_benchmark.md used 1e-4 (full), 3e-3 (norm-bias), 1e-3 (lora)."""
    batch: int = 1
    lora_rank: int = 4
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    slices: str = "all"
    views: int = 24
    dose_i0: float | None = None
    noise_sigma: float | None = None
    checkpoint_every: int = 100
    name: str | None = None
    ema: float = 0.99
    """EMA decay of the saved weights (0 = save the last weights)."""
    warmup: int = 0
    """Linear learning-rate warm-up steps."""
    p_mean: float | None = None
    """Mean of ln sigma in the loss; None = the base prior's training value (or -1.5)."""
    p_std: float | None = None
    input_image: str = "recon"
    """The training image made from each measurement, and with it the loss: "recon" (a posterior
    sample under the base prior, loss on all pixels) or "pinv" (minimum-norm least squares, loss
    on the measured data only)."""
    recon_steps: int = 100
    """Sampler steps of each "recon" image."""
    command: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.inputs = list(self.inputs)
        problems = []
        if not self.inputs:
            problems.append("no inputs given")
        if self.mode not in ADAPTER_MODES:
            problems.append(f"mode must be one of {ADAPTER_MODES}, got {self.mode!r}")
        if self.input_image not in INPUT_IMAGES:
            problems.append(f"input_image must be one of {INPUT_IMAGES}, got {self.input_image!r}")
        for key in ("steps", "batch", "lora_rank", "checkpoint_every", "views", "recon_steps"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.ema < 1:
            problems.append(f"ema must be in [0, 1), got {self.ema}")
        if self.warmup < 0:
            problems.append("warmup must be at least 0")
        if self.dose_i0 is not None and self.noise_sigma is not None:
            problems.append("give either dose_i0 or noise_sigma, not both")
        if problems:
            raise AlignError("invalid alignment settings: " + "; ".join(problems))

    def analysis_settings(self) -> AnalysisSettings:
        """How measurements are made (and "recon" inputs reconstructed): as `klviewer analyze` would,
        but with `dc` guidance, which needs no backpropagation and so makes the many training images
        faster; the alignment benchmark was measured with it."""
        return AnalysisSettings(views=self.views, dose_i0=self.dose_i0, noise_sigma=self.noise_sigma,
                                steps=self.recon_steps, seed=self.seed, device=self.device, guidance="dc")


@dataclass
class AlignProgress:
    step: int
    steps: int
    loss: float
    stage: str = "align"
    """"reconstruct" while the input images are made (step counts slices, loss is nan), then "align"."""


@dataclass
class _Target:
    """One measurement, reduced to what the sinogram loss needs."""

    case: str
    index: int
    model: MeasurementModel
    trace: float
    """tr(K^T W K), estimated once (Hutchinson, fixed seed)."""


@dataclass
class _Data:
    targets: list[_Target]
    images: torch.Tensor
    """(N, 1, H, W) the input images u, prior units."""
    skipped: list[dict[str, str]] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    """Time spent making the measurements and input images (in this invocation)."""


def _operator_key(prepared: PreparedSlice) -> str:
    return json.dumps(prepared.acquisition.operator.describe(), sort_keys=True)


def weighted_trace(model: MeasurementModel, shape: tuple[int, ...], probes: int = 4, seed: int = 12345) -> float:
    """tr(K^T W K) with W = 1 / variance, by Hutchinson's estimator: E ||W^(1/2) K z||^2 over white z.

    Every ray sums many pixels, so one probe already lands within a few percent; four are used.
    """
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((probes, *shape), generator=gen).to(model.y.device)
    with torch.no_grad():
        kz = model.forward(z)
    return float((kz**2 / model.variance).sum() / probes)


def sinogram_loss(model: MeasurementModel, denoised: torch.Tensor, trace: float) -> torch.Tensor:
    """||K x - y||^2_W / tr(K^T W K) for one (1, C, H, W) image x.

    The normaliser makes an image error e of white noise with variance v score v on average
    (plus the measurement's own noise floor), so the loss reads as a per-pixel mean square.
    """
    return (model.residual(denoised) ** 2 / model.variance).sum() / trace


def _input_image(prepared: PreparedSlice, prior, model: MeasurementModel, cfg: AlignConfig,
                 device: torch.device, cancel: threading.Event | None) -> torch.Tensor:
    """u for one measurement (see the module docstring)."""
    shape = (1, prior.config.channels, *prior.config.image_size)
    if cfg.input_image == "pinv":
        with torch.no_grad():
            return data_consistent_estimate(model, torch.zeros(shape, device=device), PINV_PRIOR_VARIANCE, PINV_ITERS)
    run = posterior_sample(prior, model, cfg.analysis_settings().sampler(prepared.slice_seed), device=device,
                           cancel=cancel)
    return torch.from_numpy(run.mean).reshape(shape).to(device)


def _collect(cfg: AlignConfig, plan: SeriesPlan, prior: Prior, device: torch.device, images: torch.Tensor | None,
             progress: Callable[[AlignProgress], None] | None, cancel: threading.Event | None) -> _Data:
    """Every picked slice's measurement, and its input image unless `images` (from a resume) is given."""
    settings = cfg.analysis_settings()
    n = plan.n_slices
    if n < MIN_MEASUREMENTS:
        warnings.warn(f"aligning on only {n} measurement(s); at least {MIN_MEASUREMENTS} are advisable "
                      f"(the paper used 64 or 128)", FewMeasurementsWarning, stacklevel=3)
    if images is not None and images.shape[0] != n:
        raise AlignError(f"{cfg.out / RESUME_DIR / RESUME_INPUTS}: holds {images.shape[0]} input images but the inputs "
                         f"now give {n} measurements")
    # Slices with one geometry share one operator: each holds its sampling grid (25 MB at 256², 24 views).
    operators: dict[str, Any] = {}
    targets, made = [], []
    for planned in plan.series:
        for index in planned.indices:
            prepared = prepare_slice(planned.series, index, prior, settings, device)
            key = _operator_key(prepared)
            prepared.acquisition.operator = operators.setdefault(key, prepared.acquisition.operator)
            model = ct_measurement_model(prepared.acquisition, prior)
            trace = weighted_trace(model, (prior.config.channels, *prior.config.image_size))
            targets.append(_Target(planned.case, index, model, trace))
            if images is None:
                if cancel is not None and cancel.is_set():
                    raise AlignCancelled(cfg.out, 0)
                try:
                    made.append(_input_image(prepared, prior, model, cfg, device, cancel))
                except AnalysisCancelled:
                    raise AlignCancelled(cfg.out, 0) from None
                if progress is not None:
                    progress(AlignProgress(len(made), n, float("nan"), stage="reconstruct"))
    if images is None:
        images = torch.cat(made)
    inputs = [{"case": t.case, "slice_index": t.index} for t in targets]
    return _Data(targets, images.to(device), plan.skipped, inputs)


def _sigma_law(cfg: AlignConfig, base_training: dict[str, Any]) -> tuple[float, float]:
    p_mean = cfg.p_mean if cfg.p_mean is not None else float(base_training.get("p_mean", -1.5))
    p_std = cfg.p_std if cfg.p_std is not None else float(base_training.get("p_std", 2.0))
    return p_mean, p_std


class _Aligner(FineTuner):
    """A fine-tuning run whose loss is made from the measurements (see the module docstring)."""

    def __init__(self, cfg: AlignConfig, base: EDMUNetPrior, data: _Data, device: torch.device,
                 sigma_law: tuple[float, float]) -> None:
        super().__init__(base, FineTuneSettings(mode=cfg.mode, lora_rank=cfg.lora_rank, lr=cfg.lr, warmup=cfg.warmup,
                                                ema=cfg.ema, seed=cfg.seed), device)
        self.cfg, self.data = cfg, data
        self.p_mean, self.p_std = sigma_law

    def loss(self) -> torch.Tensor:
        cfg, data = self.cfg, self.data
        picks = torch.randint(len(data.targets), (cfg.batch,), generator=self.gen)
        sigma = draw_sigmas(self.gen, cfg.batch, self.p_mean, self.p_std)
        noise = torch.randn((cfg.batch, *data.images.shape[1:]), generator=self.gen) * sigma[:, None, None, None]
        sigma, noise = sigma.to(self.device), noise.to(self.device)
        clean = data.images[picks.to(data.images.device)]
        denoised = self.model.denoise(clean + noise, sigma)
        weight = edm_weight(sigma, self.model.config.sigma_data)
        if cfg.input_image == "recon":
            return (weight[:, None, None, None] * (denoised - clean) ** 2).mean()
        total = denoised.new_zeros(())
        for b, i in enumerate(picks.tolist()):
            t = data.targets[i]
            total = total + weight[b] * sinogram_loss(t.model, denoised[b:b + 1], t.trace)
        return total / cfg.batch


def _fixed_settings(cfg: AlignConfig, fingerprint: str, sigma_law: tuple[float, float]) -> dict[str, Any]:
    doc = dataclasses.asdict(cfg)
    doc.update(prior_sha256=fingerprint, inputs=[str(p) for p in cfg.inputs], p_mean=sigma_law[0],
               p_std=sigma_law[1])
    return json.loads(json.dumps({k: doc[k] for k in FIXED_ON_RESUME}))


def _read_resume_state(cfg: AlignConfig, fixed: dict[str, Any]) -> dict[str, Any] | None:
    """The resume state to continue from; None to start at step 0."""
    folder = cfg.out / RESUME_DIR
    if not cfg.resume:
        refuse_earlier_run(cfg.out, RESUME_DIR, "an alignment", AlignError)
        return None
    state_path = folder / RESUME_STATE
    if not state_path.is_file():
        if (cfg.out / CONFIG_FILE).exists():
            raise AlignError(f"{cfg.out}: holds a finished prior but no resume state to continue from")
        if not (folder / RESUME_INPUTS_STATE).is_file():
            raise KlviewerInputError(state_path, "missing: nothing to resume (run without resume first)")
        return None  # stopped before the first checkpoint: start over, reusing the saved input images
    return read_resume_state(state_path, fixed, cfg.steps, AlignError)[0].doc


def _saved_images(cfg: AlignConfig, fixed: dict[str, Any]) -> torch.Tensor | None:
    """The input images of an earlier start of this run (they cost a reconstruction each)."""
    state_path = cfg.out / RESUME_DIR / RESUME_INPUTS_STATE
    if not (cfg.resume and state_path.is_file()):
        return None
    state = Fields(read_json(state_path, MAX_STATE_BYTES, "resume state"), state_path, what="resume state field")
    require_same_settings(state_path, state.section("settings").doc, fixed, AlignError)
    path = cfg.out / RESUME_DIR / RESUME_INPUTS
    images = read_weights(path).get("images")
    if images is None:
        raise KlviewerInputError(path, "holds no 'images' tensor")
    return images


def _save_images(cfg: AlignConfig, images: torch.Tensor, fixed: dict[str, Any]) -> None:
    folder = cfg.out / RESUME_DIR
    atomic_write(folder / RESUME_INPUTS, lambda f: f.write(state_bytes({"images": images})), overwrite=True)
    atomic_write_text(folder / RESUME_INPUTS_STATE, json.dumps({"settings": fixed}) + "\n", overwrite=True)


def _check_paths(cfg: AlignConfig, base_folder: Path) -> None:
    check_outside_base(cfg.out, base_folder, "aligned")
    check_output_folder(cfg.out, cfg.inputs)


def _provenance(cfg: AlignConfig, aligner: _Aligner, base_folder: Path, base: EDMUNetPrior, fingerprint: str,
                data: _Data, device: torch.device, stopped: str | None) -> dict[str, Any]:
    return {
        "kind": "alignment",
        "base_prior": {"name": base.config.name, "path": str(base_folder), "sha256": fingerprint},
        "data": {
            "inputs": [str(p) for p in cfg.inputs],
            "slices": cfg.slices,
            "n_measurements": len(data.targets),
            "measurements": data.inputs,
            "skipped": data.skipped,
            "views": cfg.views,
            "dose_i0": cfg.dose_i0,
            "noise_sigma": cfg.noise_sigma,
            "input_image": cfg.input_image,
            "recon_steps": cfg.recon_steps if cfg.input_image == "recon" else None,
        },
        "loss": {"name": LOSSES[cfg.input_image][0], "formula": LOSSES[cfg.input_image][1],
                 "p_mean": aligner.p_mean, "p_std": aligner.p_std},
        "mode": cfg.mode,
        "lora_rank": cfg.lora_rank if cfg.mode == "lora" else None,
        "trainable_parameters": count_parameters(aligner.params),
        "steps": aligner.step,
        "steps_requested": cfg.steps,
        "stopped": stopped,
        "lr": cfg.lr,
        "warmup": cfg.warmup,
        "batch": cfg.batch,
        "ema": cfg.ema,
        "seed": cfg.seed,
        "command": cfg.command,
        "commands": aligner.commands,
        "final_loss": aligner.mean_recent_loss(FINAL_LOSS_STEPS),
        "final_loss_note": f"mean loss over the last {min(len(aligner.losses), FINAL_LOSS_STEPS)} steps (online weights)",
        "seconds": round(aligner.elapsed_s, 1),
        "input_seconds": round(data.seconds, 1),
        "seconds_note": "seconds: the training loop (all invocations); input_seconds: measurements and input "
                        "images (last invocation)",
        "device": str(device),
        "torch_version": torch.__version__,
        "klviewer_version": __version__,
        "base_training": base.config.training,
    }


def _save(cfg: AlignConfig, aligner: _Aligner, base_folder: Path, base: EDMUNetPrior, fingerprint: str,
          data: _Data, device: torch.device, stopped: str | None = None) -> None:
    config = dataclasses.replace(base.config, name=cfg.name or cfg.out.name, arch=dict(base.config.arch),
                                 klviewer_version=__version__)
    config.training = _provenance(cfg, aligner, base_folder, base, fingerprint, data, device, stopped)
    final = EDMUNetPrior(config)
    final.load_state_dict({k: v.to("cpu") for k, v in aligner.final_weights().items()})
    save_prior(final, cfg.out, overwrite=True)
    report = cfg.out / REPORT_DIR
    write_loss_csv(report / "loss.csv", aligner.losses, aligner.lr_at)
    if aligner.losses:
        from klviewer.priors.report import plot_loss

        plot_loss(aligner.losses, report / "loss.png")


def align_prior(cfg: AlignConfig, progress: Callable[[AlignProgress], None] | None = None,
                cancel: threading.Event | None = None, plan: SeriesPlan | None = None) -> Path:
    """Fine-tune a copy of ``cfg.prior`` on the measurements of ``cfg.inputs``; returns the new prior folder.

    ``plan`` gives the series when they are loaded already (the app); ``cfg.inputs`` and
    ``cfg.slices`` then only record where they came from.

    Raises AlignCancelled (resume state written) when ``cancel`` is set, and AlignDiverged after
    saving the last good weights when the loss or a gradient stops being finite. Warns
    (FewMeasurementsWarning) below MIN_MEASUREMENTS measurements.
    """
    device = resolve_device(cfg.device)
    base_folder = resolve_prior_path(cfg.prior)
    _check_paths(cfg, base_folder)
    base = load_prior(base_folder, device=device)
    if not isinstance(base, EDMUNetPrior):
        raise KlviewerInputError(base_folder / CONFIG_FILE, f"alignment needs an edm-unet prior, this one is "
                                                            f"{base.config.architecture!r}")
    fingerprint = prior_fingerprint(base_folder)
    sigma_law = _sigma_law(cfg, base.config.training)
    fixed = _fixed_settings(cfg, fingerprint, sigma_law)
    doc = _read_resume_state(cfg, fixed)
    saved_images = _saved_images(cfg, fixed)
    collect_started = time.perf_counter()
    data = _collect(cfg, plan or as_plan(cfg.inputs, cfg.slices), base, device, saved_images, progress, cancel)
    data.seconds = time.perf_counter() - collect_started
    if saved_images is None:
        _save_images(cfg, data.images, fixed)

    aligner = _Aligner(cfg, base, data, device, sigma_law)
    if doc is not None:
        aligner.load_resume(cfg.out / RESUME_DIR, doc)
    aligner.commands.append(cfg.command)
    started = time.perf_counter() - aligner.elapsed_s
    while aligner.step < cfg.steps:
        try:
            loss = aligner.train_step(aligner.loss)
        except FineTuneDiverged as exc:
            _save(cfg, aligner, base_folder, base, fingerprint, data, device,
                  stopped=f"diverged at step {aligner.step + 1}: non-finite loss or gradient")
            raise AlignDiverged(cfg.out, exc.step, exc.loss) from None
        aligner.elapsed_s = time.perf_counter() - started
        if progress is not None:
            progress(AlignProgress(aligner.step, cfg.steps, loss))
        if cancel is not None and cancel.is_set():
            aligner.save_resume(cfg.out / RESUME_DIR, fixed)
            raise AlignCancelled(cfg.out, aligner.step)
        if aligner.step % cfg.checkpoint_every == 0 or aligner.step == cfg.steps:
            aligner.save_resume(cfg.out / RESUME_DIR, fixed)
    _save(cfg, aligner, base_folder, base, fingerprint, data, device)
    return cfg.out
