"""Help dialogs: keyboard shortcuts and About. Both are non-modal, like every dialog of the app."""

from __future__ import annotations

import platform

import pyqtgraph as pg
import PySide6
import torch
from PySide6.QtCore import Qt, qVersion
from PySide6.QtWidgets import QMessageBox, QWidget

from klviewer import __version__
from klviewer.app.display import PRESETS

MOUSE = (
    ("Left drag", "window / level (horizontal: width, vertical: level)"),
    ("Wheel", "previous / next slice"),
    ("Right drag", "zoom"),
    ("Ctrl + wheel", "zoom"),
    ("Middle drag", "pan"),
)
KEYS = (
    ("Up / PgUp", "previous slice"),
    ("Down / PgDn", "next slice"),
    *((str(n), f"{p.name} window ({p.window.width:.0f} / {p.window.level:.0f})") for n, p in enumerate(PRESETS, 1)),
    ("o", "KL overlay on / off"),
    ("i", "invert grey scale"),
    ("r", "reset zoom and pan"),
    ("c", "cine: play / pause the slices"),
    ("t", "DICOM tags of this slice"),
    ("Ctrl+O", "open file"),
    ("Ctrl+Shift+O", "open folder"),
    ("Ctrl+R", "run the analysis on this slice"),
    ("Ctrl+E", "export flagged cases"),
    ("Ctrl+S", "save the session (studies, results, flags, notes, measurements, view)"),
    ("Esc", "cancel the running analysis"),
)


def shortcuts_html() -> str:
    def table(title: str, rows: tuple[tuple[str, str], ...]) -> str:
        body = "".join(f"<tr><td><b>{k}</b>&nbsp;&nbsp;</td><td>{v}</td></tr>" for k, v in rows)
        return f"<h3>{title}</h3><table>{body}</table>"

    return table("Mouse (on the image)", MOUSE) + table("Keys", KEYS)


def about_html(device: str, prior: str) -> str:
    return (
        f"<h2>klviewer {__version__}</h2>"
        "<p>Shows where a CT slice lies outside a diffusion prior's distribution: the KL divergence "
        "between prior and posterior, accumulated during posterior sampling and localised to patches (KLIP).</p>"
        "<table>"
        f"<tr><td>Prior&nbsp;&nbsp;</td><td>{prior}</td></tr>"
        f"<tr><td>Device</td><td>{device}</td></tr>"
        f"<tr><td>torch</td><td>{torch.__version__}</td></tr>"
        f"<tr><td>Qt</td><td>{qVersion()} (PySide6 {PySide6.__version__})</td></tr>"
        f"<tr><td>pyqtgraph</td><td>{pg.__version__}</td></tr>"
        f"<tr><td>Python</td><td>{platform.python_version()}</td></tr>"
        "</table>"
    )


def show_html(parent: QWidget, title: str, html: str) -> QMessageBox:
    box = QMessageBox(QMessageBox.Icon.NoIcon, title, html, QMessageBox.StandardButton.Close, parent)
    box.setTextFormat(Qt.TextFormat.RichText)
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    box.setWindowModality(Qt.WindowModality.NonModal)
    box.show()
    return box
