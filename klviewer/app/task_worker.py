"""Long jobs other than the slice analysis (prior fit, alignment, comparison, export) off the GUI thread.

A job is a plain function of a `JobContext`: it reports progress through `ctx.report` and
honours `ctx.cancel` (a threading.Event that the services it calls check themselves).
`TaskSlot` holds at most one running job for a panel or dialog and forwards its outcome
through queued signals, so the GUI never waits on a job and a failure never closes the app.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PySide6.QtCore import QObject, Signal

from klviewer.app.worker import PROGRESS_INTERVAL_S, CancellableThread, compute_threads
from klviewer.errors import KlviewerError


class TaskCancelled(KlviewerError):
    """Raised by `JobContext.check` once the user has asked a job to stop."""


@dataclass
class JobContext:
    cancel: threading.Event
    _emit: Callable[[int, int, str], None]
    _last: float = field(default=0.0, repr=False)

    def report(self, done: int, total: int, text: str = "") -> None:
        """Progress, spaced at least PROGRESS_INTERVAL_S apart except for the last step and stage changes."""
        now = time.monotonic()
        if done >= total or now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            self._emit(int(done), int(total), text)

    def check(self) -> None:
        if self.cancel.is_set():
            raise TaskCancelled("cancelled")


Job = Callable[[JobContext], object]


class TaskThread(CancellableThread):
    progress = Signal(int, int, str)
    """(done, total, what is being done)."""
    succeeded = Signal(object)
    failed = Signal(str, str)
    """(message, details)."""
    cancelled = Signal()

    def __init__(self, job: Job, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._job = job

    def run(self) -> None:
        torch.set_num_threads(compute_threads())  # OpenMP settings are per thread
        ctx = JobContext(self._cancel, self.progress.emit)
        try:
            result = self._job(ctx)
        except Exception as exc:
            # Whatever a service raises once cancel is set (its own Cancelled type, or a failure
            # caused by stopping midway) is the cancel the user asked for, not an error.
            if self._cancel.is_set():
                self.cancelled.emit()
            elif isinstance(exc, KlviewerError):
                self.failed.emit(str(exc), "")
            else:
                self.failed.emit(f"{type(exc).__name__}: {exc}", traceback.format_exc())
            return
        if self._cancel.is_set():
            self.cancelled.emit()
        else:
            self.succeeded.emit(result)


class TaskSlot(QObject):
    """At most one job at a time, with its signals re-emitted from a long-lived object."""

    started = Signal()
    progress = Signal(int, int, str)
    succeeded = Signal(object)
    failed = Signal(str, str)
    cancelled = Signal()
    finished = Signal(bool)
    """The job ended: True when it succeeded."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.thread: TaskThread | None = None
        self._ok = False

    @property
    def running(self) -> bool:
        return self.thread is not None

    def start(self, job: Job) -> bool:
        """Start `job`; False when one is still running."""
        if self.thread is not None:
            return False
        thread = TaskThread(job, self)
        thread.progress.connect(self.progress)
        thread.succeeded.connect(self._succeeded)
        thread.failed.connect(self._failed)
        thread.cancelled.connect(self.cancelled)
        thread.finished.connect(self._finished)
        self.thread = thread
        self._ok = False
        self.started.emit()
        thread.start()
        return True

    def cancel(self) -> None:
        if self.thread is not None:
            self.thread.cancel()

    def _succeeded(self, result: object) -> None:
        self._ok = True
        self.succeeded.emit(result)

    def _failed(self, message: str, details: str) -> None:
        self.failed.emit(message, details)

    def _finished(self) -> None:
        thread, self.thread = self.thread, None
        if thread is not None:
            thread.deleteLater()
        self.finished.emit(self._ok)

    def stop(self) -> None:
        """Cancel and join the job without reporting its outcome (used when the window closes)."""
        thread, self.thread = self.thread, None
        if thread is not None:
            thread.stop_and_discard(thread.progress, thread.succeeded, thread.failed, thread.cancelled, thread.finished)
