"""One background analysis at a time: start the worker thread, relay its signals, join it on close."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QObject, Signal

from klviewer.app.analysis_panel import AnalysisPanel
from klviewer.app.messages import Notifier
from klviewer.app.worker import AnalysisThread, PriorCache, RunRequest


class AnalysisRuns(QObject):
    slice_done = Signal(object, int, object)
    """(request, slice index, SliceResult), as each slice finishes."""
    finished = Signal(bool)
    """A run ended: True when every requested slice was analysed."""

    def __init__(self, panel: AnalysisPanel, notifier: Notifier, status: Callable[[str, int], None],
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._panel, self._notifier, self._status = panel, notifier, status
        self.priors = PriorCache()
        self.thread: AnalysisThread | None = None
        self._ok = False

    @property
    def running(self) -> bool:
        return self.thread is not None

    def start(self, request: RunRequest, what: str) -> None:
        self.thread = AnalysisThread(request, self.priors, self)
        self.thread.progress.connect(self._panel.show_progress)
        self.thread.slice_done.connect(self.slice_done)
        self.thread.failed.connect(self._failed)
        self.thread.cancelled.connect(self._cancelled)
        self.thread.finished.connect(self._finished)
        self._ok = True
        todo = request.indices
        count = f"{len(todo)} slices" if len(todo) > 1 else f"slice {todo[0] + 1}"
        self._panel.set_running(True, f"Analysing {count} with {request.prior_path.name}…")
        self._status(f"Analysing {what}…", 0)
        self.thread.start()

    def cancel(self) -> None:
        if self.thread is not None:
            self.thread.cancel()
            self._panel.eta.setText("Cancelling…")

    def _failed(self, message: str, details: str) -> None:
        self._ok = False
        self._notifier.error("Analysis failed", message, details)

    def _cancelled(self) -> None:
        self._ok = False
        self._notifier.status("Analysis cancelled", "results of the slices already finished are kept")

    def _finished(self) -> None:
        thread, self.thread = self.thread, None
        if thread is not None:
            thread.deleteLater()
        self._panel.set_running(False)
        self._panel.show_idle("Done" if self._ok else "Stopped", complete=self._ok)
        if self._ok:
            self._status("Analysis finished.", 5_000)
        self.finished.emit(self._ok)

    def stop(self) -> None:
        """Cancel a run and join its thread, never reporting its outcome (the window is closing)."""
        thread, self.thread = self.thread, None
        if thread is not None:
            thread.stop_and_discard(thread.progress, thread.slice_done, thread.failed, thread.cancelled, thread.finished)
