"""A progress bar, a status line and a Cancel button bound to a `TaskSlot`."""

from __future__ import annotations

import time

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from klviewer.app.task_worker import TaskSlot


class TaskProgress(QWidget):
    def __init__(self, slot: TaskSlot, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._slot = slot
        self._started = 0.0
        self.reported: tuple[int, int] | None = None
        """The job's last (done, total)."""
        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.bar.setTextVisible(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self._cancel)
        self.status = QLabel("Idle")
        self.status.setWordWrap(True)
        self.status.setStyleSheet("color: #a0a0a0;")
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.status)
        slot.started.connect(self._on_started)
        slot.progress.connect(self.show_progress)
        slot.cancelled.connect(lambda: self.status.setText("Cancelled"))
        slot.failed.connect(lambda message, _details: self.status.setText(f"Failed: {message}"))
        slot.finished.connect(self._on_finished)

    def _on_started(self) -> None:
        self._started = time.monotonic()
        self.reported = None
        self.bar.setRange(0, 0)  # busy until the first report
        self.status.setText("Starting…")
        self.cancel_button.setEnabled(True)

    def _cancel(self) -> None:
        self._slot.cancel()
        self.status.setText("Cancelling…")
        self.cancel_button.setEnabled(False)

    def show_progress(self, done: int, total: int, text: str) -> None:
        self.reported = (done, total)
        self.bar.setRange(0, max(total, 1))
        self.bar.setValue(min(done, max(total, 1)))
        elapsed = time.monotonic() - self._started
        eta = f" · ETA {_clock(elapsed * (total - done) / done)}" if 0 < done < total else ""
        self.status.setText(f"{text or 'Working'} · {done} / {total} · {_clock(elapsed)} elapsed{eta}")

    def _on_finished(self, ok: bool) -> None:
        self.cancel_button.setEnabled(False)
        if ok:
            if self.bar.maximum() == 0:  # the job never reported: it was one step
                self.bar.setRange(0, 1)
            self.bar.setValue(self.bar.maximum())
            self.status.setText(f"Done in {_clock(time.monotonic() - self._started)}")
        elif self.bar.maximum() == 0:
            self.bar.setRange(0, 1)
            self.bar.setValue(0)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def result_label() -> QLabel:
    """The dialogs' line under the progress bar: what the job did, wrapped and selectable (paths can be copied)."""
    label = QLabel()
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label
