"""Two stages from the app: the Escalate box runs `analyze_slices` with an escalation, and every slice is listed
with the verdict and rule that its result carries, as `klviewer analyze --escalate` writes them."""

from __future__ import annotations

import shutil
from pathlib import Path

from test_app_support import FAST_STEPS, isolated_settings, run_and_wait, window  # noqa: F401

from klviewer.app.main_window import MainWindow
from klviewer.app.session_file import open_session, save_session
from klviewer.app.settings import Preferences, open_settings
from klviewer.evaluation.calibrate import calibrate_prior
from klviewer.inference.escalation import Escalation, escalation_rule
from klviewer.inference.pipeline import LoadedPrior
from klviewer.inference.settings import AnalysisSettings
from klviewer.results.reader import read_results


def test_escalate_box_runs_two_stages_and_lists_each_slice_by_its_rule(window, qtbot, tiny_prior: Path,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    prior = Path(shutil.copytree(tiny_prior, tmp_path / "two-stage"))
    stage1 = AnalysisSettings(steps=FAST_STEPS, device="cpu")
    for samples in (1, 2):
        calibrate_prior(prior, AnalysisSettings(steps=FAST_STEPS, samples=samples, device="cpu"), n=6, fpr=0.0)
    assert window.panel.add_prior_folder(prior)
    window.panel.escalate.setValue(3)  # no calibration for 3 samples: refused, and nothing runs
    assert not window.run_series()
    assert window.notifier.history[-1].title == "Cannot run two stages"
    assert "--samples 3" in window.notifier.history[-1].text and window.thread is None

    window.panel.escalate.setValue(2)
    assert window.panel.escalation() == Escalation(2)
    assert run_and_wait(qtbot, window, window.run_series, timeout=60_000) == [True]
    rule = escalation_rule(LoadedPrior.load(prior, "cpu").calibration, stage1, Escalation(2))
    escalated = 0
    for case in window.cases:
        result = window.results.latest(case.series_uid, case.slice_index).result
        verdict = result.verdict()
        assert (case.verdict, case.z_score) == (verdict.status, result.z_score), "listed as the result says"
        assert f"KL z-score > {result.z_threshold:.3g}" in case.rule
        assert result.stage == rule.stage(escalated=result.settings.samples == 2)
        if result.stage.escalated:
            escalated += 1
            assert result.z_threshold == rule.stage2_z.threshold
        else:
            assert result.z_threshold == rule.threshold and not case.auto_flagged
    assert 0 < escalated < len(window.cases) == 8
    assert window.panel.progress.value() == window.panel.progress.maximum()

    # the same run again is served from the session; without the escalation it is another run
    assert run_and_wait(qtbot, window, window.run_series) == [True]
    assert window.model.unanalysed(window.current_uid, [0], prior, window.analysis_settings()) == [0]
    verdicts = [(c.slice_index, c.verdict, c.rule) for c in window.cases]

    # saved, the run is one results folder that records the escalation; reopened, it is the same run
    folder = save_session(window, tmp_path / "two-stage")
    results = read_results(folder / "results")
    assert results.summary["escalation"] == rule.to_dict() and results.z_threshold == rule.stage2_z.threshold
    rows = [s.row for c in results.cases for s in c.slices]
    assert sum(r["escalated"] for r in rows) == escalated and len(rows) == 8
    other = MainWindow(Preferences(open_settings()))
    other.notifier.show_dialogs = False
    qtbot.addWidget(other)
    assert open_session(other, folder), other.notifier.history
    assert [(c.slice_index, c.verdict, c.rule) for c in other.cases] == verdicts
    indices = list(range(8))
    assert other.model.unanalysed(other.current_uid, indices, prior, window.analysis_settings(), Escalation(2)) == []
    assert other.model.unanalysed(other.current_uid, indices, prior, window.analysis_settings()) == indices
