"""Fine-tuning a copy of a prior: the adapted network, its EMA, the optimiser, one training step, resume state.

`klviewer align` (a loss on images made from measurements) and the site adaptation of a prior
(a loss on a site's own healthy images) fine-tune through `FineTuner`; only the loss differs.
All randomness comes from one CPU generator, so a run is reproducible on any device. A
non-finite loss or gradient raises `FineTuneDiverged` before the weights are touched.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.io.safe_write import atomic_write, atomic_write_text
from klviewer.priors.adapters import apply_adapter, merged_state_dict
from klviewer.priors.resume_state import restore_training_state, training_state_bytes
from klviewer.priors.train import update_ema
from klviewer.priors.unet import EDMUNetPrior

RESUME_WEIGHTS = "state.safetensors"
RESUME_STATE = "state.json"


def check_outside_base(out: Path, base_folder: Path, what: str) -> None:
    """A fine-tuned copy's folder `out` may neither be the base prior's folder, lie in it, nor hold it:
    the base is never written."""
    out_real, base = out.resolve(), base_folder.resolve()
    if out_real == base or base in out_real.parents or out_real in base.parents:
        raise KlviewerInputError(out, f"the {what} prior must go outside the base prior's folder {base_folder}, "
                                      "which is never written")


class FineTuneDiverged(KlviewerError):
    """A non-finite loss or gradient at `step`; the weights are those after the step before."""

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        super().__init__(f"fine-tuning diverged at step {step + 1} (loss {loss})")


@dataclass(frozen=True)
class FineTuneSettings:
    mode: str = "norm-bias"
    """What trains: "full", "norm-bias" or "lora" (see `klviewer.priors.adapters`)."""
    lora_rank: int = 4
    lr: float = 1e-3
    warmup: int = 0
    """Linear learning-rate warm-up steps."""
    ema: float = 0.99
    """EMA decay of the saved weights (0 = save the last weights)."""
    seed: int = 0


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2: every noise level's error counts alike."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def draw_sigmas(gen: torch.Generator, n: int, p_mean: float, p_std: float) -> torch.Tensor:
    """EDM's log-normal training noise levels: ln sigma ~ N(p_mean, p_std^2)."""
    return torch.exp(p_mean + p_std * torch.randn(n, generator=gen))


class FineTuner:
    """The mutable state of one fine-tuning run: adapted copy of the base prior, EMA, Adam, RNG, loss history."""

    def __init__(self, base: EDMUNetPrior, settings: FineTuneSettings, device: torch.device) -> None:
        self.settings, self.device = settings, device
        self.model = copy.deepcopy(base).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)  # LoRA's initial adapters: same seed, same run
            self.params = apply_adapter(self.model, settings.mode, settings.lora_rank)
        self.model.train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.params, lr=settings.lr)
        self.gen = torch.Generator().manual_seed(settings.seed)
        self.step = 0
        self.losses: list[float] = []
        self.elapsed_s = 0.0
        self.commands: list[str | None] = []

    def lr_at(self, step: int) -> float:
        return self.settings.lr * min(1.0, (step + 1) / max(1, self.settings.warmup))

    def train_step(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        """One optimiser step on `loss_fn()`; raises FineTuneDiverged (weights untouched) on a non-finite loss or gradient."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss = loss_fn()
        value = float(loss.item())
        if not math.isfinite(value):
            raise FineTuneDiverged(self.step, value)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if not all(bool(torch.isfinite(p.grad).all()) for p in self.params if p.grad is not None):
            raise FineTuneDiverged(self.step, value)
        self.opt.step()
        update_ema(self.ema, self.model, self.settings.ema, self.step)
        self.step += 1
        self.losses.append(value)
        return value

    def final_weights(self) -> dict[str, torch.Tensor]:
        """The weights to save, adapters merged in: the EMA's, or the last ones when EMA is off."""
        return merged_state_dict(self.ema if self.settings.ema > 0 else self.model)

    def mean_recent_loss(self, last: int = 50) -> float | None:
        tail = self.losses[-min(len(self.losses), last):]
        return float(sum(tail) / len(tail)) if tail else None

    def save_resume(self, folder: Path, fixed: dict[str, Any]) -> None:
        """Write the resume state (safetensors + JSON) under `folder`; `fixed` are the settings a resume must match."""
        blob, param_groups = training_state_bytes(self.model, self.ema, self.opt, self.gen, self.step)
        doc = {"step": self.step, "elapsed_s": self.elapsed_s, "settings": fixed,
               "param_groups": param_groups, "losses": self.losses, "commands": self.commands}
        atomic_write(folder / RESUME_WEIGHTS, lambda f: f.write(blob), overwrite=True)
        atomic_write_text(folder / RESUME_STATE, json.dumps(doc) + "\n", overwrite=True)

    def load_resume(self, folder: Path, doc: dict[str, Any]) -> None:
        """Continue from what `save_resume` wrote (`doc` is its JSON, already checked against the run's settings)."""
        restore_training_state(folder / RESUME_WEIGHTS, self.model, self.ema, self.opt, self.gen, doc["param_groups"])
        self.step = int(doc["step"])
        self.elapsed_s = float(doc.get("elapsed_s", 0.0))
        self.losses = list(doc["losses"])[:self.step]
        self.commands = list(doc.get("commands", []))
