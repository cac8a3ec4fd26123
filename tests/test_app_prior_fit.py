"""The Prior fit dock: KL-vs-sigma curves and a ranking for the loaded studies, in the background."""

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
    third_prior,
    wait_for_slot,
)
from test_app_support import isolated_settings, window  # noqa: F401

from klviewer.inference.verdict_text import format_nats
from klviewer.app.scope import measurement_scope


def _setup(window, reference: Path | None, candidates: list[Path], scope: str = "slice"):
    for path in {p for p in [reference, *candidates] if p is not None}:
        window.panel.add_prior_folder(path)
    panel = window.prior_fit
    panel.set_reference(reference)
    panel.set_candidates(candidates)
    panel.set_scope(scope)
    return panel


def _curves(panel) -> list:
    return [item for item in panel.plot.getPlotItem().listDataItems()]


def test_curves_legend_and_ranking_against_a_reference(window, qtbot, tiny_prior, other_prior, third_prior) -> None:  # noqa: F811
    panel = _setup(window, tiny_prior, [third_prior, other_prior, tiny_prior])
    assert wait_for_slot(qtbot, panel.slot, panel.compute) == [True]
    result = panel.result
    assert result.reference == tiny_prior.name and result.n_measurements == 1
    assert [row.path for row in result.rows] == [other_prior, third_prior], \
        "the reference is not its own candidate; the less perturbed copy is closer to it"
    assert 0 < result.rows[0].score < result.rows[1].score
    assert result.rows[0].delta == 0 and result.rows[1].delta == pytest.approx(result.rows[1].score - result.rows[0].score)
    curves = _curves(panel)
    assert len(curves) == 2
    for item, row in zip(curves, result.rows):
        assert np.allclose(item.xData, row.curve.sigmas)
        assert item.yData[-1] == pytest.approx(row.score), "the curve ends at the ranked score"
        assert row.name in item.name() and "nats" in item.name()
    assert [panel.table.item(r, 1).text() for r in range(2)] == [other_prior.name, third_prior.name]
    assert panel.table.item(1, 2).text() == format_nats(result.rows[1].score)
    assert panel.plot.getPlotItem().ctrl.logXCheck.isChecked(), "sigma on a log axis"
    done, total = panel.progress.reported
    assert done == total > 40 and panel.progress.bar.value() == panel.progress.bar.maximum() == total, \
        "the estimate reported every step up to the end"
    assert "slice" in panel.note.text()


def test_without_a_reference_priors_are_ranked_by_denoising_fit(window, qtbot, tiny_prior, other_prior) -> None:  # noqa: F811
    panel = _setup(window, None, [tiny_prior, other_prior])
    assert wait_for_slot(qtbot, panel.slot, panel.compute) == [True]
    rows = panel.result.rows
    assert panel.result.reference is None and len(rows) == 2
    assert rows[0].delta == 0.0 and rows[1].delta == pytest.approx(rows[1].score - rows[0].score)
    assert rows[0].score <= rows[1].score
    assert all("vs best" in item.name() for item in _curves(panel))
    assert "Δ" in panel.note.text()


def test_cancel_stops_the_estimate_and_the_panel_stays_usable(window, qtbot, tiny_prior, other_prior, monkeypatch) -> None:  # noqa: F811
    import klviewer.inference.prior_selection as selection

    delays = delay_loader(monkeypatch, selection)
    delays.delay_s = 0.05
    panel = _setup(window, tiny_prior, [other_prior])
    outcome: list[bool] = []
    panel.slot.finished.connect(outcome.append)
    assert panel.compute()
    assert not panel.compute_button.isEnabled()
    qtbot.waitUntil(lambda: delays.started, timeout=20_000)
    with qtbot.waitSignal(panel.slot.finished, timeout=20_000):
        panel.progress.cancel_button.click()
    assert outcome == [False] and panel.result is None
    assert delays.calls < 2 * 40, "stopped before the 40 noise levels were done"
    assert message_titles(window)[-1] == "Prior fit cancelled"
    assert panel.compute_button.isEnabled()
    delays.delay_s = 0.0
    assert wait_for_slot(qtbot, panel.slot, panel.compute) == [True] and panel.result is not None


def test_errors_are_reported_and_nothing_breaks(window, qtbot, tiny_prior, small_grid_prior) -> None:  # noqa: F811
    panel = _setup(window, tiny_prior, [tiny_prior])
    assert not panel.compute()
    assert window.notifier.history[-1].title == "No candidate priors"

    panel = _setup(window, tiny_prior, [small_grid_prior])
    assert wait_for_slot(qtbot, panel.slot, panel.compute) == [False]
    error = window.notifier.history[-1]
    assert error.title == "Prior fit failed" and "16" in error.text and "32" in error.text
    assert panel.compute_button.isEnabled() and panel.progress.status.text().startswith("Failed")


def test_candidate_list_keeps_ticks_and_offers_new_priors(window, tiny_prior, other_prior) -> None:  # noqa: F811
    panel = window.prior_fit
    panel.set_candidates([tiny_prior])
    assert panel.checked_candidates() == [tiny_prior]
    window.panel.add_prior_folder(other_prior)
    assert set(panel.checked_candidates()) == {tiny_prior, other_prior}, "a newly added prior starts ticked"
    rows = [panel.candidates.item(r).data(Qt.ItemDataRole.UserRole) for r in range(panel.candidates.count())]
    assert str(other_prior) in rows and panel.reference.findData(str(other_prior)) >= 0


def test_scope_names_the_inputs_and_slices(window) -> None:
    series = window.current.series
    one = window.scope_for("slice")
    assert one.inputs == tuple(series.files) and one.slices == str(window.index) and one.n_slices == 1
    everything = window.scope_for("open")
    assert everything.slices == "all" and everything.n_slices == series.n_slices
    from klviewer.errors import KlviewerError

    with pytest.raises(KlviewerError, match="no series is shown"):
        measurement_scope("series", [], None, 0)
