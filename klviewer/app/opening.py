"""Opening studies in the main window: files and folders, drag and drop, the demo study."""

from __future__ import annotations

import traceback
from pathlib import Path

from PySide6.QtGui import QDragEnterEvent, QDropEvent

from klviewer.app.menus import fill_recent
from klviewer.errors import KlviewerError
from klviewer.io.loader import open_paths


class OpeningMixin:
    """The main window's ways in; it provides notifier, prefs, model, browser, viewer and show_series."""

    def open_demo(self) -> bool:
        from klviewer.demo import ensure_demo_study

        self.statusBar().showMessage("Preparing the demo study…")
        try:
            folder = ensure_demo_study()
        except (OSError, KlviewerError) as exc:
            self.notifier.error("Cannot create the demo study", str(exc))
            return False
        opened = self.open_paths([folder], remember=False)
        if opened:
            self.statusBar().showMessage("Demo study opened: a phantom abdomen, 4 healthy slices and 4 with lesions.", 8_000)
        return opened

    def open_paths(self, paths: list[Path], remember: bool = True) -> bool:
        """Open files/folders; every problem becomes a message, never an exception."""
        try:
            catalog = open_paths(paths)
        except KlviewerError as exc:
            self.notifier.error("Cannot open", str(exc))
            return False
        except Exception as exc:  # a reader bug must not close the app with the user's other studies
            self.notifier.error("Cannot open", f"{type(exc).__name__}: {exc}", traceback.format_exc())
            return False
        names = ", ".join(p.name or str(p) for p in paths)
        skipped = "\n".join(f"{s.path}: {s.reason}" for s in catalog.skipped)
        if not catalog.all_series():
            first = catalog.skipped[0].reason if catalog.skipped else "no files"
            self.notifier.error("No images found", f"Nothing in {names} could be loaded ({first}).", skipped)
            return False
        if remember:
            for path in paths:
                self.prefs.add_recent(path)
            fill_recent(self)
        added = self.model.register(catalog)
        self.browser.add_patients(catalog.patients)
        if catalog.skipped:
            self.notifier.warning("Some files were skipped",
                                  f"{len(catalog.skipped)} file(s) in {names} could not be read; see details.", skipped)
        first_uid = added[0] if added else catalog.all_series()[0].uid
        self.browser.select_series(first_uid)
        self.show_series(first_uid)
        self.viewer.setFocus()
        if not catalog.skipped:  # replaces "Preparing the demo study…" and the like
            self.statusBar().showMessage(f"Opened {names}.", 5_000)
        return True

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802
        paths = [Path(url.toLocalFile()) for url in event.mimeData().urls() if url.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self.open_paths(paths)

