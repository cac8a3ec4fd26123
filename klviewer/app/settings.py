"""Persistent preferences (QSettings), with typed reads.

`KLVIEWER_SETTINGS_FILE` points the app at another INI file; tests use it so they never touch
the user's own settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from PySide6.QtCore import QByteArray, QSettings

ORGANIZATION = "klviewer"
APPLICATION = "klviewer"
SETTINGS_ENV = "KLVIEWER_SETTINGS_FILE"
MAX_RECENT = 10

T = TypeVar("T", int, float, bool, str)


def open_settings() -> QSettings:
    override = os.environ.get(SETTINGS_ENV)
    if override:
        return QSettings(override, QSettings.Format.IniFormat)
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, ORGANIZATION, APPLICATION)


class Preferences:
    """Typed access to QSettings. An unreadable stored value falls back to the default."""

    def __init__(self, store: QSettings) -> None:
        self.store = store

    def get(self, key: str, default: T) -> T:
        raw = self.store.value(key, None)
        if raw is None:
            return default
        try:
            if isinstance(default, bool):  # INI stores booleans as "true"/"false"
                return (raw.lower() == "true") if isinstance(raw, str) else bool(raw)  # type: ignore[return-value]
            return type(default)(raw)
        except (TypeError, ValueError):
            return default

    def get_optional_float(self, key: str) -> float | None:
        raw = self.store.value(key, None)
        try:
            return None if raw in (None, "") else float(raw)
        except (TypeError, ValueError):
            return None

    def get_list(self, key: str) -> list[str]:
        raw = self.store.value(key, None)
        if raw is None or raw == "":
            return []
        return [str(v) for v in raw] if isinstance(raw, (list, tuple)) else [str(raw)]

    def set(self, key: str, value: object) -> None:
        self.store.setValue(key, "" if value is None else value)

    def get_bytes(self, key: str) -> QByteArray | None:
        raw = self.store.value(key, None)
        return raw if isinstance(raw, QByteArray) else None

    def recent(self) -> list[str]:
        return self.get_list("recent/paths")

    def add_recent(self, path: Path) -> None:
        text = str(Path(path).resolve())
        items = [text] + [p for p in self.recent() if p != text]
        self.set("recent/paths", items[:MAX_RECENT])

    def clear_recent(self) -> None:
        self.set("recent/paths", [])

    def sync(self) -> None:
        self.store.sync()
