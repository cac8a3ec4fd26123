"""The before/after comparison: its Qt-free model, the linked comparison window, and Compare priors… in the app."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import Qt
from test_app_compare_support import (  # noqa: F401
    delay_loader,
    message_titles,
    other_prior,
    small_grid_prior,
    wait_for_slot,
)
from test_app_support import FAST_STEPS, isolated_settings, window  # noqa: F401

from klviewer.app.comparison import (
    METRICS,
    ComparisonModel,
    difference_image,
    difference_window,
    format_pair,
    improved,
    paired_overlays,
    summary_text,
)
from klviewer.app.display import PRESETS, MapSettings
from klviewer.inference.verdict_text import format_nats
from klviewer.inference.settings import AnalysisSettings


@pytest.fixture(scope="module")
def comparison(tiny_prior: Path, other_prior: Path):  # noqa: F811
    """Two demo slices analysed with the tiny prior (before) and its perturbed copy (after), plus shift curves."""
    from klviewer.demo import ensure_demo_study
    from klviewer.evaluation.compare import compare_priors

    settings = AnalysisSettings(steps=FAST_STEPS, device="cpu")
    return compare_priors(tiny_prior, other_prior, [ensure_demo_study()], settings, reference=tiny_prior,
                          slices="3,4")


# ----- the Qt-free model ------------------------------------------------------------------------


def test_difference_is_after_minus_before_on_a_symmetric_window(comparison) -> None:
    case = comparison.cases[0]
    diff = difference_image(case)
    assert np.array_equal(diff, case.after.recon_hu - case.before.recon_hu)
    assert np.abs(diff).max() > 1, "the two priors reconstruct differently"
    assert np.array_equal(difference_image(case, "std"), case.after.posterior_std_hu - case.before.posterior_std_hu)
    window = difference_window(diff)
    low, high = window.levels
    assert window.level == 0 and low == -high
    assert high == pytest.approx(np.percentile(np.abs(diff), 99.5))
    assert difference_window(np.zeros((4, 4))).levels == (-1.0, 1.0), "identical images: a flat, finite window"


def test_paired_overlays_share_one_scale(comparison) -> None:
    case = comparison.cases[0]
    before, after = paired_overlays(case, MapSettings(patch=4))
    assert before.levels == after.levels
    assert before.levels[1] == pytest.approx(max(before.kl_map.values.max(), after.kl_map.values.max()))
    assert before.kl_map.patch == after.kl_map.patch == 4
    assert before.score == pytest.approx(case.before.energy.kl_map(4, (0.01, 0.5)).score)


def test_metrics_say_which_way_is_better() -> None:
    by_key = {m.key: m for m in METRICS}
    assert improved(by_key["psnr"], 20.0, 25.0) is True
    assert improved(by_key["score"], 20.0, 25.0) is False
    assert improved(by_key["dc_residual"], 2.0, 1.0) is True
    assert improved(by_key["ssim"], 0.5, None) is None and improved(by_key["ssim"], 0.5, 0.5) is None
    assert format_pair(by_key["psnr"], 20.0, None) == "20.00 → —"


def test_model_steps_through_cases_and_summarises(comparison) -> None:
    model = ComparisonModel(comparison)
    assert len(model) == 2 and model.case.index == 3
    assert not model.set_index(-5) and model.index == 0
    assert model.set_index(9) and model.case.index == 4
    assert np.array_equal(model.image("after"), comparison.cases[1].after.recon_hu)
    text = summary_text(comparison)
    assert "2 case(s)" in text and "PSNR" in text and "measurement-domain KL" in text
    assert format_nats(comparison.shift_after.total) in text


# ----- the comparison window --------------------------------------------------------------------


@pytest.fixture()
def view(qtbot, comparison, window):  # noqa: F811
    shown = window.show_comparison(comparison)
    assert shown is not None and shown in window.comparisons
    qtbot.waitExposed(shown)
    return shown


def test_panes_show_before_after_and_their_difference(view, comparison) -> None:
    case = comparison.cases[0]
    assert np.array_equal(view.images["before"].image, case.before.recon_hu)
    assert np.array_equal(view.images["after"].image, case.after.recon_hu)
    assert np.allclose(view.images["difference"].image, case.after.recon_hu - case.before.recon_hu)
    for side in ("before", "after"):
        assert view.overlays[side].has_data(), f"the {side} side has its own KL overlay"
    assert view.overlays["before"].frame.levels == view.overlays["after"].frame.levels
    assert not np.array_equal(view.overlays["before"].frame.raw_pixels, view.overlays["after"].frame.raw_pixels)
    assert view.overlays["after"].colorbar.isVisible()
    assert "tiny-test" in view.titles["before"].text and "tiny-other" in view.titles["after"].text
    assert view.curves is not None, "shift curves are drawn when the comparison has them"


def test_zoom_pan_window_and_case_are_linked(view, comparison, qtbot) -> None:
    before, after, diff = (view.views[p] for p in ("before", "after", "difference"))
    before.scaleBy((0.5, 0.5))
    assert np.allclose(after.viewRange(), before.viewRange()) and np.allclose(diff.viewRange(), before.viewRange())
    after.translateBy((3.0, -2.0))
    assert np.allclose(before.viewRange(), after.viewRange()) and np.allclose(diff.viewRange(), after.viewRange())

    view.drag_window("after", 60, -30)
    assert tuple(view.images["before"].levels) == tuple(view.images["after"].levels) != PRESETS[0].window.levels
    qtbot.keyClick(view, Qt.Key.Key_2)
    for side in ("before", "after"):
        assert tuple(view.images[side].levels) == pytest.approx(PRESETS[1].window.levels)
    levels = tuple(view.images["difference"].levels)
    view.drag_window("difference", 100, 0)
    low, high = view.images["difference"].levels
    assert low == -high and high > levels[1], "the difference window widens and stays centred on 0"

    zoomed = before.viewRange()
    qtbot.keyClick(view, Qt.Key.Key_Down)
    second = comparison.cases[1]
    assert view.model.index == 1 and view.table.currentRow() == 1
    assert np.array_equal(view.images["before"].image, second.before.recon_hu)
    assert np.array_equal(view.images["after"].image, second.after.recon_hu)
    assert np.allclose(view.images["difference"].image, second.after.recon_hu - second.before.recon_hu)
    assert np.allclose(before.viewRange(), zoomed), "zoom stays when the case changes"
    assert tuple(view.images["after"].levels) == pytest.approx(PRESETS[1].window.levels), "W/L stays too"
    view.table.selectRow(0)
    assert view.model.index == 0 and np.array_equal(view.images["before"].image, comparison.cases[0].before.recon_hu)


def test_std_images_numbers_table_and_probe(view, comparison) -> None:
    view.set_kind("std")
    case = comparison.cases[0]
    assert np.array_equal(view.images["after"].image, case.after.posterior_std_hu)
    assert tuple(view.images["before"].levels) == tuple(view.images["after"].levels)
    assert np.allclose(view.images["difference"].image, case.after.posterior_std_hu - case.before.posterior_std_hu)

    psnr_col = 2 + [m.key for m in METRICS].index("psnr")
    for row, c in enumerate(comparison.cases):
        assert view.table.item(row, 1).text() == str(c.index), "slices numbered from 0, as everywhere"
        b, a = c.metrics["before"]["psnr"], c.metrics["after"]["psnr"]
        assert view.table.item(row, psnr_col).text() == f"{b:.2f} → {a:.2f}"

    centre = view.views["after"].mapViewToScene(view.views["after"].viewRect().center())
    text = view.probe_at(centre)
    assert "before" in text and "after" in text and "Δ" in text and "KL" in text


def test_overlays_follow_the_map_sliders_and_toggle(view, window) -> None:
    window.map_controls.patch.setValue(2)
    assert view.overlays["before"].frame.kl_map.patch == 2 == view.overlays["after"].frame.kl_map.patch
    view.set_overlays_visible(False)
    assert not view.overlays["before"].image.isVisible() and not view.overlays["after"].image.isVisible()
    view.opacity.setValue(30)
    assert view.overlays["after"].image.opacity() == pytest.approx(0.3)


def test_save_writes_the_comparison_and_refuses_to_overwrite(view, tmp_path: Path) -> None:
    out = view.save(tmp_path / "cmp")
    assert out is not None and (out / "comparison.json").is_file() and (out / "comparison.csv").is_file()
    assert view.save(tmp_path / "cmp") is None
    assert view.notifier.history[-1].title == "Cannot save the comparison"
    assert "comparison" in view.notifier.history[-1].text


# ----- Compare priors… from the main window ------------------------------------------------------


def test_compare_dialog_runs_in_the_background_and_opens_the_view(window, qtbot, tiny_prior, other_prior) -> None:  # noqa: F811
    window.panel.add_prior_folder(other_prior)
    dialog = window.open_compare_dialog()
    dialog.set_priors(tiny_prior, other_prior)
    dialog.set_scope("slice")
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [True]
    done, total = dialog.progress.reported
    assert done == total == 2 * window.panel.steps.value(), "both priors' sampler steps, reported to the end"
    assert dialog.progress.bar.value() == dialog.progress.bar.maximum() == total
    assert len(window.comparisons) == 1
    shown = window.comparisons[0]
    case = shown.model.case
    assert len(shown.model) == 1 and case.index == window.index
    assert shown.model.comparison.before_prior == tiny_prior.name
    assert shown.model.comparison.after_prior == other_prior.name
    assert np.array_equal(shown.images["difference"].image, case.after.recon_hu - case.before.recon_hu)
    assert shown.curves is None, "no reference prior, no shift curves"
    window.close()
    assert not window.comparisons, "closing the app closes its comparison windows"


def test_compare_cancel_stops_the_job(window, qtbot, tiny_prior, other_prior, monkeypatch) -> None:  # noqa: F811
    import klviewer.evaluation.compare as compare

    delays = delay_loader(monkeypatch, compare)
    window.panel.add_prior_folder(other_prior)
    window.panel.steps.setValue(400)
    dialog = window.open_compare_dialog()
    dialog.set_priors(tiny_prior, other_prior)
    dialog.set_scope("slice")
    outcome: list[bool] = []
    dialog.slot.finished.connect(outcome.append)
    assert dialog.start()
    qtbot.waitUntil(lambda: delays.started, timeout=20_000)
    with qtbot.waitSignal(dialog.slot.finished, timeout=20_000):
        dialog.progress.cancel_button.click()
    assert outcome == [False] and not dialog.slot.running
    assert delays.calls < 400, "the sampler stopped within a step or so"
    assert message_titles(window)[-1] == "Comparison cancelled" and not window.comparisons
    assert dialog.start_button.isEnabled() and dialog.progress.status.text() == "Cancelled"


def test_compare_refusals_and_failures_leave_the_app_usable(window, qtbot, tiny_prior, small_grid_prior) -> None:  # noqa: F811
    window.panel.add_prior_folder(small_grid_prior)
    dialog = window.open_compare_dialog()
    dialog.set_priors(tiny_prior, tiny_prior)
    assert not dialog.start()
    assert window.notifier.history[-1].title == "Same prior twice"

    dialog.set_priors(tiny_prior, small_grid_prior)
    dialog.set_scope("slice")
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [False]
    error = window.notifier.history[-1]
    assert error.title == "Comparison failed" and "config.json" in error.text and "grid" in error.text
    assert not window.comparisons and dialog.start_button.isEnabled()

    window.series.clear()
    window.current_uid = None
    dialog.set_priors(tiny_prior, small_grid_prior)
    assert not dialog.start()
    assert window.notifier.history[-1].title == "Nothing to compare on"


def test_the_new_models_import_no_qt() -> None:
    """The plain-data halves of the comparison, prior fit, scope and export stay usable without Qt."""
    import subprocess
    import sys

    modules = ["comparison", "scope", "prior_fit", "session_results", "export_job"]
    code = ("import sys\n" + "".join(f"import klviewer.app.{m}\n" for m in modules)
            + "print(sorted(m for m in sys.modules if m.startswith(('PySide6', 'pyqtgraph'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
