"""Save and reopen a session: the open studies, their results, flags, notes, measurements and view settings.

A session is one folder, `NAME.klvsession/`:
    session.json   what was open and where the viewer was: source files of every open series, the shown
                   slice, map sliders, window/level, flags set by hand, notes, measurements (JSON)
    results/       the session's results in the `klviewer analyze` results-folder contract
                   (klviewer.results: summary.json + one npz per slice, read with allow_pickle=False)

Nothing is unpickled. Saving writes a complete new folder and then swaps it in, so a failed save
leaves the previous session intact; it never writes into a folder that holds the studies.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtWidgets import QFileDialog, QMessageBox

from klviewer.app.display import MapSettings, WindowLevel
from klviewer.app.measurements import Measurement
from klviewer.app.session import run_of
from klviewer.app.session_results import write_session_results
from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.io.safe_write import atomic_write_text, check_output_folder
from klviewer.results.reader import read_results
from klviewer.results.slice_file import load_slice_result

if TYPE_CHECKING:
    from klviewer.app.main_window import MainWindow

SESSION_FILE = "session.json"
SESSION_SUFFIX = ".klvsession"
FORMAT = "klviewer-session"
VERSION = 1


def session_document(w: MainWindow) -> dict[str, Any]:
    """What session.json holds (without the results, which go to results/)."""
    m = w.map_controls.settings()
    viewer = w.viewer
    return {
        "format": FORMAT, "version": VERSION,
        "series": [{"uid": uid, "files": [str(Path(f).resolve()) for f in entry.series.files]}
                   for uid, entry in w.series.items()],
        "current": {"series_uid": w.current_uid, "slice_index": w.index},
        "view": {"patch": m.patch, "sigma_window": list(m.sigma_window), "threshold_fraction": m.threshold_fraction,
                 "opacity": m.opacity, "show_z": m.show_z, "overlay": viewer.overlay.visible,
                 "window": [viewer.window.width, viewer.window.level], "inverted": viewer.inverted,
                 "base": viewer.base_kind},
        "cases": [{"series_uid": e.series_uid, "slice_index": e.slice_index, "manual_flag": e.manual_flag,
                   "note": e.note} for e in w.cases.entries],
        "measurements": [m.to_dict() for m in w.model.measurements],
    }


def save_session(w: MainWindow, folder: Path) -> Path:
    """Write the session into `folder` (replacing a session saved there before); returns the folder."""
    folder = Path(folder)
    if folder.suffix != SESSION_SUFFIX:
        folder = folder.with_name(folder.name + SESSION_SUFFIX)
    if folder.exists() and not (folder / SESSION_FILE).is_file():
        raise KlviewerInputError(folder, "exists and is not a saved session; choose another name")
    check_output_folder(folder, [f for entry in w.series.values() for f in entry.series.files[:1]])
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        snapshot = w.session_snapshot()
        if snapshot.slices:
            write_session_results(snapshot.slices, staging / "results", snapshot.map_settings)
        atomic_write_text(staging / SESSION_FILE, json.dumps(session_document(w), indent=2) + "\n")
        _swap_in(staging, folder)
        w.model.saved_handwork = handwork(w)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _swap_in(staging: Path, folder: Path) -> None:
    if not folder.exists():
        os.rename(staging, folder)
        return
    old = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.old")
    os.rename(folder, old)
    os.rename(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


def read_session(folder: Path) -> dict[str, Any]:
    """session.json, checked; every refusal names the file."""
    path = Path(folder) / SESSION_FILE
    if not path.is_file():
        raise KlviewerInputError(Path(folder), f"is not a saved klviewer session (no {SESSION_FILE})")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KlviewerInputError(path, f"is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KlviewerInputError(path, "is not a klviewer session file")
    if doc.get("version") != VERSION:
        raise KlviewerInputError(path, f"session version {doc.get('version')!r}; this klviewer reads version {VERSION}")
    for key, kind in (("series", list), ("current", dict), ("view", dict), ("cases", list), ("measurements", list)):
        if not isinstance(doc.get(key), kind):
            raise KlviewerInputError(path, f"'{key}' is missing or not a {kind.__name__}")
    return doc


def open_session(w: MainWindow, folder: Path) -> bool:
    """Reopen a saved session in `w` (whose open studies stay open); False, with a message, when it cannot."""
    folder = Path(folder)
    try:
        doc = read_session(folder)
        files = [Path(f) for s in doc["series"] for f in s.get("files", [])]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise KlviewerInputError(missing[0], f"a study of this session is gone ({len(missing)} file(s) missing)")
        if files and not w.open_paths(files, remember=False):
            return False
        results = folder / "results"
        if results.is_dir():
            _load_results(w, results)
        _restore_cases(w, doc)
        for item in doc["measurements"]:
            measurement = Measurement.from_dict(item)
            w.model.measurements.append(measurement)
            w.tools_view.measure.draw(measurement)
    except (KlviewerError, OSError, ValueError, KeyError, TypeError) as exc:
        w.notifier.error("Cannot open the session", f"{folder}: {exc}")
        return False
    _restore_view(w, doc)
    w.model.saved_handwork = handwork(w)
    w.statusBar().showMessage(f"Session {folder.name} opened.", 5_000)
    return True


def _load_results(w: MainWindow, results: Path) -> None:
    folders = [results] if (results / "summary.json").is_file() else sorted(p for p in results.iterdir() if p.is_dir())
    settings = w.map_controls.settings()
    for path in folders:
        folder = read_results(path)
        prior_path = Path(str(folder.prior.get("path", "")))
        for case in folder.cases:
            for entry in case.slices:
                if entry.series_uid in w.series:
                    result = load_slice_result(entry.file)
                    run_settings, escalation = run_of(result)  # keyed by the run that made it, as when it was made
                    w.model.add_result(entry.series_uid, entry.slice_index, prior_path, run_settings, result, settings,
                                       escalation)


def _restore_cases(w: MainWindow, doc: dict[str, Any]) -> None:
    for item in doc["cases"]:
        row = w.cases.find(str(item["series_uid"]), int(item["slice_index"]))
        if row is None:
            continue
        if item.get("manual_flag") is not None:
            w.cases.set_manual_flag(row, bool(item["manual_flag"]))
        if item.get("note"):
            w.cases.set_note(row, str(item["note"]))


def _restore_view(w: MainWindow, doc: dict[str, Any]) -> None:
    view = doc["view"]
    try:
        m = replace(MapSettings(), patch=int(view["patch"]), sigma_window=tuple(float(v) for v in view["sigma_window"]),
                    threshold_fraction=float(view["threshold_fraction"]), opacity=float(view["opacity"]),
                    show_z=bool(view["show_z"]))
        window = WindowLevel(float(view["window"][0]), float(view["window"][1]))
    except (KeyError, TypeError, ValueError, IndexError):
        m, window = None, None  # view settings are a convenience: the data is already back
    if m is not None:
        w.map_controls.set_settings(m)
    current = doc["current"]
    uid = current.get("series_uid")
    if uid in w.series:
        w.show_series(uid, int(current.get("slice_index") or 0))
    if window is not None:
        w.viewer.set_base(str(view.get("base", "original")))
        w.viewer.set_window(window)
        if bool(view.get("inverted")) != w.viewer.inverted:
            w.viewer.toggle_invert()
        w.viewer.set_overlay_visible(bool(view.get("overlay", True)))
    w.rescore_cases()
    w.refresh_overlay()


def handwork(w: MainWindow) -> str:
    """What only the user made in this session (flags set by hand, notes, measurements), as comparable text."""
    doc = session_document(w)
    return json.dumps([[c for c in doc["cases"] if c["manual_flag"] is not None or c["note"]], doc["measurements"]])


def unsaved_handwork(w: MainWindow) -> bool:
    """Flags, notes or measurements made since the session was last saved or opened (none: nothing to lose)."""
    now = handwork(w)
    return now not in (w.model.saved_handwork, handwork_of_nothing())


def handwork_of_nothing() -> str:
    return json.dumps([[], []])


def confirm_close(w: MainWindow) -> bool:
    """Before the window closes: offer to save flags, notes and measurements that would be lost. False: stay open."""
    if not w.notifier.show_dialogs or not unsaved_handwork(w):
        return True
    answer = QMessageBox.question(
        w, "Save the session?", "Flags set by hand, notes or measurements of this session are not saved. "
        "Save the session before closing?",
        QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard | QMessageBox.StandardButton.Cancel)
    if answer == QMessageBox.StandardButton.Cancel:
        return False
    if answer == QMessageBox.StandardButton.Save:
        return save_session_dialog(w)
    return True


def save_session_dialog(w: MainWindow) -> bool:
    path, _ = QFileDialog.getSaveFileName(w, "Save session", w.prefs.get("session/last", "session" + SESSION_SUFFIX),
                                          f"klviewer session (*{SESSION_SUFFIX})")
    if not path:
        return False
    try:
        folder = save_session(w, Path(path))
    except (KlviewerError, OSError) as exc:
        w.notifier.error("Cannot save the session", str(exc))
        return False
    w.prefs.set("session/last", str(folder))
    w.statusBar().showMessage(f"Session saved to {folder}.", 5_000)
    return True


def open_session_dialog(w: MainWindow) -> None:
    folder = QFileDialog.getExistingDirectory(w, "Open session (a .klvsession folder)", w.prefs.get("session/last", ""))
    if folder:
        w.prefs.set("session/last", folder)
        open_session(w, Path(folder))
