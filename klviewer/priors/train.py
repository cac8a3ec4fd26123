"""Train an EDM-UNet prior by denoising score matching on random patches.

Loss (Karras et al. 2022): ``ln sigma ~ N(p_mean, p_std^2)``, weight
``(sigma^2 + sd^2) / (sigma sd)^2``, so each noise level contributes a loss of order one.
With a teacher (``distill_from``) the target is the teacher's denoised image instead of the clean
one: both have the same minimiser, the posterior mean E[x | x + n], but the teacher's output
carries none of the clean image's randomness given the noisy one, so a smaller network learns
the teacher's denoiser from far fewer images than the teacher needed.
The saved model is the EMA of the weights. Training is resumable: every ``checkpoint_every``
steps the model, EMA, Adam state and the data RNG state go to ``OUT/resume/`` and a resumed
run replays the same random stream, so it ends where an uninterrupted run would.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from klviewer import __version__
from klviewer.devices import resolve_device
from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.io.safe_write import atomic_write, atomic_write_text
from klviewer.priors.base import PriorConfig
from klviewer.priors.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_state_dict,
    load_prior,
    read_weights,
    resolve_prior_path,
    save_prior,
)
from klviewer.priors.data import ImagePool, load_pool
from klviewer.priors.resume_state import (
    read_resume_state,
    refuse_earlier_run,
    restore_training_state,
    training_state_bytes,
)
from klviewer.priors.unet import DEFAULT_ARCH, EDMUNetPrior

RESUME_DIR = "resume"
RESUME_WEIGHTS = "state.safetensors"
RESUME_STATE = "state.json"
TRAINING_DIR = "training"
# Settings that must not change when a run is resumed (steps may grow, to train longer).
FIXED_ON_RESUME = ("data", "size", "patch", "batch", "lr", "seed", "n_phantoms", "ema", "warmup",
                   "p_mean", "p_std", "sigma_data", "hu_offset", "hu_scale", "arch", "init_from", "distill_from")


class TrainingError(KlviewerError):
    """Training could not start or diverged."""


class TrainingCancelled(KlviewerError):
    """The cancel event was set; a resume checkpoint was written at ``step``."""

    def __init__(self, out: Path, step: int) -> None:
        self.out, self.step = out, step
        super().__init__(f"training cancelled at step {step}; continue with --resume (output {out})")


@dataclass
class TrainConfig:
    out: Path
    data: str = "phantoms"
    size: int = 256
    # None = whole images. Smaller patches cost less per step, but GroupNorm then sees other
    # statistics in training (a patch) than at inference (the whole image), and the first
    # default prior, trained on 128-px patches, never formed a body outline in its samples.
    patch: int | None = None
    steps: int = 10_000
    batch: int = 4
    lr: float = 1e-3
    warmup: int = 200
    device: str = "auto"
    resume: bool = False
    seed: int = 0
    n_phantoms: int = 256
    ema: float = 0.999
    # EDM's -1.2 shifted down: CT detail that matters (organ contrast ~0.05 in HU/1000 units, KLIP's
    # window sigma ~0.02..0.15) sits below EDM's median noise. EDM's 1.2 widened to 2.0: with 1.4, only
    # 1% of draws had sigma > 5 and the first prior never learned the global layout (samples were
    # texture without a body outline); 2.0 puts 13% above sigma 2 and keeps 42% below 0.15.
    p_mean: float = -1.5
    p_std: float = 2.0
    sigma_data: float = 0.5
    hu_offset: float = 0.0
    hu_scale: float = 1000.0
    arch: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ARCH))
    name: str | None = None
    checkpoint_every: int = 250
    command: str | None = None
    report: bool = True
    init_from: str | None = None
    """A prior (name or folder) of the same architecture whose weights start the run, so a
    shipped prior can be trained further without its resume state."""
    workers: int = 1
    """Processes that build the phantom pool; the pool does not depend on it."""
    distill_from: str | None = None
    """A prior (name or folder) whose denoised images are the targets: a distilled prior. It must
    share the image size, HU units and sigma_data; its architecture may differ."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.patch is None:
            self.patch = self.size
        problems = []
        if self.patch > self.size or self.patch < 1:
            problems.append(f"patch {self.patch} must be between 1 and size {self.size}")
        for key in ("steps", "batch", "n_phantoms", "checkpoint_every", "workers"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be at least 1")
        if not 0 <= self.ema < 1:
            problems.append(f"ema must be in [0, 1), got {self.ema}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        multiple = int(self.arch.get("stem", 1)) * 2 ** (len(self.arch["channels"]) - 1)
        if self.patch % multiple or self.size % multiple:
            problems.append(f"patch ({self.patch}) and size ({self.size}) must be multiples of {multiple} "
                            f"for this architecture")
        if problems:
            raise TrainingError("invalid training settings: " + "; ".join(problems))

    def fixed_settings(self) -> dict[str, Any]:
        doc = asdict(self)
        return {k: doc[k] for k in FIXED_ON_RESUME}


@dataclass
class TrainProgress:
    step: int
    steps: int
    loss: float
    elapsed_s: float


def _new_prior(cfg: TrainConfig, pool: ImagePool) -> EDMUNetPrior:
    config = PriorConfig(
        name=cfg.name or cfg.out.name, architecture="edm-unet", image_size=(cfg.size, cfg.size), channels=1,
        hu_offset=cfg.hu_offset, hu_scale=cfg.hu_scale, sigma_data=cfg.sigma_data,
        # The noise range the loss trained (3 sd of ln sigma each side), within EDM's 0.002..80.
        sigma_min=float(f"{max(0.002, math.exp(cfg.p_mean - 3 * cfg.p_std)):.3g}"),
        sigma_max=float(f"{min(80.0, math.exp(cfg.p_mean + 3 * cfg.p_std)):.3g}"),
        pixel_spacing_mm=pool.pixel_spacing_mm, arch=dict(cfg.arch))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return EDMUNetPrior(config)


def _load_teacher(cfg: TrainConfig, device: torch.device) -> EDMUNetPrior:
    teacher = load_prior(cfg.distill_from, device)
    c = teacher.config
    mine = ((cfg.size, cfg.size), cfg.hu_offset, cfg.hu_scale, cfg.sigma_data)
    theirs = (tuple(c.image_size), c.hu_offset, c.hu_scale, c.sigma_data)
    if mine != theirs or not isinstance(teacher, EDMUNetPrior):
        raise TrainingError(f"cannot distil from {cfg.distill_from}: its image size, HU units and sigma_data "
                            f"{theirs} differ from this run's {mine}, or it is not an EDM UNet")
    return teacher.eval().requires_grad_(False)


def _load_initial_weights(model: EDMUNetPrior, name_or_path: str) -> None:
    folder = resolve_prior_path(name_or_path)
    weights_path = folder / WEIGHTS_FILE
    tensors = read_weights(weights_path)
    check_state_dict(model, tensors, weights_path)
    model.load_state_dict(tensors)


class _Trainer:
    """The mutable state of one run: model, EMA, optimiser, RNG, loss history."""

    def __init__(self, cfg: TrainConfig, pool: ImagePool, device: torch.device) -> None:
        self.cfg, self.pool, self.device = cfg, pool, device
        self.model = _new_prior(cfg, pool)
        if cfg.init_from is not None:
            _load_initial_weights(self.model, cfg.init_from)
        self.model = self.model.to(device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.losses: list[float] = []
        self.elapsed_s = 0.0
        self.commands: list[str | None] = []
        self.amp_dtype = None
        if device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.teacher = _load_teacher(cfg, device) if cfg.distill_from is not None else None

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup))

    def train_step(self) -> float:
        cfg = self.cfg
        # All randomness comes from one CPU generator, so a run is reproducible on any device.
        y, grid = self.pool.sample_patches(cfg.batch, cfg.patch, self.gen)
        sigma = torch.exp(cfg.p_mean + cfg.p_std * torch.randn(cfg.batch, generator=self.gen))
        noise = torch.randn(y.shape, generator=self.gen) * sigma[:, None, None, None]
        y, grid, sigma, noise = (t.to(self.device) for t in (y, grid, sigma, noise))
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        noisy = y + noise
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            target = y if self.teacher is None else self._teacher_denoised(noisy, sigma, grid)
            denoised = self.model.precondition(noisy, sigma, grid if self.model.net.pos_channels else None)
        weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2
        loss = (weight[:, None, None, None] * (denoised.float() - target) ** 2).mean()
        if not torch.isfinite(loss):
            raise TrainingError(f"training diverged at step {self.step} (loss {loss.item()}); lower --lr")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        update_ema(self.ema, self.model, self.cfg.ema, self.step)
        self.step += 1
        value = float(loss.item())
        self.losses.append(value)
        return value

    @torch.no_grad()
    def _teacher_denoised(self, noisy: torch.Tensor, sigma: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None
        return self.teacher.precondition(noisy, sigma, grid if self.teacher.net.pos_channels else None).float()

    # --- resume checkpoints -------------------------------------------------------------------

    def save_resume(self) -> None:
        folder = self.cfg.out / RESUME_DIR
        blob, param_groups = training_state_bytes(self.model, self.ema, self.opt, self.gen, self.step)
        doc = {"step": self.step, "elapsed_s": self.elapsed_s, "settings": self.cfg.fixed_settings(),
               "param_groups": param_groups, "losses": self.losses,
               "commands": self.commands}
        atomic_write(folder / RESUME_WEIGHTS, lambda f: f.write(blob), overwrite=True)
        atomic_write_text(folder / RESUME_STATE, json.dumps(doc) + "\n", overwrite=True)

    def load_resume(self) -> None:
        folder = self.cfg.out / RESUME_DIR
        state_path = folder / RESUME_STATE
        if not state_path.is_file():
            raise KlviewerInputError(state_path, "missing: nothing to resume (run without --resume first)")
        mine = json.loads(json.dumps(self.cfg.fixed_settings()))
        state, step = read_resume_state(state_path, mine, self.cfg.steps, TrainingError)
        weights_path = folder / RESUME_WEIGHTS
        restore_training_state(weights_path, self.model, self.ema, self.opt, self.gen, state.items("param_groups"))
        self.step, self.elapsed_s = step, state.number("elapsed_s", 0.0, lo=0)
        self.losses = state.numbers("losses")[:step]
        self.commands = list(state.items("commands", []))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """Move `ema`'s copy of each trainable parameter of `model` towards it; frozen ones stay as they are.

    The decay ramps up with `step` (as in EDM's reference code) so that short runs, and short
    fine-tunes, still get a useful EMA.
    """
    beta = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            p_ema.lerp_(p.detach(), 1 - beta)


def _prepare_out(cfg: TrainConfig) -> None:
    if not cfg.resume:
        refuse_earlier_run(cfg.out, RESUME_DIR, "a training run", TrainingError)


def write_loss_csv(path: Path, losses: list[float], lr_at: Callable[[int], float]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["step", "loss", "lr"])
    for i, value in enumerate(losses):
        writer.writerow([i + 1, f"{value:.6g}", f"{lr_at(i):.6g}"])
    atomic_write_text(path, buffer.getvalue(), overwrite=True)


def train_prior(cfg: TrainConfig, progress: Callable[[TrainProgress], None] | None = None,
                cancel: threading.Event | None = None) -> Path:
    """Train (or resume training) a prior into ``cfg.out``; returns the prior folder."""
    device = resolve_device(cfg.device)
    _prepare_out(cfg)
    pool = load_pool(cfg.data, cfg.n_phantoms, cfg.size, cfg.seed, cfg.hu_offset, cfg.hu_scale, cfg.workers)
    trainer = _Trainer(cfg, pool, device)
    if cfg.resume and (cfg.out / RESUME_DIR / RESUME_STATE).exists():
        trainer.load_resume()
    elif cfg.resume and (cfg.out / CONFIG_FILE).exists():
        raise TrainingError(f"{cfg.out}: holds a finished prior but no resume state to continue from")
    trainer.commands.append(cfg.command)
    started = time.perf_counter() - trainer.elapsed_s
    while trainer.step < cfg.steps:
        loss = trainer.train_step()
        trainer.elapsed_s = time.perf_counter() - started
        if progress is not None:
            progress(TrainProgress(trainer.step, cfg.steps, loss, trainer.elapsed_s))
        if cancel is not None and cancel.is_set():
            trainer.save_resume()
            raise TrainingCancelled(cfg.out, trainer.step)
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps:
            trainer.save_resume()

    final = trainer.ema.to("cpu")
    tail = trainer.losses[-min(len(trainer.losses), 200):]
    final.config.training = {
        "command": cfg.command,
        "init_from": cfg.init_from,
        "distill_from": cfg.distill_from,
        # Every invocation that contributed, in order (a resumed run lists the original first).
        "commands": trainer.commands,
        "data": pool.description,
        "steps": cfg.steps,
        "batch": cfg.batch,
        "patch": cfg.patch,
        "lr": cfg.lr,
        "warmup": cfg.warmup,
        "ema": cfg.ema,
        "p_mean": cfg.p_mean,
        "p_std": cfg.p_std,
        "seed": cfg.seed,
        "final_loss": float(sum(tail) / len(tail)),
        "final_loss_note": f"mean EDM-weighted loss over the last {len(tail)} steps (online weights)"
                           + (", against the teacher's denoised images" if cfg.distill_from else ""),
        "seconds": round(trainer.elapsed_s, 1),
        "device": str(device),
        "torch_version": torch.__version__,
        "klviewer_version": __version__,
    }
    final.config.klviewer_version = __version__
    save_prior(final, cfg.out, overwrite=True)
    training = cfg.out / TRAINING_DIR
    write_loss_csv(training / "loss.csv", trainer.losses, trainer.lr_at)
    from klviewer.priors.report import plot_loss, write_training_report

    plot_loss(trainer.losses, training / "loss.png")
    if cfg.report:
        write_training_report(cfg.out, device=device)
    return cfg.out

