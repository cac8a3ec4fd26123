"""File → Export flagged…: export this session's results or a results folder, in the background.

Options map one to one onto `klviewer export` (flagged only / all, formats, de-identify,
overwrite, flag threshold). When it is done the dialog lists every case: where it was
written, what was skipped and why, and which cases failed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QEvent, Qt
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QDialog,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from klviewer.app.export_job import ExportRequest, ExportSummary, SessionSnapshot, run_export
from klviewer.app.messages import Notifier
from klviewer.app.settings import Preferences
from klviewer.app.task_progress import TaskProgress
from klviewer.app.task_worker import JobContext, TaskSlot

FORMATS = {"dicom": "DICOM (parametric map, segmentation, secondary capture)", "png": "PNG overlays",
           "pdf": "PDF report", "csv": "cases.csv / cases.json"}
REPORT_COLUMNS = ("Case", "Result", "Files", "Skipped / error")
FAILED_COLOR = "#ff8a70"


class ExportDialog(QDialog):
    def __init__(self, prefs: Preferences, notifier: Notifier, session: Callable[[], SessionSnapshot],
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Export flagged cases")
        self.setModal(False)
        self._prefs = prefs
        self._notifier = notifier
        self._session = session
        self.summary: ExportSummary | None = None
        self.slot = TaskSlot(self)
        self.slot.succeeded.connect(self.show_summary)
        self.slot.failed.connect(self._failed)
        self.slot.cancelled.connect(lambda: notifier.status("Export cancelled", "finished case folders and their tables are kept"))
        self.slot.finished.connect(lambda _ok: self.export_button.setEnabled(True))

        self.from_session = QRadioButton()
        self.from_folder = QRadioButton("Results folder")
        source_group = QButtonGroup(self)
        source_group.addButton(self.from_session)
        source_group.addButton(self.from_folder)
        self.from_session.setChecked(True)
        self.results_dir = QLineEdit(prefs.get("export/results_dir", ""))
        self.results_dir.setPlaceholderText("a folder written by klviewer analyze or batch")
        browse_results = QToolButton(text="Browse…")
        browse_results.clicked.connect(self._browse_results)
        self.out = QLineEdit(prefs.get("export/out", ""))
        self.out.setPlaceholderText("one folder per case goes here")
        browse_out = QToolButton(text="Browse…")
        browse_out.clicked.connect(self._browse_out)

        self.flagged_only = QRadioButton("Flagged cases only")
        self.all_cases = QRadioButton("All cases")
        which = QButtonGroup(self)
        which.addButton(self.flagged_only)
        which.addButton(self.all_cases)
        (self.flagged_only if prefs.get("export/flagged_only", True) else self.all_cases).setChecked(True)
        self.formats: dict[str, QCheckBox] = {}
        stored = set(prefs.get_list("export/formats")) or set(FORMATS)
        for key, label in FORMATS.items():
            box = QCheckBox(label)
            box.setChecked(key in stored)
            self.formats[key] = box
        self.deidentify = QCheckBox("De-identify DICOM (patient name / ID / dates replaced, consistently per patient)")
        self.deidentify.setChecked(prefs.get("export/deidentify", False))
        self.overwrite = QCheckBox("Overwrite existing case folders and tables")
        self.use_threshold = QCheckBox("Flag threshold (nats)")
        self.use_threshold.setToolTip("Flag a case when any of its slices scores above this; otherwise the "
                                      "analysis' own flags are used")
        self.threshold = QDoubleSpinBox()
        self.threshold.setDecimals(3)
        self.threshold.setRange(0.001, 1e9)
        self.threshold.setValue(prefs.get("export/threshold", 100.0))
        self.use_threshold.toggled.connect(self._sync)
        self.from_session.toggled.connect(self._sync)

        self.export_button = QPushButton("Export")
        self.export_button.setDefault(True)
        self.export_button.clicked.connect(self.start)
        close = QPushButton("Close")
        close.clicked.connect(self.hide)
        self.progress = TaskProgress(self.slot)
        self.result_label = QLabel()
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.table = QTableWidget(0, len(REPORT_COLUMNS))
        self.table.setHorizontalHeaderLabels(REPORT_COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)

        results_row = QHBoxLayout()
        results_row.addWidget(self.from_folder)
        results_row.addWidget(self.results_dir, 1)
        results_row.addWidget(browse_results)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out, 1)
        out_row.addWidget(browse_out)
        which_row = QHBoxLayout()
        which_row.addWidget(self.flagged_only)
        which_row.addWidget(self.all_cases)
        which_row.addStretch(1)
        threshold_row = QHBoxLayout()
        threshold_row.addWidget(self.use_threshold)
        threshold_row.addWidget(self.threshold)
        threshold_row.addStretch(1)
        form = QFormLayout()
        form.addRow("Export", self.from_session)
        form.addRow("", results_row)
        form.addRow("To folder", out_row)
        form.addRow("Cases", which_row)
        form.addRow("", threshold_row)
        for n, box in enumerate(self.formats.values()):
            form.addRow("Formats" if n == 0 else "", box)
        form.addRow("", self.deidentify)
        form.addRow("", self.overwrite)
        buttons = QHBoxLayout()
        buttons.addWidget(self.export_button)
        buttons.addStretch(1)
        buttons.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.progress)
        layout.addWidget(self.result_label)
        layout.addWidget(self.table, 1)
        layout.addLayout(buttons)
        self.resize(720, 640)
        self.refresh_session()

    # ----- fields ---------------------------------------------------------------------------

    def refresh_session(self) -> None:
        """Describe what "this session" holds; with nothing analysed, default to a results folder."""
        snapshot = self._session()
        n, flagged = len(snapshot.slices), snapshot.n_flagged
        self.from_session.setText(f"This session's results ({n} analysed slice(s), {flagged} flagged)")
        self.from_session.setEnabled(n > 0)
        if n == 0:
            self.from_folder.setChecked(True)
        self._sync()

    def changeEvent(self, event: QEvent) -> None:  # noqa: N802
        # The case list changes while the dialog is open (new slices, flags set by hand).
        if event.type() == QEvent.Type.ActivationChange and self.isActiveWindow() and not self.slot.running:
            self.refresh_session()
        super().changeEvent(event)

    def _sync(self) -> None:
        session = self.from_session.isChecked()
        # In the session the case list's flags (automatic or by hand) decide; a results folder
        # may have no calibrated flags at all, so it can take a threshold.
        self.use_threshold.setEnabled(not session)
        self.threshold.setEnabled(not session and self.use_threshold.isChecked())
        self.results_dir.setEnabled(not session)

    def _browse_results(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Results folder to export", self.results_dir.text())
        if folder:
            self.results_dir.setText(folder)
            self.from_folder.setChecked(True)

    def _browse_out(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export into folder", self.out.text())
        if folder:
            self.out.setText(folder)

    def chosen_formats(self) -> tuple[str, ...]:
        return tuple(key for key, box in self.formats.items() if box.isChecked())

    def save(self) -> None:
        p = self._prefs
        p.set("export/results_dir", self.results_dir.text())
        p.set("export/out", self.out.text())
        p.set("export/flagged_only", self.flagged_only.isChecked())
        p.set("export/formats", list(self.chosen_formats()))
        p.set("export/deidentify", self.deidentify.isChecked())
        p.set("export/threshold", self.threshold.value())

    # ----- running --------------------------------------------------------------------------

    def request(self) -> ExportRequest | None:
        """The export the fields describe, or None (with a message saying why) when it cannot run."""
        out_text = self.out.text().strip()
        if not out_text:
            self._notifier.error("No export folder", "Choose the folder to export into.")
            return None
        formats = self.chosen_formats()
        if not formats:
            self._notifier.error("No format", "Tick at least one format to export.")
            return None
        common = dict(out=Path(out_text).expanduser(), flagged_only=self.flagged_only.isChecked(), formats=formats,
                      deidentify=self.deidentify.isChecked(), overwrite=self.overwrite.isChecked())
        if self.from_session.isChecked():
            snapshot = self._session()
            if not snapshot.slices:
                self._notifier.error("Nothing to export", "No slice has been analysed in this session.")
                return None
            if self.flagged_only.isChecked() and snapshot.n_flagged == 0:
                self._notifier.error("No flagged cases", "No analysed slice is flagged: flag cases in the case list, "
                                                         "or choose 'All cases'.")
                return None
            return ExportRequest(session=snapshot, **common)
        folder = self.results_dir.text().strip()
        if not folder:
            self._notifier.error("No results folder", "Choose a results folder, or export this session's results.")
            return None
        threshold = self.threshold.value() if self.use_threshold.isChecked() else None
        return ExportRequest(results_dir=Path(folder).expanduser(), flag_threshold=threshold, **common)

    def start(self) -> bool:
        if self.slot.running:
            self._notifier.info("Export already running", "Wait for it to finish or cancel it first.")
            return False
        request = self.request()
        if request is None:
            return False
        self.save()

        def job(ctx: JobContext) -> ExportSummary:
            return run_export(request, ctx.report, ctx.cancel)

        self.table.setRowCount(0)
        self.result_label.setText("")
        self.export_button.setEnabled(False)
        return self.slot.start(job)

    def _failed(self, message: str, details: str) -> None:
        self.result_label.setText(f"Export stopped: {message}")
        self._notifier.error("Export failed", message, details)

    def show_summary(self, summary: ExportSummary) -> None:
        self.summary = summary
        cases, failed = summary.cases, summary.failed
        if not cases:
            self.result_label.setText("No case matched: nothing was written.")
            self._notifier.warning("Nothing exported", "No case matched the selection (flagged only?).")
            return
        written = len(cases) - len(failed)
        tables = ", ".join(p.name for p in summary.table_files) or "no tables"
        self.result_label.setText(f"Wrote {written} case folder(s) and {tables} to {summary.out}"
                                  + (f"; <b>{len(failed)} failed</b>" if failed else "") + ".")
        self.table.setRowCount(len(cases))
        for row, case in enumerate(cases):
            result = "failed" if case.error else str(case.folder)
            notes = case.error or "; ".join([*case.skipped, *case.notes])
            for col, text in enumerate((case.case, result, str(len(case.files)), notes)):
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                if case.error and col == 1:
                    item.setForeground(QBrush(QColor(FAILED_COLOR)))
                self.table.setItem(row, col, item)
        if summary.refused:
            self._notifier.error("Some results were not exported", f"{len(summary.refused)} prior(s) refused.",
                                 "\n".join(summary.refused))
        if failed:
            names = ", ".join(c.case for c in failed)
            self._notifier.error("Some cases failed", f"{len(failed)} case(s) could not be written: {names}.",
                                 "\n".join(f"{c.case}: {c.error}" for c in failed))
        else:
            self._notifier.status("Export finished", f"{written} case(s) written to {summary.out}")
