"""Analysis → Align prior…: background alignment with progress and cancel, then compare base vs aligned.

Also the generic background-job runner the dialog (and the other jobs) use.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from test_app_compare_support import message_titles, wait_for_slot
from test_app_support import isolated_settings, window  # noqa: F401

from klviewer.app.task_worker import JobContext, TaskSlot
from klviewer.errors import KlviewerError


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _dialog(window, tmp_path: Path, steps: int):
    dialog = window.open_align_dialog()
    fast = next(r for r in range(dialog.input_image.count()) if dialog.input_image.itemData(r) != "recon")
    dialog.input_image.setCurrentIndex(fast)  # an input image made without sampling: fast
    dialog.mode.setCurrentIndex(dialog.mode.findData("norm-bias"))
    dialog.steps.setValue(steps)
    dialog.scope.setCurrentIndex(dialog.scope.findData("slice"))
    dialog.out.setText(str(tmp_path / "aligned"))
    return dialog


def test_alignment_adds_the_new_prior_and_offers_the_comparison(window, qtbot, tiny_prior, tmp_path) -> None:
    base_files = _digest(tiny_prior)
    dialog = _dialog(window, tmp_path, steps=3)
    assert dialog.base.currentData() == str(tiny_prior), "the analysis panel's prior is the default base"
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [True]
    aligned = tmp_path / "aligned"
    assert (aligned / "config.json").is_file() and (aligned / "model.safetensors").is_file()
    assert _digest(tiny_prior) == base_files, "the base prior is never written"
    assert dialog.progress.reported == (3, 3) and dialog.progress.bar.value() == dialog.progress.bar.maximum() == 3
    assert "Few measurements" in message_titles(window), "one slice: a warning with the count"
    assert "1 measurement" in next(m.text for m in window.notifier.history if m.title == "Few measurements")
    assert message_titles(window)[-1] == "Alignment finished"

    combo = window.panel.prior_combo
    assert combo.findData(str(aligned.resolve())) >= 0, "the aligned prior is in the analysis panel's picker"
    assert window.panel.prior_path() == tiny_prior, "the analysis keeps its prior"
    assert aligned.resolve() in window.prior_fit.checked_candidates()

    assert dialog.compare_button.isEnabled()
    dialog.compare_button.click()
    compare = window.compare_dialog
    assert compare is not None and compare.isVisible()
    assert compare.before.currentData() == str(tiny_prior) and compare.after.currentData() == str(aligned.resolve())
    compare.set_scope("slice")
    assert wait_for_slot(qtbot, compare.slot, compare.start) == [True]
    assert window.comparisons and window.comparisons[-1].model.comparison.after_prior == aligned.name


def test_cancel_stops_alignment_and_offers_resume(window, qtbot, tiny_prior, tmp_path) -> None:
    dialog = _dialog(window, tmp_path, steps=100_000)
    outcome: list[bool] = []
    dialog.slot.finished.connect(outcome.append)
    assert dialog.start() and not dialog.start_button.isEnabled()
    qtbot.waitUntil(lambda: dialog.progress.reported is not None and dialog.progress.reported[0] >= 1, timeout=30_000)
    with qtbot.waitSignal(dialog.slot.finished, timeout=30_000):
        dialog.progress.cancel_button.click()
    assert outcome == [False] and dialog.progress.reported[0] < 100_000
    assert message_titles(window)[-1] == "Alignment cancelled"
    assert dialog.resume.isChecked(), "a cancelled run can be resumed"
    assert (tmp_path / "aligned" / "resume").is_dir()
    assert not (tmp_path / "aligned" / "config.json").exists(), "a cancelled run is not offered as a prior"
    assert window.panel.prior_combo.findData(str((tmp_path / "aligned").resolve())) < 0
    assert dialog.start_button.isEnabled() and not dialog.compare_button.isEnabled()


def test_bad_output_folder_is_reported_and_the_dialog_stays_usable(window, qtbot, tiny_prior, tmp_path) -> None:
    dialog = _dialog(window, tmp_path, steps=2)
    dialog.out.setText(str(tiny_prior / "inside"))
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [False]
    error = window.notifier.history[-1]
    assert error.title == "Alignment failed" and "base prior" in error.text and str(tiny_prior) in error.text
    assert not (tiny_prior / "inside").exists()
    dialog.out.setText("")
    assert not dialog.start() and window.notifier.history[-1].title == "No output folder"
    dialog.out.setText(str(tmp_path / "aligned"))
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [True]


# ----- the background-job runner ------------------------------------------------------------------


def test_task_slot_reports_results_failures_and_cancels(qtbot) -> None:
    slot = TaskSlot()
    results, failures, cancels = [], [], []
    slot.succeeded.connect(results.append)
    slot.failed.connect(lambda message, details: failures.append((message, details)))
    slot.cancelled.connect(lambda: cancels.append(True))

    def counting(ctx: JobContext) -> int:
        for n in range(5):
            ctx.report(n + 1, 5, "counting")
        return 42

    assert wait_for_slot(qtbot, slot, lambda: slot.start(counting)) == [True] and results == [42]

    def broken(ctx: JobContext) -> None:
        raise ZeroDivisionError("deliberately")

    assert wait_for_slot(qtbot, slot, lambda: slot.start(broken)) == [False]
    assert failures[-1][0] == "ZeroDivisionError: deliberately" and "Traceback" in failures[-1][1]

    def refused(ctx: JobContext) -> None:
        raise KlviewerError("input.dcm: not CT")

    assert wait_for_slot(qtbot, slot, lambda: slot.start(refused)) == [False]
    assert failures[-1] == ("input.dcm: not CT", "")

    gate = threading.Event()

    def waits(ctx: JobContext) -> None:
        gate.set()
        while True:
            ctx.check()  # raises TaskCancelled once cancel is set
            ctx.cancel.wait(0.01)

    assert slot.start(waits) and not slot.start(waits), "one job at a time"
    gate.wait(5)
    with qtbot.waitSignal(slot.finished, timeout=5000):
        slot.cancel()
    assert cancels == [True] and not slot.running
