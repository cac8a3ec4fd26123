"""Running the analysis off the GUI thread.

A run loads the prior (kept for the next run), then relays the pipeline's per-slice results
(`klviewer.inference.pipeline.analyze_slices`, as `klviewer analyze` runs them). Results and
progress arrive through queued signals; `cancel()` sets the Event the sampler checks every step,
so a run stops within one step and the thread can be joined.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from PySide6.QtCore import QObject, QThread, Signal, SignalInstance

from klviewer.devices import resolve_device
from klviewer.errors import KlviewerError
from klviewer.inference.escalation import Escalation
from klviewer.inference.pipeline import LoadedPrior, analyze_slices
from klviewer.inference.plan import plan_open_series
from klviewer.inference.sampler import AnalysisCancelled
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.study import Series
from klviewer.priors.checkpoint import load_prior


def compute_threads() -> int:
    """Threads for torch in a run: all cores but one, which stays free for the GUI.

    Besides keeping painting smooth, this matters for speed: OpenMP threads meet at a
    spin-waiting barrier after every operation, so a team as large as the machine loses
    most of its time whenever any other thread (the GUI, another process) takes a core.
    Measured on 2 busy cores: 2 s per 32x32 slice with two threads, 20 ms with one.
    """
    return max(1, (os.cpu_count() or 2) - 1)


PROGRESS_INTERVAL_S = 0.05
"""Progress signals are spaced at least this far apart, so a fast sampler cannot flood the GUI."""


class PriorCache:
    """The last loaded prior, so consecutive runs with the same prior skip loading it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, str] | None = None
        self._prior = None

    def get(self, path: Path, device: torch.device) -> LoadedPrior:
        """The prior at `path` on `device`, with its calibration read afresh (it may have been recalibrated)."""
        key = (str(path), str(device))
        with self._lock:
            if self._key != key:
                self._prior, self._key = None, None  # free the old one before loading the new one
                self._prior = load_prior(path, device)
                self._key = key
            return LoadedPrior.of(path, self._prior, device)


class CancellableThread(QThread):
    """A QThread whose work polls a threading.Event, which `cancel()` sets."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def stop_and_discard(self, *signals: SignalInstance) -> None:
        """Cancel, join, and disconnect `signals` so that the outcome is never reported (a window is closing)."""
        self.cancel()
        self.wait()
        for signal in signals:
            signal.disconnect()
        self.deleteLater()


@dataclass(frozen=True)
class RunRequest:
    series: Series
    indices: tuple[int, ...]
    prior_path: Path
    settings: AnalysisSettings
    escalation: Escalation | None = None
    """Two stages (`klviewer.inference.escalation`); None: one."""


class AnalysisThread(CancellableThread):
    progress = Signal(int, int)
    """(steps done, total steps) over the whole request."""
    slice_done = Signal(object, int, object)
    """(request, slice index, SliceResult)."""
    failed = Signal(str, str)
    """(message, details)."""
    cancelled = Signal()

    def __init__(self, request: RunRequest, priors: PriorCache, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.request = request
        self._priors = priors
        self._last_progress = 0.0
        self._total = request.settings.step_count * len(request.indices)

    def run(self) -> None:
        torch.set_num_threads(compute_threads())  # OpenMP settings are per thread: set them here
        try:
            self._analyse()
        except AnalysisCancelled:
            self.cancelled.emit()
        except KlviewerError as exc:
            self.failed.emit(str(exc), "")
        except Exception as exc:  # a fault in a prior or in our code must not take the app down
            self.failed.emit(f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def _analyse(self) -> None:
        req = self.request
        loaded = self._priors.get(req.prior_path, resolve_device(req.settings.device))
        plan = plan_open_series([(req.series, req.indices)])
        for item in analyze_slices(plan, loaded, req.settings, escalation=req.escalation, progress=self._report,
                                   cancel=self._cancel):
            self.slice_done.emit(req, item.index, item.result)
        self.progress.emit(self._total, self._total)

    def _report(self, done: int, total: int) -> None:
        self._total = total  # the pipeline's count, which grows as two stages escalate slices
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self.progress.emit(done, total)
