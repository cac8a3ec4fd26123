"""Fixtures shared by the GUI tests (test_app_*.py import them from here; this module has no tests).

Every GUI test gets its own settings file, so nothing touches the user's QSettings, and a tiny
32x32 prior so an analysis takes well under a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch


FAST_STEPS = 4


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "settings" / "klviewer.ini"
    path.parent.mkdir()
    monkeypatch.setenv("KLVIEWER_SETTINGS_FILE", str(path))
    return path


@pytest.fixture()
def window(qtbot, tiny_prior: Path, isolated_settings: Path):
    """A main window with the demo study open, the tiny prior picked and fast sampler settings."""
    from klviewer.app.main_window import MainWindow
    from klviewer.app.settings import Preferences, open_settings

    win = MainWindow(Preferences(open_settings()))
    win.notifier.show_dialogs = False  # messages are checked through notifier.history
    qtbot.addWidget(win)
    win.show()
    assert win.panel.add_prior_folder(tiny_prior)
    win.panel.steps.setValue(FAST_STEPS)
    win.panel.device_combo.setCurrentIndex(win.panel.device_combo.findData("cpu"))
    assert win.open_demo()
    yield win
    win.stop_run()


def run_and_wait(qtbot, win, start: Callable[[], bool] | None = None, timeout: int = 30_000) -> list[bool]:
    """Start a run (default: the shown slice) and wait until it has finished; returns [ok]."""
    outcome: list[bool] = []
    win.analysis_finished.connect(outcome.append)
    with qtbot.waitSignal(win.analysis_finished, timeout=timeout):
        assert (start or win.run_current_slice)()
    win.analysis_finished.disconnect(outcome.append)
    return outcome


class SlowPrior(torch.nn.Module):
    """Wraps a prior: every denoiser call sleeps (and may fail at call `fail_at`), to test the GUI under a run."""

    def __init__(self, inner, delay_s: float = 0.03, fail_at: int | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.delay_s = delay_s
        self.fail_at = fail_at
        self.calls = 0
        self.started = threading.Event()

    def denoise(self, x: torch.Tensor, sigma):
        self.calls += 1
        self.started.set()
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("the prior broke down midway")
        time.sleep(self.delay_s)
        return self.inner.denoise(x, sigma)

    def x_to_hu(self, x):
        return self.inner.x_to_hu(x)


@dataclass
class SlowPriors:
    """What the patched loader builds: SlowPriors around the real prior, with these settings."""

    delay_s: float = 0.03
    fail_at: int | None = None
    made: list[SlowPrior] = field(default_factory=list)


@pytest.fixture()
def slow_priors(monkeypatch: pytest.MonkeyPatch) -> SlowPriors:
    """Make the analysis worker load a SlowPrior around the real one."""
    import klviewer.app.worker as worker

    control = SlowPriors()
    real_load = worker.load_prior

    def load(path, device):
        control.made.append(SlowPrior(real_load(path, device), control.delay_s, control.fail_at))
        return control.made[-1]

    monkeypatch.setattr(worker, "load_prior", load)
    return control
