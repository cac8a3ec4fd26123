"""Fixtures for the prior-fit, alignment, comparison and export GUI tests (this module has no tests).

Every prior here is a copy of the session's tiny 32x32 prior: `other_prior` and `third_prior`
with perturbed weights (more priors on the same grid), `small_grid_prior` on a 16x16 grid (to provoke
"different grids" refusals), and `DelayedPrior` slows a prior's denoiser so a job can be
cancelled while it runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from klviewer.priors.base import Prior


def _perturbed_copy(source: Path, target: Path, name: str, seed: int, size: int | None = None,
                    scale: float = 0.05) -> Path:
    from klviewer.priors import EDMUNetPrior, load_prior, save_prior

    base = load_prior(source, "cpu")
    config = base.config
    config.name = name
    if size is not None:
        config.image_size = (size, size)
    prior = EDMUNetPrior(config)
    prior.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return save_prior(prior, target)


@pytest.fixture(scope="session")
def other_prior(tiny_prior: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second prior on the tiny prior's grid, with different weights."""
    return _perturbed_copy(tiny_prior, tmp_path_factory.mktemp("priors") / "tiny-other", "tiny-other", seed=1)


@pytest.fixture(scope="session")
def third_prior(tiny_prior: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another prior on the tiny prior's grid, perturbed twice as much as `other_prior`."""
    return _perturbed_copy(tiny_prior, tmp_path_factory.mktemp("priors") / "tiny-third", "tiny-third", seed=3,
                           scale=0.1)


@pytest.fixture(scope="session")
def small_grid_prior(tiny_prior: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prior on a 16x16 grid: it cannot be compared with the 32x32 ones."""
    return _perturbed_copy(tiny_prior, tmp_path_factory.mktemp("priors") / "tiny-16", "tiny-16", seed=2, size=16)


class DelayedPrior(Prior):
    """A prior whose every denoiser call sleeps first, so a job is still running when the test cancels it."""

    def __init__(self, inner: Prior, delay_s: float) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.delay_s = delay_s
        self.calls = 0
        self.started = threading.Event()

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.started.set()
        time.sleep(self.delay_s)
        return self.inner.denoise(x, sigma)


@dataclass
class Delays:
    delay_s: float = 0.02
    made: list[DelayedPrior] = field(default_factory=list)

    @property
    def started(self) -> bool:
        return any(p.started.is_set() for p in self.made)

    @property
    def calls(self) -> int:
        return sum(p.calls for p in self.made)


def delay_loader(monkeypatch: pytest.MonkeyPatch, module) -> Delays:
    """Make `module.load_prior` hand out DelayedPriors."""
    control = Delays()
    real: Callable = module.load_prior

    def load(path, device="cpu"):
        control.made.append(DelayedPrior(real(path, device), control.delay_s))
        return control.made[-1]

    monkeypatch.setattr(module, "load_prior", load)
    return control


def wait_for_slot(qtbot, slot, start: Callable[[], bool], timeout: int = 60_000) -> list[bool]:
    """Start a TaskSlot job and wait until it has finished; returns [succeeded]."""
    outcome: list[bool] = []
    slot.finished.connect(outcome.append)
    with qtbot.waitSignal(slot.finished, timeout=timeout):
        assert start()
    slot.finished.disconnect(outcome.append)
    return outcome


def message_titles(window) -> list[str]:
    return [m.title for m in window.notifier.history]
