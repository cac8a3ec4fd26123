"""Cine: play the slices of the shown series at a chosen rate, looping at the end."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QObject, QTimer, Signal

DEFAULT_FPS = 8
MAX_FPS = 30


class Cine(QObject):
    playing_changed = Signal(bool)

    def __init__(self, step: Callable[[], None], parent: QObject | None = None) -> None:
        """`step` shows the next slice (wrapping to the first after the last)."""
        super().__init__(parent)
        self._step = step
        self.timer = QTimer(self)
        self.timer.timeout.connect(self._step)
        self.set_fps(DEFAULT_FPS)

    @property
    def playing(self) -> bool:
        return self.timer.isActive()

    def set_fps(self, fps: int) -> None:
        self.fps = min(max(int(fps), 1), MAX_FPS)
        self.timer.setInterval(round(1000 / self.fps))

    def set_playing(self, playing: bool) -> None:
        if playing == self.playing:
            return
        if playing:
            self.timer.start()
        else:
            self.timer.stop()
        self.playing_changed.emit(playing)

    def toggle(self) -> None:
        self.set_playing(not self.playing)
