"""Bad input and faults: each becomes a message (status bar + non-modal dialog) and the app keeps running."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from dicom_fixtures import ct_dataset, dicomdir, save
from pydicom.uid import MRImageStorage
from PySide6.QtWidgets import QMessageBox
from test_app_support import isolated_settings, run_and_wait, window  # noqa: F401


def _last(win):
    return win.notifier.history[-1]


def test_corrupt_file_is_reported_and_the_open_study_stays(window, tmp_path: Path) -> None:
    demo_uid = window.current_uid
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"this is not DICOM" * 20)
    assert not window.open_paths([bad])
    message = _last(window)
    assert message.level == "error" and message.title == "No images found"
    assert "not a DICOM file" in message.text and str(bad) in message.details
    assert "No images found" in window.statusBar().currentMessage()
    assert window.current_uid == demo_uid and window.viewer.base.image is not None


def test_folder_without_images_and_missing_paths(window, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not window.open_paths([empty])
    assert "no files" in _last(window).text
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no images here")
    assert not window.open_paths([tmp_path / "docs"])
    assert _last(window).title == "No images found"
    assert not window.open_paths([tmp_path / "gone"])
    assert "does not exist" in _last(window).text
    assert len(window.series) == 1


def test_partly_bad_folder_opens_and_lists_what_was_skipped(window, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    save(ct_dataset(np.full((16, 16), 1064, np.int16)), folder / "good.dcm")
    (folder / "bad.dcm").write_bytes(b"\0" * 300)
    assert window.open_paths([folder])
    assert window.current.series.image_shape == (16, 16)
    warning = _last(window)
    assert warning.level == "warning" and "1 file(s)" in warning.text and "bad.dcm" in warning.details


def test_dicomdir_opens_its_series(window, tmp_path: Path) -> None:
    root = tmp_path / "media"
    for n in (1, 2):
        save(ct_dataset(np.full((16, 16), 1000 + n, np.int16), instance_number=n, position=(0, 0, n)),
             root / "IMAGES" / f"IM{n}")
    save(dicomdir([("IMAGES", "IM1"), ("IMAGES", "IM2")]), root / "DICOMDIR")
    assert window.open_paths([root / "DICOMDIR"])
    assert window.current.series.n_slices == 2 and window.current.series.description == "synthetic series"


def test_unsupported_modality_is_viewable_but_run_is_refused(window, tmp_path: Path) -> None:
    ds = ct_dataset(np.full((16, 16), 1200, np.int16))
    ds.Modality, ds.SOPClassUID = "MR", MRImageStorage
    save(ds, tmp_path / "mr" / "mr.dcm")
    assert window.open_paths([tmp_path / "mr"])
    assert window.current.series.modality == "MR" and window.viewer.base.image.shape == (16, 16)
    assert "not analysable" in window.viewer.corners["br"].text()
    assert not window.run_current_slice() and window.thread is None
    refusal = _last(window)
    assert refusal.title == "Cannot analyse this series" and "modality is MR" in refusal.text


def test_bad_checkpoint_is_refused_when_added(window, tmp_path: Path, tiny_prior: Path) -> None:  # noqa: F811
    broken = tmp_path / "broken-prior"
    shutil.copytree(tiny_prior, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:200])
    count = window.panel.prior_combo.count()
    assert not window.panel.add_prior_folder(broken)
    error = _last(window)
    assert error.title == "Cannot use this prior" and "safetensors" in error.text
    assert window.panel.prior_combo.count() == count and window.panel.prior_name() == "tiny-test"
    (tmp_path / "not-a-prior").mkdir()
    assert not window.panel.add_prior_folder(tmp_path / "not-a-prior")
    assert "config.json" in _last(window).text


def test_checkpoint_broken_after_it_was_picked_fails_the_run(window, qtbot, tmp_path: Path, tiny_prior: Path) -> None:  # noqa: F811
    copy = tmp_path / "soon-broken"
    shutil.copytree(tiny_prior, copy)
    assert window.panel.add_prior_folder(copy)
    (copy / "config.json").write_text("{not json")
    assert "Unreadable" in window.panel.prior_info.text() or window.panel.prior_name() == "soon-broken"
    assert run_and_wait(qtbot, window) == [False]
    error = _last(window)
    assert error.title == "Analysis failed" and "not valid JSON" in error.text
    assert window.thread is None and window.panel.run_slice_button.isEnabled()


def test_messages_open_non_modal_dialogs(window, tmp_path: Path) -> None:
    window.notifier.show_dialogs = True
    assert not window.open_paths([tmp_path / "nowhere"])
    boxes = [b for b in window.findChildren(QMessageBox) if b.isVisible()]
    assert boxes and "does not exist" in boxes[-1].text() and not boxes[-1].isModal()
    assert window.isVisible(), "the app keeps running behind the dialog"
