"""Telling the user about problems without stopping the app.

Every message goes to the status bar and into a non-modal dialog, and is kept in `history`.
Nothing blocks in a nested event loop, so a failure during a background run, a test, or a
scripted `--quit` session never waits on a click.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMainWindow, QMessageBox

Level = Literal["info", "warning", "error"]

STATUS_MS = 10_000
_ICONS = {"info": QMessageBox.Icon.Information, "warning": QMessageBox.Icon.Warning,
          "error": QMessageBox.Icon.Critical}


@dataclass(frozen=True)
class Message:
    level: Level
    title: str
    text: str
    details: str = ""


class Notifier:
    def __init__(self, window: QMainWindow) -> None:
        self._window = window
        self.history: list[Message] = []
        self.show_dialogs = True

    def info(self, title: str, text: str, details: str = "") -> None:
        self._post(Message("info", title, text, details))

    def warning(self, title: str, text: str, details: str = "") -> None:
        self._post(Message("warning", title, text, details))

    def error(self, title: str, text: str, details: str = "") -> None:
        self._post(Message("error", title, text, details))

    def status(self, title: str, text: str) -> None:
        """An outcome the user asked for (e.g. a cancel): the status bar says it, no dialog interrupts."""
        self._post(Message("info", title, text), dialog=False)

    def _post(self, message: Message, dialog: bool = True) -> None:
        self.history.append(message)
        self._window.statusBar().showMessage(f"{message.title}: {message.text}", STATUS_MS)
        if dialog and self.show_dialogs:
            self._dialog(message)

    def _dialog(self, message: Message) -> QMessageBox:
        box = QMessageBox(_ICONS[message.level], message.title, message.text, QMessageBox.StandardButton.Ok,
                          self._window)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.setWindowModality(Qt.WindowModality.NonModal)
        if message.details:
            box.setDetailedText(message.details)
        box.show()
        return box
