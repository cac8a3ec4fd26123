"""File → Export flagged…: this session's results (as the case list shows them) or a results folder."""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import Qt
from test_app_compare_support import message_titles, other_prior, wait_for_slot  # noqa: F401
from test_app_support import FAST_STEPS, isolated_settings, run_and_wait, window  # noqa: F401

from klviewer.app.case_list import FLAG_COLUMN, NOTE_COLUMN
from klviewer.app.display import MapSettings
from klviewer.app.export_job import staging_parent
from klviewer.app.session_results import write_session_results
from klviewer.errors import KlviewerError
from klviewer.results.reader import read_results
from klviewer.results.slice_file import load_slice_result


@pytest.fixture()
def staged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temporary folder for the session's staged results, to check it is cleaned up."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _analyse_two_slices(window, qtbot) -> None:
    """Slices 3 and 4 of the demo: slice 3 flagged by hand with a note, slice 4 left unflagged."""
    for index in (3, 4):
        window.set_slice(index)
        assert run_and_wait(qtbot, window) == [True]
    model = window.case_view.model
    row = window.cases.find(window.current_uid, 3)
    check = Qt.ItemDataRole.CheckStateRole
    assert model.setData(model.index(row, FLAG_COLUMN), Qt.CheckState.Checked.value, check)
    assert model.setData(model.index(row, NOTE_COLUMN), "hypodense focus?", Qt.ItemDataRole.EditRole)
    other = window.cases.find(window.current_uid, 4)
    assert model.setData(model.index(other, FLAG_COLUMN), Qt.CheckState.Unchecked.value, check)
    assert [e.flagged for e in window.cases.entries] == [True, False]


def _export_dialog(window, out: Path, formats: tuple[str, ...]):
    dialog = window.open_export_dialog()
    dialog.out.setText(str(out))
    for key, box in dialog.formats.items():
        box.setChecked(key in formats)
    return dialog


def test_session_export_writes_the_flagged_case_with_its_note(window, qtbot, tmp_path, staged) -> None:
    _analyse_two_slices(window, qtbot)
    out = tmp_path / "export"
    dialog = _export_dialog(window, out, ("dicom", "png", "csv"))
    assert dialog.from_session.isChecked() and "2 analysed slice(s), 1 flagged" in dialog.from_session.text()
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [True]
    summary = dialog.summary
    assert len(summary.cases) == 1 and not summary.failed
    case = summary.cases[0]
    assert case.folder == out / case.case and case.folder.is_dir()
    assert case.files and all(f.is_file() for f in case.files)
    assert any(f.suffix == ".dcm" for f in case.files), "the demo is DICOM, so DICOM objects are exported"
    assert any(f.suffix == ".png" for f in case.files)
    with open(out / "cases.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and any("hypodense focus?" in value for value in rows[0].values())
    assert dialog.table.rowCount() == 1 and dialog.table.item(0, 0).text() == case.case
    assert str(out) in dialog.result_label.text()
    assert dialog.progress.reported == (1, 1)
    assert list(staged.iterdir()) == [], "the staged session results are removed"
    assert message_titles(window)[-1] == "Export finished"


def test_session_results_are_written_as_the_app_shows_them(window, qtbot, tmp_path) -> None:
    _analyse_two_slices(window, qtbot)
    window.map_controls.patch.setValue(4)
    snapshot = window.session_snapshot()
    assert snapshot.map_settings.patch == 4 and snapshot.n_flagged == 1
    (folder,) = write_session_results(snapshot.slices, tmp_path / "results", snapshot.map_settings)
    results = read_results(folder.path)  # the exporter's own reader accepts it
    (case,) = results.cases
    assert [s.slice_index for s in case.slices] == [3, 4] and [s.flagged for s in case.slices] == [True, False]
    assert folder.notes == {case.name: "slice 3: hypodense focus?"}
    summary = json.loads((folder.path / "summary.json").read_text())
    assert summary["prior"]["name"] == "tiny-test" and summary["settings"]["patch"] == 4
    first = load_slice_result(case.slices[0].file)
    shown = window.results.latest(window.current_uid, 3).result
    assert first.kl_map.patch == 4 and first.score == pytest.approx(shown.energy.kl_map(4, (0.01, 0.5)).score)
    assert np.array_equal(first.recon_hu, shown.recon_hu)
    assert case.slices[0].source_kind == "dicom" and case.slices[0].sop_instance_uid


def test_results_of_two_priors_go_to_two_folders(window, qtbot, tmp_path, other_prior) -> None:  # noqa: F811
    window.set_slice(3)
    assert run_and_wait(qtbot, window) == [True]
    (item,) = window.session_snapshot().slices
    twin = replace(item, prior_path=other_prior)
    folders = write_session_results([item, twin], tmp_path / "results", MapSettings())
    assert [f.path.name for f in folders] == ["01-tiny-test", "02-tiny-other"]
    for folder, prior in zip(folders, ("tiny-test", "tiny-other")):
        assert read_results(folder.path).prior["name"] == prior


def test_folder_export_of_all_cases(window, qtbot, tiny_prior, tmp_path) -> None:
    from klviewer.demo import ensure_demo_study
    from klviewer.inference.settings import AnalysisSettings
    from klviewer.results.analyze import run_analysis

    results = tmp_path / "results"
    run_analysis([ensure_demo_study()], results, AnalysisSettings(steps=FAST_STEPS, device="cpu"), prior=tiny_prior,
                 slices="0")
    dialog = _export_dialog(window, tmp_path / "export", ("png",))
    dialog.from_folder.setChecked(True)
    dialog.results_dir.setText(str(results))
    dialog.all_cases.setChecked(True)
    assert dialog.results_dir.isEnabled() and dialog.use_threshold.isEnabled(), "a folder may take a threshold"
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [True]
    (case,) = dialog.summary.cases
    assert case.error is None and all(f.suffix == ".png" and f.is_file() for f in case.files)
    assert not (tmp_path / "export" / "cases.csv").exists(), "csv was not asked for"


def test_skipped_parts_and_failed_cases_are_listed_with_their_reasons(window, qtbot, tiny_prior, tmp_path,
                                                                     monkeypatch) -> None:
    import klviewer.export.exporter as exporter
    from klviewer.inference.settings import AnalysisSettings
    from klviewer.phantoms import make_phantom
    from klviewer.results.analyze import run_analysis

    source = tmp_path / "arrays"
    source.mkdir()
    np.save(source / "slice.npy", make_phantom("healthy", 64, 0).hu)
    results = tmp_path / "results"
    run_analysis([source / "slice.npy"], results, AnalysisSettings(steps=FAST_STEPS, device="cpu"), prior=tiny_prior)
    dialog = _export_dialog(window, tmp_path / "export", ("dicom", "png"))
    dialog.from_folder.setChecked(True)
    dialog.results_dir.setText(str(results))
    dialog.all_cases.setChecked(True)
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [True]
    (case,) = dialog.summary.cases
    assert case.error is None and case.skipped and case.skipped[0].startswith("dicom")
    assert dialog.table.item(0, 3).text() == "; ".join(case.skipped), "why DICOM was skipped for an array input"

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporter, "_write_case", full_disk)
    dialog.out.setText(str(tmp_path / "export-2"))
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [True]
    (failed,) = dialog.summary.failed
    assert dialog.table.item(0, 1).text() == "failed" and "No space left" in dialog.table.item(0, 3).text()
    assert "1 failed" in dialog.result_label.text()
    error = window.notifier.history[-1]
    assert error.title == "Some cases failed" and failed.case in error.text and "No space left" in error.details
    assert not (tmp_path / "export-2" / failed.case).exists(), "no half-written case folder"


