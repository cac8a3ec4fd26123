"""`klviewer batch`: discovery, the results layout, resuming, failures and refusals (local backends)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from dicom_fixtures import ct_dataset, save
from pydicom.uid import MRImageStorage, generate_uid
from test_batch_support import (  # noqa: F401 (one_torch_thread is an autouse fixture)
    N_SLICES,
    N_STUDIES,
    SETTINGS,
    assert_same_results,
    batch_cli,
    cli_args,
    make_archive,
    manifest,
    one_torch_thread,
    result_arrays,
)

from klviewer.batch import BatchObserver, ProcessBackend, discover_studies, run_batch
from klviewer.batch.lock import LOCK_FILE
from klviewer.batch.summary import BatchResult
from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.inference.pipeline import CHAINS_PER_BATCH
from klviewer.priors import EDMUNetPrior, load_prior, save_prior
from klviewer.results.analyze import run_analysis
from klviewer.results.slice_file import load_slice_result


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="module")
def local_run(archive: Path, tiny_prior: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "batch"
    run_batch([archive], out, SETTINGS, prior=tiny_prior)
    return out


@pytest.fixture()
def bad_studies(tmp_path: Path) -> Path:
    """A truncated npz and an MR series: two studies that cannot be analysed."""
    root = tmp_path / "bad"
    root.mkdir()
    (root / "truncated.npz").write_bytes(b"PK\x03\x04 cut off here")
    mr = ct_dataset(np.zeros((16, 16), np.int16), series_uid=generate_uid())
    mr.Modality, mr.SOPClassUID, mr.StudyInstanceUID, mr.PatientID = "MR", MRImageStorage, generate_uid(), "MR1"
    save(mr, root / "mr" / "IM0001.dcm")
    return root


def _sinogram(folder: Path) -> Path:
    folder.mkdir(parents=True)
    np.save(folder / "scan.npy", np.zeros((1, 8, 45), np.float32))
    sidecar = {"klviewer_sinogram": 1, "geometry": "parallel", "angles": {"unit": "deg", "start": 0, "stop": 180, "count": 8},
               "detector": {"count": 45, "spacing_mm": 1.0}, "data": {"kind": "line_integrals", "file": "scan.npy"},
               "grid": {"size": [32, 32], "pixel_spacing_mm": 1.0}}
    (folder / "scan.json").write_text(json.dumps(sidecar))
    return folder


def test_discovery_finds_studies_and_says_why_other_files_are_left_out(archive: Path, tmp_path: Path) -> None:
    sino = _sinogram(tmp_path / "sino")
    found = discover_studies([archive, sino])
    kinds = sorted((s.kind, len(s.inputs)) for s in found.studies)
    assert kinds == [("array", 1), ("array", 1), ("dicom", 2), ("dicom", 2), ("sinogram", 1)]
    dicom = [s for s in found.studies if s.kind == "dicom"]
    assert len({s.study_uid for s in dicom}) == 2 and {s.patient_id for s in dicom} == {"KLV-PHANTOM"}
    assert all(Path(f).parent.name == "dicom" for s in dicom for f in s.inputs)
    assert [s.inputs for s in found.studies if s.kind == "sinogram"] == [(str(sino / "scan.json"),)]
    reasons = {Path(s["path"]).name: s["reason"] for s in found.skipped}
    assert set(reasons) == {"ground_truth.npz", "phantoms.json"}, "scan.npy belongs to its sidecar, not a study of its own"
    assert "none of them an image" in reasons["ground_truth.npz"] and "no matching array" in reasons["phantoms.json"]
    again = discover_studies([archive, sino])
    assert [s.id for s in again.studies] == [s.id for s in found.studies], "ids must be stable between runs"
    assert len({s.id for s in found.studies}) == 5
    with pytest.raises(KlviewerInputError, match="does not exist"):
        discover_studies([tmp_path / "missing"])


def test_each_study_is_an_analyze_results_folder(local_run: Path, archive: Path, tiny_prior: Path, tmp_path: Path) -> None:
    doc = manifest(local_run)
    assert len(doc["studies"]) == N_STUDIES and {s["status"] for s in doc["studies"]} == {"done"}
    assert doc["config"]["settings"]["steps"] == 3 and "device" not in doc["config"]["settings"]
    assert all(s["attempts"] == 1 and s["seconds"] > 0 and s["device"] == "cpu" for s in doc["studies"])

    summary = json.loads((local_run / "batch_summary.json").read_text())
    assert [Path(s["path"]).name for s in summary["skipped"]].count("ground_truth.npz") == 2
    assert summary["counts"] == {"studies": 4, "done": 4, "failed": 0, "pending": 0, "slices": N_SLICES,
                                 "flagged": 0, "skipped_files": 4}
    assert len({(r["study"], r["case"], r["slice_index"]) for r in summary["rows"]}) == N_SLICES
    # The tiny prior has no calibration for 3 steps: the report says that nothing could be flagged,
    # not "0 flagged".
    assert {r["verdict"] for r in summary["rows"]} == {"cannot flag"}
    report = BatchResult(local_run, "local", [], summary["rows"]).report()
    assert f"slices: {N_SLICES} analysed, {N_SLICES} cannot flag (no calibrated rule for these settings)" in report
    assert "0 flagged" not in report
    mixed = [{"flagged": True, "verdict": "flagged", "file": "a.npz", "score": 1.0, "input": "a.dcm"},
             {"flagged": False, "verdict": "prior mismatch"}, {"flagged": False}]
    assert "3 analysed, 1 flagged, 1 not flagged, 1 prior mismatch (the prior does not fit the study)" in \
        BatchResult(local_run, "local", [], mixed).report()
    for row in summary["rows"]:
        result = load_slice_result(local_run / row["file"])
        assert result.score == pytest.approx(row["score"], rel=1e-5)

    # A study's folder is what `klviewer analyze` writes for the same files and settings, bit for bit.
    study = next(s for s in doc["studies"] if s["kind"] == "dicom")
    assert study["files"] == 2 and Path(study["source"]) in (archive / "setA" / "dicom", archive / "setB" / "dicom")
    single = run_analysis([study["source"]], tmp_path / "single", SETTINGS, prior=tiny_prior)
    batch_rows = json.loads((local_run / study["results"] / "summary.json").read_text())["rows"]
    assert [{**r, "seconds": 0} for r in batch_rows] == [{**r, "seconds": 0} for r in single.rows]
    for row in single.rows:
        a = np.load(tmp_path / "single" / row["file"])
        b = np.load(local_run / study["results"] / row["file"])
        assert all(np.array_equal(a[k], b[k]) for k in a.files if k != "metadata")
    assert not any(p.name.startswith(".") for p in (local_run / "studies").iterdir())
    assert not list(archive.rglob("summary.json")), "nothing is written into the inputs"


def test_a_failing_study_is_recorded_and_the_rest_finish(archive: Path, bad_studies: Path, tiny_prior: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "batch"
    code = batch_cli([str(archive), str(bad_studies), "--out", str(out), *cli_args(tiny_prior)])
    assert code == 1, "a failed study makes the exit code 1"
    records = {s["id"]: s for s in manifest(out)["studies"]}
    failed = {Path(s["source"]).name: s["reason"] for s in records.values() if s["status"] == "failed"}
    assert set(failed) == {"truncated.npz", "IM0001.dcm"}
    assert "not a readable numpy array" in failed["truncated.npz"]
    assert "modality is MR" in failed["IM0001.dcm"]
    assert sum(s["status"] == "done" for s in records.values()) == N_STUDIES
    assert len(result_arrays(out)) == N_SLICES
    printed = capsys.readouterr().out
    assert f"{N_STUDIES + 2} studies, {N_STUDIES} done, 2 failed" in printed
    assert "modality is MR" in printed and "not a readable numpy array" in printed
    assert sorted(p.name for p in (out / "studies").iterdir()) == sorted(
        s["id"] for s in records.values() if s["status"] == "done")


class _StopAfter(BatchObserver):
    """Raises after `n` studies, as a crash or a kill between studies would stop the batch."""

    def __init__(self, n: int | None = None) -> None:
        self.n, self.finished = n, []

    def on_study(self, record) -> None:
        self.finished.append(record.id)
        if self.n is not None and len(self.finished) == self.n:
            raise RuntimeError("power cut")


def test_an_interrupted_batch_resumes_with_every_study_exactly_once(archive: Path, tiny_prior: Path, local_run: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "batch"
    first = _StopAfter(2)
    with pytest.raises(RuntimeError, match="power cut"):
        run_batch([archive], out, SETTINGS, prior=tiny_prior, observer=first)
    assert [s["status"] for s in manifest(out)["studies"]].count("done") == 2
    assert not (out / LOCK_FILE).exists(), "the lock is released however the run ends"
    kept = {p: p.stat().st_mtime_ns for p in (out / "studies").rglob("*.npz")}

    # What a kill in the middle of a study leaves, and a study whose folder was renamed into
    # place just before the kill, so the manifest never heard of it.
    pending = [s for s in manifest(out)["studies"] if s["status"] == "pending"]
    killed = out / "studies" / f".{pending[0]['id']}.deadbeef.partial"
    (killed / "case").mkdir(parents=True)
    (killed / "case" / "0000.npz").write_bytes(b"half a file")
    doc = manifest(out)
    done_id = first.finished[0]
    next(s for s in doc["studies"] if s["id"] == done_id)["status"] = "pending"
    (out / "manifest.json").write_text(json.dumps(doc))

    second = _StopAfter()
    result = run_batch([archive], out, SETTINGS, prior=tiny_prior, observer=second)
    assert sorted(second.finished) == sorted(s["id"] for s in pending), "only unfinished studies run again"
    assert sorted(result.already_done) == sorted(first.finished)
    assert all(s["status"] == "done" and s["attempts"] == 1 for s in manifest(out)["studies"])
    assert not killed.exists()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "finished results are never redone"
    keys = [(r["study"], r["case"], r["slice_index"]) for r in result.rows]
    assert len(keys) == len(set(keys)) == N_SLICES
    assert_same_results(out, local_run)


def test_cancel_stops_inside_a_study_and_leaves_it_to_the_next_run(archive: Path, tiny_prior: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(CHAINS_PER_BATCH, "cpu", 1)  # one slice at a time, so a cancel can land between two slices
    out = tmp_path / "batch"
    cancel = threading.Event()

    class CancelAfterOneSlice(BatchObserver):
        def on_slice(self, progress) -> None:
            if progress.done == 1:
                cancel.set()

    result = run_batch([archive], out, SETTINGS, prior=tiny_prior, observer=CancelAfterOneSlice(), cancel=cancel)
    assert result.cancelled and result.ran == []
    assert {s["status"] for s in manifest(out)["studies"]} == {"pending"}
    assert not (out / "studies").exists() or not any((out / "studies").iterdir()), "no partial study is left behind"
    result = run_batch([archive], out, SETTINGS, prior=tiny_prior)
    assert len(result.ran) == N_STUDIES and len(result.rows) == N_SLICES


def test_other_settings_or_prior_are_refused_on_a_rerun(local_run: Path, archive: Path, tiny_prior: Path,
                                                      tmp_path: Path) -> None:
    before = (local_run / "manifest.json").read_text()
    with pytest.raises(KlviewerInputError, match=r"steps 3 then, 4 now.*new --out folder"):
        run_batch([archive], local_run, dataclasses.replace(SETTINGS, steps=4), prior=tiny_prior)
    with pytest.raises(KlviewerInputError, match="slices 'all' then, 'mid' now"):
        run_batch([archive], local_run, SETTINGS, prior=tiny_prior, slices="mid")
    other = load_prior(tiny_prior)
    assert isinstance(other, EDMUNetPrior)
    next(other.parameters()).data.add_(1.0)
    with pytest.raises(KlviewerInputError, match="prior weights"):
        run_batch([archive], local_run, SETTINGS, prior=save_prior(other, tmp_path / "other-prior"))
    assert (local_run / "manifest.json").read_text() == before
    # The device only says where to run: a re-run on another one finds everything done.
    result = run_batch([archive], local_run, dataclasses.replace(SETTINGS, device="auto"), prior=tiny_prior)
    assert result.ran == [] and len(result.already_done) == N_STUDIES


def test_bad_inputs_and_output_folders_are_refused(archive: Path, tiny_prior: Path, local_run: Path, tmp_path: Path) -> None:
    with pytest.raises(KlviewerInputError, match="missing.*does not exist"):
        run_batch([archive, tmp_path / "missing"], tmp_path / "o1", SETTINGS, prior=tiny_prior)
    with pytest.raises(KlviewerInputError, match="overlaps the input"):
        run_batch([archive], archive / "setA" / "results", SETTINGS, prior=tiny_prior)
    with pytest.raises(KlviewerInputError, match="overlaps the input"):
        run_batch([local_run / "studies"], local_run, SETTINGS, prior=tiny_prior)
    stranger = tmp_path / "someone-elses"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(KlviewerInputError, match="holds no batch manifest.json"):
        run_batch([archive], stranger, SETTINGS, prior=tiny_prior)
    empty = tmp_path / "empty-inputs"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(KlviewerInputError, match="no studies found.*readme.txt: not a DICOM file"):
        run_batch([empty], tmp_path / "o2", SETTINGS, prior=tiny_prior)
    with pytest.raises(KlviewerInputError, match="slice spec"):
        run_batch([archive], tmp_path / "o3", SETTINGS, prior=tiny_prior, slices="two")
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))
    assert (stranger / "notes.txt").read_text() == "keep me"
    with pytest.raises(KlviewerInputError, match="go with --export"):
        batch_cli([str(archive), "--out", str(tmp_path / "o4"), "--export-formats", "png", *cli_args(tiny_prior)])


def test_one_batch_at_a_time_and_a_dead_runs_lock_is_taken_over(local_run: Path, archive: Path, tiny_prior: Path) -> None:
    lock = local_run / LOCK_FILE
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    try:
        with pytest.raises(KlviewerError, match=f"in use by another klviewer batch \\(pid {os.getpid()}"):
            run_batch([archive], local_run, SETTINGS, prior=tiny_prior)
        gone = subprocess.Popen(["true"])
        gone.wait()
        lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "then"}))
        result = run_batch([archive], local_run, SETTINGS, prior=tiny_prior)
        assert len(result.already_done) == N_STUDIES and not lock.exists()
    finally:
        lock.unlink(missing_ok=True)


def test_worker_processes_give_the_same_bits(archive: Path, tiny_prior: Path, local_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "batch"
    result = run_batch([archive], out, SETTINGS, prior=tiny_prior, backend=ProcessBackend(2))
    assert result.backend.startswith("2 local worker processes")
    workers = {s["worker"] for s in manifest(out)["studies"]}
    assert workers and not any(w.endswith(f":{os.getpid()}") for w in workers), "studies ran in worker processes"
    assert_same_results(out, local_run)
