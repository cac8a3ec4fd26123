"""`klviewer batch --export`: finished studies' flagged cases go to export/<study>/, once each."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ParametricMapStorage
from test_batch_support import SETTINGS, batch_cli, cli_args, make_archive, manifest

from klviewer.batch import ExportOptions, run_batch
from klviewer.errors import KlviewerError, KlviewerInputError



@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_archive(tmp_path_factory.mktemp("archive"))


def test_export_chains_into_the_batch_and_runs_once_per_study(archive: Path, tiny_prior: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "batch"
    args = [str(archive / "setA"), str(archive / "arrays" / "one.npz"), "--out", str(out), *cli_args(tiny_prior),
            "--flag-threshold", "1e-9", "--export", "--export-formats", "dicom,png,csv"]
    assert batch_cli(args) == 0
    studies = {s["kind"]: s for s in manifest(out)["studies"]}
    assert {s["export"]["status"] for s in studies.values()} == {"done"}
    dicom_export = out / studies["dicom"]["export"]["folder"]
    cases = json.loads((dicom_export / "cases.json").read_text())
    assert len(cases["cases"]) == studies["dicom"]["export"]["cases"] == 1
    parametric = pydicom.dcmread(next(dicom_export.rglob("parametric_map.dcm")))
    assert parametric.SOPClassUID == ParametricMapStorage
    assert list((out / studies["array"]["export"]["folder"]).rglob("*_overlay.png"))
    assert not list((out / studies["array"]["export"]["folder"]).rglob("*.dcm")), "no DICOM for array inputs"
    assert "exported 2 case(s)" in capsys.readouterr().out

    written = {p: p.stat().st_mtime_ns for p in (out / "export").rglob("*") if p.is_file()}
    assert batch_cli(args) == 0
    assert {p: p.stat().st_mtime_ns for p in written} == written, "a re-run does not export a study again"


def test_a_failed_export_is_recorded_and_retried_alone(archive: Path, tiny_prior: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import klviewer.export

    calls: list[dict[str, Any]] = []

    def fake_export(results_dir: Path, out: Path, **options: Any) -> Any:
        calls.append({"results": Path(results_dir), "out": Path(out), **options})
        if "stack" in Path(results_dir).name and len(calls) <= 2:
            raise KlviewerError(f"{out}: disk full")
        return klviewer.export.ExportReport(Path(out), [klviewer.export.CaseExport("case", Path(out))], [])

    monkeypatch.setattr(klviewer.export, "export_results", fake_export)
    settings = dataclasses.replace(SETTINGS, flag_threshold=1e-9)
    inputs = [archive / "arrays"]
    options = ExportOptions(formats=("png",), flagged_only=True)
    first = run_batch(inputs, tmp_path / "b", settings, prior=tiny_prior, export=options)
    exports = {r.id.split("-")[0]: r.export for r in first.studies}
    stack = next(r.id for r in first.studies if r.id.startswith("stack"))
    assert exports["stack"] == {"status": "failed", "reason": f"{tmp_path / 'b' / 'export' / stack}: disk full"}
    assert exports["one"]["status"] == "done" and exports["one"]["cases"] == 1
    assert [c["overwrite"] for c in calls] == [False, False]
    assert all(c["results"].parent == tmp_path / "b" / "studies" and c["out"].parent == tmp_path / "b" / "export"
               and c["formats"] == ("png",) and c["flagged_only"] and c["flag_threshold"] == 1e-9 for c in calls)
    assert "1 export(s) failed" in first.report()

    second = run_batch(inputs, tmp_path / "b", settings, prior=tiny_prior, export=options)
    assert [c["results"].name.split("-")[0] for c in calls[2:]] == ["stack"], "only the failed export runs again"
    assert calls[2]["overwrite"], "over its own earlier attempt"
    assert {r.export["status"] for r in second.studies} == {"done"}

    quiet = run_batch(inputs, tmp_path / "c", dataclasses.replace(SETTINGS, flag_threshold=1e9), prior=tiny_prior,
                      export=options)
    assert len(calls) == 3 and {r.export["status"] for r in quiet.studies} == {"nothing flagged"}

    with pytest.raises(KlviewerInputError, match="unknown export format.*gif"):
        run_batch(inputs, tmp_path / "d", settings, prior=tiny_prior, export=ExportOptions(formats=("gif",)))
    assert not (tmp_path / "d").exists(), "refused before any work"
