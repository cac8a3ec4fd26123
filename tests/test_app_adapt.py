"""Analysis → Adapt prior to my studies…: a site prior from the open healthy studies, in the background."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import TINY_PRIOR_SIZE
from test_app_compare_support import message_titles, wait_for_slot
from test_app_support import isolated_settings, window  # noqa: F401

from klviewer.phantoms import make_phantom


def _site(folder: Path) -> Path:
    """Three patients' healthy slices, on the tiny prior's grid."""
    for patient, seeds in (("P1", range(10, 16)), ("P2", range(20, 26)), ("P3", range(30, 36))):
        np.save(folder / f"{patient}.npy", np.stack([make_phantom("healthy", TINY_PRIOR_SIZE, s).hu for s in seeds]))
        (folder / f"{patient}.json").write_text(json.dumps({"pixel_spacing_mm": 400 / TINY_PRIOR_SIZE,
                                                             "patient_id": patient}))
    return folder


def test_adapting_on_the_open_studies_offers_the_site_prior(window, qtbot, tiny_prior, tmp_path) -> None:  # noqa: F811
    site = tmp_path / "site"
    site.mkdir()
    assert window.open_paths([_site(site)])
    dialog = window.open_adapt_dialog()
    assert dialog.base.currentData() == str(tiny_prior), "the analysis panel's prior is the default base"
    dialog.steps.setValue(2)
    dialog.out.setText(str(tmp_path / "site-prior"))
    assert not dialog.start() and "Healthy studies only" in message_titles(window), "the user must vouch for them"
    dialog.vouch.setChecked(True)
    assert wait_for_slot(qtbot, dialog.slot, dialog.start, timeout=120_000) == [True]
    out = tmp_path / "site-prior"
    assert (out / "calibration.json").is_file() and (out / "adaptation" / "ADAPTATION.md").is_file()
    assert window.panel.prior_combo.findData(str(out)) >= 0, "the new prior is offered in the prior pickers"
    assert window.panel.prior_path() == tiny_prior, "the analysis keeps the prior it had"
    split = json.loads((out / "config.json").read_text())["training"]["data"]["split"]
    assert split["method"] == "patients" and not set(split["train_patients"]) & set(split["held_out_patients"])


def test_too_few_slices_are_refused_with_the_count(window, qtbot, tmp_path) -> None:  # noqa: F811
    dialog = window.open_adapt_dialog()  # only the 8-slice demo study is open: one patient, too short to cut
    dialog.vouch.setChecked(True)
    dialog.out.setText(str(tmp_path / "nothing"))
    assert wait_for_slot(qtbot, dialog.slot, dialog.start) == [False]
    assert "Adaptation failed" in message_titles(window) and "8 slice(s) of 1 patient(s)" in dialog.result_label.text()
    assert not (tmp_path / "nothing" / "config.json").exists()
