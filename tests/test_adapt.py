"""`klviewer adapt`: split by patient, fine-tune a copy of the base prior, calibrate on the held-out patients."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PRIOR_SIZE

from klviewer.errors import KlviewerInputError
from klviewer.evaluation.adapt import (
    SLAB_GAP,
    AdaptCancelled,
    AdaptConfig,
    AdaptError,
    adapt_prior,
    patient_series,
    split_by_patient,
)
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.loader import open_images
from klviewer.phantoms import make_phantom
from klviewer.priors.checkpoint import prior_fingerprint, read_weights

SPACING = 400 / TINY_PRIOR_SIZE
SETTINGS = AnalysisSettings(views=8, steps=3, device="cpu")


def _study(folder: Path, name: str, patient: str | None, seeds: range) -> Path:
    hu = np.stack([make_phantom("healthy", TINY_PRIOR_SIZE, seed).hu for seed in seeds]).astype(np.float32)
    np.save(folder / f"{name}.npy", hu)
    sidecar = {"pixel_spacing_mm": SPACING, **({"patient_id": patient} if patient else {})}
    (folder / f"{name}.json").write_text(json.dumps(sidecar))
    return folder / f"{name}.npy"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four patients' healthy slices: two studies of P1, one each of P2, P3 and P4."""
    folder = tmp_path_factory.mktemp("site")
    _study(folder, "p1a", "P1", range(10, 15))
    _study(folder, "p1b", "P1", range(15, 18))
    _study(folder, "p2", "P2", range(20, 26))
    _study(folder, "p3", "P3", range(30, 36))
    _study(folder, "p4", "P4", range(40, 46))
    return folder


def test_whole_patients_are_held_out(site: Path) -> None:
    split = split_by_patient(patient_series(open_images([site])), held_out=0.3, seed=1)
    d = split.describe()
    assert split.method == "patients"
    assert not set(d["train_patients"]) & set(d["held_out_patients"]), "no patient on both sides"
    assert d["train_slices"] + d["held_out_slices"] == 26
    assert 4 <= d["held_out_slices"] <= 13
    if "P1" in d["held_out_patients"]:
        assert all(p.series.uid.endswith(("p1a.npy", "p1b.npy")) or p.patient != "P1" for p in split.held_out)


def test_studies_without_a_patient_id_are_split_by_study(tmp_path: Path) -> None:
    for k in range(3):
        _study(tmp_path, f"anon{k}", None, range(50 + 6 * k, 56 + 6 * k))
    series = patient_series(open_images([tmp_path]))
    assert len({patient for patient, _ in series}) == 3 and all(p.startswith("study:") for p, _ in series)


def test_one_patient_is_cut_into_slabs_with_a_gap(tmp_path: Path) -> None:
    _study(tmp_path, "only", "P9", range(60, 80))
    split = split_by_patient(patient_series(open_images([tmp_path])), held_out=0.3)
    train = [p.index for p in split.train]
    held = [p.index for p in split.held_out]
    assert split.method == "slabs" and held == list(range(14, 20)) and train == list(range(0, 14 - SLAB_GAP))
    assert min(held) - max(train) - 1 == SLAB_GAP


def test_too_few_slices_are_refused_with_the_count(tmp_path: Path) -> None:
    _study(tmp_path, "few", "P1", range(3))
    _study(tmp_path, "few2", "P2", range(3, 6))
    with pytest.raises(AdaptError, match=r"6 slice\(s\) of 2 patient\(s\).*at least 8 for training"):
        split_by_patient(patient_series(open_images([tmp_path])))


def _config(site: Path, out: Path, tiny_prior: Path, **changes) -> AdaptConfig:
    options = {"steps": 4, "batch": 2, "seed": 3, "device": "cpu", "settings": [SETTINGS], "checkpoint_every": 2,
               **changes}
    return AdaptConfig(base=tiny_prior, inputs=[site], out=out, **options)


def test_adapt_makes_a_calibrated_prior_and_leaves_base_and_inputs_alone(site: Path, tiny_prior: Path,
                                                                          tmp_path: Path) -> None:
    before = prior_fingerprint(tiny_prior), sorted(p.name for p in site.iterdir())
    result = adapt_prior(_config(site, tmp_path / "site-prior", tiny_prior))
    assert (prior_fingerprint(tiny_prior), sorted(p.name for p in site.iterdir())) == before
    out = result.out
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["kind"] == "site-adaptation" and config["training"]["steps"] == 4
    assert config["training"]["data"]["split"]["held_out_patients"] == result.split.describe()["held_out_patients"]
    entries = json.loads((out / "calibration.json").read_text())["calibrations"]
    assert len(entries) == 1 and entries[0]["n_healthy"] == len(result.split.held_out)
    assert entries[0]["healthy_inputs"] and "healthy_reference" in entries[0]
    report = (out / "adaptation" / "ADAPTATION.md").read_text()
    assert "Held-out denoising error" in report and (out / "adaptation" / "denoising.png").is_file()
    rows = json.loads((out / "adaptation" / "adaptation.json").read_text())["denoising"]
    assert all(r["base_rmse_hu"] > 0 and r["adapted_rmse_hu"] > 0 for r in rows)
    with pytest.raises(Exception, match="already exists"):
        adapt_prior(_config(site, tmp_path / "site-prior", tiny_prior))


def test_a_cancelled_adaptation_resumes_to_the_same_prior(site: Path, tiny_prior: Path, tmp_path: Path) -> None:
    whole = adapt_prior(_config(site, tmp_path / "whole", tiny_prior))
    cancel = threading.Event()

    def stop_after_two(p) -> None:
        if p.stage == "train" and p.step == 2:
            cancel.set()

    with pytest.raises(AdaptCancelled) as stopped:
        adapt_prior(_config(site, tmp_path / "resumed", tiny_prior), progress=stop_after_two, cancel=cancel)
    assert stopped.value.step == 2 and not (tmp_path / "resumed" / "config.json").exists()
    adapt_prior(_config(site, tmp_path / "resumed", tiny_prior, resume=True))
    a, b = read_weights(whole.out / "model.safetensors"), read_weights(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resuming loses and changes nothing"
    with pytest.raises(AdaptError, match="different inputs or settings"):
        adapt_prior(_config(site, tmp_path / "resumed", tiny_prior, resume=True, batch=3))
    state = tmp_path / "resumed" / "resume" / "state.json"
    state.write_text("[" * 100_000)  # the resume state goes through the bounded JSON reader
    with pytest.raises(KlviewerInputError) as hostile:
        adapt_prior(_config(site, tmp_path / "resumed", tiny_prior, resume=True))
    assert hostile.value.path == state


def test_the_output_may_not_go_into_the_inputs_or_the_base(site: Path, tiny_prior: Path) -> None:
    with pytest.raises(Exception, match="overlaps the input"):
        adapt_prior(_config(site, site / "inside", tiny_prior))
    with pytest.raises(Exception, match="outside the base prior"):
        adapt_prior(_config(site, tiny_prior / "inside", tiny_prior))
