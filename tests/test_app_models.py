"""The app's Qt-free models: display maths, overlay cutting, result cache, case list."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from klviewer.app.cases import CaseEntry, CaseList
from klviewer.app.display import (
    PRESETS,
    LogScale,
    MapSettings,
    WindowLevel,
    colorbar_ticks,
    flagged_patches,
    initial_window,
    overlay_frame,
    round_sig,
)
from klviewer.app.session import FlagThresholds, ResultCache, ResultKey
from klviewer.inference.calibration import calibration_key
from klviewer.inference.energy import EnergyField, log_sigma_edges
from klviewer.inference.settings import AnalysisSettings, sampling_key
from klviewer.io.study import Series


def _energy(size: int = 64, bins: int = 8, seed: int = 0) -> EnergyField:
    rng = np.random.default_rng(seed)
    energy = rng.random((bins, size, size), dtype=np.float32)
    energy[:, 40:48, 8:16] += 5.0  # one hot spot
    return EnergyField(energy, log_sigma_edges(0.002, 10.0, bins))


def test_models_import_without_qt() -> None:
    script = ("import sys, klviewer.app, klviewer.app.cases, klviewer.app.display, klviewer.app.session;"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'shiboken6')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_window_level_presets_drag_and_initial() -> None:
    assert [(p.window.width, p.window.level) for p in PRESETS] == [(400, 40), (1500, -600), (150, 90), (2500, 480), (80, 40)]
    assert WindowLevel(400, 40).levels == (-160, 240)
    dragged = WindowLevel(400, 40).dragged(100, -50)
    assert dragged.width > 400 and dragged.level < 40
    assert WindowLevel(10, 0).dragged(-10_000, 0).width == WindowLevel.MIN_WIDTH
    series = Series(uid="s", modality="CT", source_kind="dicom", window=(50.0, 350.0))
    assert initial_window(series) == WindowLevel(350, 50)
    assert initial_window(Series(uid="s", modality="CT", source_kind="dicom")) == PRESETS[0].window


def test_overlay_frame_follows_each_setting() -> None:
    energy = _energy()
    base = MapSettings(patch=8, sigma_window=(0.01, 0.5), threshold_fraction=0.0)
    frame = overlay_frame(energy, base, flag_threshold=None)
    assert frame.pixels.shape == (64, 64) and np.isfinite(frame.pixels).all()
    assert frame.kl_map.values.shape == (8, 8)
    assert frame.boxes == [] and frame.verdict_text.status == "cannot flag", "no rule: nothing outlined, nothing flagged"
    assert frame.levels == (0.0, pytest.approx(frame.score)) and not frame.flagged, "no calibrated range: the slice's own"
    assert frame.peak == pytest.approx(frame.score) and frame.threshold_mark is None
    assert frame.scale_label().endswith("relative to this slice")
    assert frame.scale_label().startswith("KL energy per patch (relative nats)"), "no guidance recorded: not calibrated"
    assert replace(frame, guidance="pigdm").scale_label().startswith("KL energy per patch (relative nats)")
    assert replace(frame, guidance="exact").scale_label().startswith("KL per patch (nats)")
    assert replace(frame, guidance="tmpd").scale_label().startswith("KL energy per patch (relative nats)"), \
        "tmpd's solve fails on network priors: not calibrated there"
    assert "relative energy (pigdm" in replace(frame, guidance="pigdm").scale_tooltip()
    assert "only where its covariance solve converges" in replace(frame, guidance="tmpd").scale_tooltip()

    for changed in (MapSettings(patch=4, sigma_window=(0.01, 0.5), threshold_fraction=0.0),
                    MapSettings(patch=8, sigma_window=(0.05, 5.0), threshold_fraction=0.0)):
        assert not np.allclose(overlay_frame(energy, changed, None).raw_pixels, frame.raw_pixels)
    cut = overlay_frame(energy, MapSettings(patch=8, sigma_window=(0.01, 0.5), threshold_fraction=0.5), None)
    assert np.isnan(cut.pixels).any() and np.isfinite(cut.pixels).any()
    assert np.nanmin(cut.pixels) >= 0.5 * frame.score - 1e-6

    flagged = overlay_frame(energy, base, flag_threshold=frame.score * 0.9)
    assert flagged.flagged and flagged.boxes == [(40, 48, 8, 16)]
    assert flagged.levels[1] == pytest.approx(1.5 * 0.9 * frame.score), "fixed range: 1.5 x the threshold"
    assert flagged.threshold_mark == pytest.approx(0.9 * frame.score) and flagged.verdict_text.status == "flagged"
    quiet = overlay_frame(energy, base, flag_threshold=frame.score * 2)
    assert quiet.boxes == [] and not quiet.flagged and quiet.levels == flagged.levels[:1] + (3 * frame.score,)
    huge = overlay_frame(energy, MapSettings(patch=500), None)
    assert huge.kl_map.patch == 64, "the patch is clamped to the image"


def test_flagged_patches_are_those_above_the_threshold() -> None:
    kl = _energy().kl_map(16, (0.01, 0.5))
    assert flagged_patches(kl, kl.score * 0.99) == [(32, 48, 0, 16)]
    assert flagged_patches(kl, kl.score + 1) == []


def test_colorbar_marks_threshold_and_slice_maximum() -> None:
    energy = _energy()
    base = MapSettings(patch=8, sigma_window=(0.01, 0.5), threshold_fraction=0.0)
    score = overlay_frame(energy, base, None).score
    below = overlay_frame(energy, base, flag_threshold=score * 2)
    ticks = {label.split()[0] if not label[0].isdigit() else label: value for value, label in colorbar_ticks(below)}
    assert ticks["thr"] == pytest.approx(score * 2) and ticks["max"] == pytest.approx(score)
    assert all(abs(v - score) > 0.12 * below.levels[1] for label, v in ticks.items() if label[0].isdigit())
    assert len(ticks) >= 4, "round numbers besides the marks"
    above = overlay_frame(energy, base, flag_threshold=score / 4)
    top = [value for value, label in colorbar_ticks(above) if label.startswith("max")]
    assert top == [pytest.approx(0.96 * above.levels[1])], "a maximum beyond the range sits at the top end, labelled"


def test_log_scale_round_trip() -> None:
    scale = LogScale(0.002, 10.0)
    assert scale.value(0) == pytest.approx(0.002) and scale.value(scale.steps) == pytest.approx(10.0)
    for v in (0.01, 0.5, 3.0):
        assert scale.value(scale.position(v)) == pytest.approx(v, rel=0.01)
    assert round_sig(0.0123456) == 0.0123


def test_result_cache_and_sampling_key() -> None:
    a = AnalysisSettings(steps=10, patch=4, sigma_window=(0.01, 0.5))
    b = AnalysisSettings(steps=10, patch=16, sigma_window=(0.1, 1.0))
    assert sampling_key(a) == sampling_key(b), "map settings do not need a new run"
    assert sampling_key(a) != sampling_key(AnalysisSettings(steps=11))
    cache = ResultCache()
    k1 = ResultKey.of("s", 0, Path("p"), a)
    k2 = ResultKey.of("s", 0, Path("p"), AnalysisSettings(steps=11))
    cache.put(k1, "r1", Path("p"))  # type: ignore[arg-type]
    cache.put(k2, "r2", Path("p"))  # type: ignore[arg-type]
    assert cache.get(ResultKey.of("s", 0, Path("p"), b)).result == "r1"
    assert cache.latest("s", 0).result == "r2" and cache.latest("s", 1) is None


def test_flag_thresholds_match_exact_map_settings(tmp_path: Path) -> None:
    settings = AnalysisSettings(steps=4, patch=8, sigma_window=(0.01, 0.5))
    (tmp_path / "calibration.json").write_text(json.dumps(
        {"calibrations": [{"settings": calibration_key(settings), "threshold": 2.5}]}))
    thresholds = FlagThresholds()
    assert thresholds.threshold(tmp_path, settings, 8, (0.01, 0.5)) == 2.5
    assert thresholds.threshold(tmp_path, settings, 4, (0.01, 0.5)) is None
    assert thresholds.calibrated_windows(tmp_path) == [(0.01, 0.5)]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "calibration.json").write_text("{broken")
    assert thresholds.threshold(tmp_path / "other", settings, 8, (0.01, 0.5)) is None


def test_case_list_keeps_manual_flags_and_notes_and_announces_changes() -> None:
    cases = CaseList()
    seen: list[tuple[str, int]] = []
    cases.subscribe(lambda change: seen.append((change.kind, change.row)))
    row = cases.upsert(CaseEntry("s", 3, "P", "S", score=1.0, auto_flagged=False))
    assert seen == [("inserting", 0), ("inserted", 0)] and row == 0
    cases.set_manual_flag(0, True)
    cases.set_note(0, "check the liver")
    assert cases[0].flagged and cases[0].flag_source == "manual"
    cases.upsert(CaseEntry("s", 3, "P", "S", score=2.0, auto_flagged=False))
    assert len(cases) == 1 and cases[0].score == 2.0 and cases[0].flagged and cases[0].note == "check the liver"
    cases.set_manual_flag(0, None)
    assert not cases[0].flagged and cases.flagged() == []
    cases.set_score(0, 5.0, True)
    assert cases.flagged() == [cases[0]] and seen[-1] == ("changed", 0)
    changes = len(seen)
    cases.set_score(0, 5.0, True, 3.5)
    assert cases[0].z_score == 3.5 and len(seen) == changes + 1, "a new z-score alone is a change"


def test_case_table_shows_and_sorts_by_kl_z_score(qtbot) -> None:
    from PySide6.QtCore import Qt

    from klviewer.app.case_list import SORT_ROLE, Z_COLUMN, CaseListView

    cases = CaseList()
    for i, z in enumerate((2.0, None, 7.5)):
        cases.upsert(CaseEntry("s", i, "P", "S", score=10.0 - i, auto_flagged=False, z_score=z))
    view = CaseListView(cases)
    qtbot.addWidget(view)
    model = view.model
    assert [model.data(model.index(r, Z_COLUMN)) for r in range(3)] == ["2", "", "7.5"]
    view.table.sortByColumn(Z_COLUMN, Qt.SortOrder.DescendingOrder)
    order = [view.proxy.mapToSource(view.proxy.index(r, 0)).row() for r in range(3)]
    assert order == [2, 0, 1], "highest z first, slices without one last"
    assert model.data(model.index(1, Z_COLUMN), SORT_ROLE) == float("-inf")
    model.detach()  # as the main window does on close: the case list outlives this view
