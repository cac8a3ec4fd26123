"""The app as a user sees it, in a real window: screenshots of each state and the layout facts Qt can tell.

Run under an X server whose screen has the size to check, with fresh settings, e.g.

    xvfb-run -a -s "-screen 0 1366x768x24" python -m klviewer.app.screen_check --out docs/screenshots

(`make screenshots` does both sizes). Each step saves `<W>x<H>-<step>.png`, a grab of the whole
screen, so what lies off screen is missing from the picture as it would be for the user; and
`<W>x<H>-layout.json` lists the layout problems found after each step (see layout_check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QEventLoop, QTimer
from PySide6.QtWidgets import QApplication

from klviewer.app.launch import analyse_and_wait, application
from klviewer.app.layout_check import layout_problems
from klviewer.app.main_window import MainWindow
from klviewer.app.settings import SETTINGS_ENV, Preferences, open_settings
from klviewer.inference.scoring import MISMATCH


def settle(app: QApplication, ms: int = 300) -> None:
    """Let the window map, lay out and paint (an X server answers asynchronously)."""
    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()
    app.processEvents()


def _start(w: MainWindow) -> bool:
    return w.open_demo()


def _analysis(w: MainWindow) -> bool:
    return analyse_and_wait(w)


def _z_view(w: MainWindow) -> bool:
    w.map_controls.show_z.setChecked(True)
    w.refresh_overlay()
    return w.viewer.overlay.frame is not None and w.viewer.overlay.frame.shows_z


def _side_by_side(w: MainWindow) -> bool:
    w.map_controls.show_z.setChecked(False)
    w.viewer.set_comparing(True)
    return w.viewer.comparing


def _export_dialog(w: MainWindow) -> bool:
    w.viewer.set_comparing(False)
    dialog = w.open_export_dialog()
    dialog.move(w.frameGeometry().center() - dialog.rect().center())
    return dialog.isVisible()


def _mismatch_banner(w: MainWindow) -> bool:
    """A real head-and-neck CT slice (pydicom's CT_small) against the abdomen phantom prior: the prior-fit
    banner says the prior does not describe it, where the prior has a prior-fit threshold for the settings."""
    from pydicom.data import get_testdata_file

    w.export_dialog.close()
    if not w.open_paths([Path(get_testdata_file("CT_small.dcm"))], remember=False) or not analyse_and_wait(w):
        return False
    cached = w.current_result()
    return w.banner.isVisible() and cached is not None and cached.result.verdict().status == MISMATCH


STEPS: list[tuple[str, Callable[[MainWindow], bool]]] = [
    ("start", _start),
    ("analysis", _analysis),
    ("z-view", _z_view),
    ("side-by-side", _side_by_side),
    ("export-dialog", _export_dialog),
    ("mismatch-banner", _mismatch_banner),
]
"""Each step's name and action (True: it showed the state it is named for; the screenshot is taken either way)."""


def run(out: Path, prior: Path | None, steps: int | None) -> dict:
    """Take every step's screenshot into `out`; returns the report that is also written as JSON."""
    app = application()
    screen = app.primaryScreen()
    size = f"{screen.geometry().width()}x{screen.geometry().height()}"
    w = MainWindow(Preferences(open_settings()))
    w.notifier.show_dialogs = False
    if prior is not None:
        w.panel.add_prior_folder(prior)
    if steps is not None:
        w.panel.steps.setValue(steps)
    w.show()
    settle(app)
    report: dict = {"screen": size, "available": list(screen.availableGeometry().getRect()), "steps": []}
    for name, action in STEPS:
        ok = action(w)
        settle(app)
        path = out / f"{size}-{name}.png"
        screen.grabWindow(0).save(str(path))
        report["steps"].append({"step": name, "ok": ok, "screenshot": path.name,
                                "window": list(w.frameGeometry().getRect()), "problems": layout_problems(w)})
    report["messages"] = [f"{m.level}: {m.title}: {m.text}" for m in w.notifier.history]
    (out / f"{size}-layout.json").write_text(json.dumps(report, indent=2) + "\n")
    w.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the screenshots and the layout report")
    parser.add_argument("--prior", type=Path, help="prior folder (default: the shipped prior)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the app's)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="klviewer-screens-") as fresh:
        os.environ[SETTINGS_ENV] = str(Path(fresh) / "klviewer.ini")  # fresh settings, as a new user has
        report = run(args.out, args.prior, args.steps)
    problems = [f"{s['step']}: {p}" for s in report["steps"] for p in s["problems"]]
    for line in problems:
        print(line, file=sys.stderr)
    for s in report["steps"]:
        if not s["ok"]:
            print(f"note: {s['step']} did not show its state (see {s['screenshot']})", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