def test_export_errors_are_reported_and_the_dialog_stays_usable(window, qtbot, tmp_path, staged) -> None:
    dialog = _export_dialog(window, tmp_path / "export", ("png",))
    assert not dialog.from_session.isEnabled() and dialog.from_folder.isChecked(), "nothing analysed yet"
    dialog.results_dir.setText(str(tmp_path / "no-such-results"))
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [False]
    error = window.notifier.history[-1]
    assert error.title == "Export failed" and "no-such-results" in error.text and "does not exist" in error.text

    partial = tmp_path / "partial"
    (partial / "case").mkdir(parents=True)
    (partial / "case" / "0000.npz").write_bytes(b"")
    dialog.results_dir.setText(str(partial))
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [False]
    assert "summary.json" in window.notifier.history[-1].text and "did not finish" in window.notifier.history[-1].text

    _analyse_two_slices(window, qtbot)
    dialog = window.open_export_dialog()
    assert dialog.from_session.isEnabled()
    dialog.from_session.setChecked(True)
    dialog.all_cases.setChecked(True)
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [True]
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [False], "no overwrite without asking"
    assert "exists" in window.notifier.history[-1].text
    dialog.overwrite.setChecked(True)
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [True]
    assert list(staged.iterdir()) == [], "no staged results left behind, after failures either"

    for row in range(len(window.cases)):
        window.cases.set_manual_flag(row, False)
    dialog.flagged_only.setChecked(True)
    dialog.refresh_session()
    assert not dialog.start() and window.notifier.history[-1].title == "No flagged cases"
    for box in dialog.formats.values():
        box.setChecked(False)
    assert not dialog.start() and window.notifier.history[-1].title == "No format"


def test_staging_never_goes_inside_the_export_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("KLVIEWER_CACHE_DIR", str(tmp_path / "cache"))
    assert staging_parent(tmp_path / "export") == tmp_path / "tmp"
    assert staging_parent(tmp_path / "tmp") == tmp_path / "cache", "the export folder holds the temp folder"
    with pytest.raises(KlviewerError, match="does not contain"):
        staging_parent(tmp_path)
    with pytest.raises(KlviewerError, match="no analysed slices"):
        write_session_results([], tmp_path / "results", MapSettings())


def test_one_refused_prior_does_not_stop_the_others(tiny_prior, tmp_path, monkeypatch) -> None:
    """Session results of two priors: the first prior's export is refused (its case folder exists),
    the second one's is written, and the summary says which was refused and why."""
    import shutil
    import threading

    from export_fixtures import make_results

    from klviewer.app import export_job
    from klviewer.app.export_job import ExportRequest, SessionSnapshot, run_export
    from klviewer.app.session_results import SessionFolder

    fixture = make_results(tmp_path / "fx", tiny_prior, with_arrays=False)
    folders = [SessionFolder(Path(shutil.copytree(fixture.results, tmp_path / name)), prior)
               for name, prior in (("01-a", "prior-a"), ("02-b", "prior-b"))]
    monkeypatch.setattr(export_job, "write_session_results", lambda slices, out, settings: folders)
    out = tmp_path / "export"
    (out / "01-a" / "S004-chest").mkdir(parents=True)
    request = ExportRequest(out=out, session=SessionSnapshot([], MapSettings()), flagged_only=False, formats=("png",))
    summary = run_export(request, lambda done, total, text: None, threading.Event())
    assert [o.label for o in summary.outcomes] == ["prior-b"] and len(summary.cases) == 3 and not summary.failed
    (refused,) = summary.refused
    assert refused.startswith("prior-a: ") and "S004-chest" in refused and "--overwrite" in refused
