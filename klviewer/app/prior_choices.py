"""The priors a picker offers: the installed ones, then the folders the user added (remembered)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox

from klviewer.app.settings import Preferences
from klviewer.priors.checkpoint import list_priors, priors_dir

USER_PRIORS_KEY = "priors/user"
"""The same list the analysis panel's "Add…" button remembers."""


@dataclass(frozen=True)
class PriorChoice:
    label: str
    path: Path


def known_priors(prefs: Preferences) -> list[PriorChoice]:
    choices = [PriorChoice(name, priors_dir() / name) for name in list_priors()]
    seen = {str(c.path) for c in choices}
    for folder in prefs.get_list(USER_PRIORS_KEY):
        if folder not in seen:
            seen.add(folder)
            choices.append(PriorChoice(f"{Path(folder).name} (added)", Path(folder)))
    return choices


def fill_combo(combo: QComboBox, choices: list[PriorChoice], keep: Path | None = None, none_label: str | None = None) -> None:
    """Refill `combo`, keeping `keep` (or the current choice) selected when it is still offered."""
    wanted = str(keep) if keep is not None else combo.currentData()
    combo.blockSignals(True)
    combo.clear()
    if none_label is not None:
        combo.addItem(none_label, "")
    for choice in choices:
        combo.addItem(choice.label, str(choice.path))
        combo.setItemData(combo.count() - 1, str(choice.path), Qt.ItemDataRole.ToolTipRole)
    row = combo.findData(wanted) if wanted is not None else -1
    combo.setCurrentIndex(max(row, 0))
    combo.blockSignals(False)


def chosen_path(combo: QComboBox) -> Path | None:
    data = combo.currentData()
    return Path(data) if data else None
