"""Bad input and safe writing: missing or partial results, unwritable targets, failures midway,
no overwriting without being asked, nothing written into input folders."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from export_fixtures import ResultsFixture, make_results, threshold_between

import klviewer.export.exporter as exporter
from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.export import export_results
from klviewer.io.safe_write import OutputExistsError


@pytest.fixture(scope="module")
def fx(tiny_prior: Path, tmp_path_factory: pytest.TempPathFactory) -> ResultsFixture:
    return make_results(tmp_path_factory.mktemp("export-safety"), tiny_prior)


@pytest.fixture()
def results_copy(fx: ResultsFixture, tmp_path: Path) -> Path:
    """A private copy of the results folder that a test may damage."""
    copy = tmp_path / "results-copy"
    shutil.copytree(fx.results, copy)
    return copy


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_missing_results_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(KlviewerInputError, match="does not exist") as info:
        export_results(tmp_path / "nowhere", tmp_path / "out")
    assert info.value.path == tmp_path / "nowhere"
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(KlviewerInputError, match="is not a folder"):
        export_results(tmp_path / "file.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unfinished_analysis_without_summary(results_copy: Path, tmp_path: Path) -> None:
    (results_copy / "summary.json").unlink()
    with pytest.raises(KlviewerInputError, match=r"did not finish \(found 6 slice file") as info:
        export_results(results_copy, tmp_path / "out")
    assert info.value.path == results_copy / "summary.json"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KlviewerInputError, match="not a results folder"):
        export_results(empty, tmp_path / "out")


def test_slice_file_listed_but_missing(results_copy: Path, fx: ResultsFixture, tmp_path: Path) -> None:
    victim = results_copy / fx.summary["rows"][3]["file"]
    victim.unlink()
    with pytest.raises(KlviewerInputError, match="missing.*incomplete") as info:
        export_results(results_copy, tmp_path / "out", flagged_only=False)
    assert info.value.path == victim.resolve()
    assert not (tmp_path / "out").exists(), "refused before writing anything"


@pytest.mark.parametrize(("damage", "message"), [
    (lambda s: s[: len(s) // 2], "not valid JSON"),
    (lambda s: json.dumps({"rows": []}), "no 'prior' field"),
    (lambda s: s.replace('"slice_index"', '"slice"', 1), "row 0 lacks slice_index"),
    (lambda s: s.replace('"file": "', '"file": "../../', 1), "points outside the results folder"),
    (lambda s: s.replace('"case": "', '"case": "../', 1), "not a plain folder name"),
])
def test_damaged_summary_is_refused_naming_it(results_copy: Path, tmp_path: Path, damage, message: str) -> None:
    summary = results_copy / "summary.json"
    summary.write_text(damage(summary.read_text()))
    with pytest.raises(KlviewerInputError, match=message) as info:
        export_results(results_copy, tmp_path / "out", flagged_only=False)
    assert info.value.path == summary


def test_corrupt_slice_file_fails_only_its_case(results_copy: Path, fx: ResultsFixture, tmp_path: Path) -> None:
    row = next(r for r in fx.summary["rows"] if r["case"] == "S004-chest")
    (results_copy / row["file"]).write_bytes(b"not a zip file")
    report = export_results(results_copy, tmp_path / "out", flagged_only=False, formats=("png", "csv"))
    assert [c.case for c in report.failed] == ["S004-chest"]
    assert "not a readable numpy array" in report.failed[0].error and row["file"] in report.failed[0].error
    assert not (tmp_path / "out" / "S004-chest").exists()
    assert len(report.cases) == 4 and all((report.out / c.case).is_dir() for c in report.cases if c.error is None)


def test_output_may_not_overlap_results_or_sources(fx: ResultsFixture) -> None:
    for bad in (fx.results, fx.results / "export", fx.sources / "jane_a" / "export", fx.sources, fx.root):
        with pytest.raises(KlviewerInputError, match="overlaps the input"):
            export_results(fx.results, bad, flagged_only=False)
    assert not (fx.results / "export").exists() and not (fx.sources / "jane_a" / "export").exists()


def test_target_under_a_file_is_refused(fx: ResultsFixture, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(KlviewerInputError, match="cannot write the export here") as info:
        export_results(fx.results, blocker / "export", flagged_only=False)
    assert info.value.path == blocker / "export"
    with pytest.raises(KlviewerInputError, match="not a folder"):
        export_results(fx.results, blocker, flagged_only=False)


def test_folder_without_write_permission_is_refused(fx: ResultsFixture, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("root ignores permission bits; test_target_under_a_file_is_refused covers the refusal")
        with pytest.raises(KlviewerInputError, match="cannot write the export here.*ermission"):
            export_results(fx.results, locked / "export", flagged_only=False)
        with pytest.raises(KlviewerInputError, match="cannot write the export here"):
            export_results(fx.results, locked, flagged_only=False)
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_failure_midway_leaves_no_half_written_case(fx: ResultsFixture, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_pdf = exporter.write_report_pdf

    def disk_full_on_one_case(handle, ctx, panels, style, **options):
        if ctx.case.name == "S003-abdomen_late":
            handle.write(b"%PDF-1.4 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_pdf(handle, ctx, panels, style, **options)

    monkeypatch.setattr(exporter, "write_report_pdf", disk_full_on_one_case)
    out = tmp_path / "out"
    report = export_results(fx.results, out, flagged_only=False, formats=("png", "pdf", "csv"))
    assert [c.case for c in report.failed] == ["S003-abdomen_late"]
    failed = report.failed[0]
    assert "No space left on device" in failed.error and failed.folder is None and failed.files == []
    assert not (out / "S003-abdomen_late").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["S002-abdomen", "S004-chest", "stack.npy", "cases.csv", "cases.json"]), "no staging folders left behind"
    for case in report.cases:
        if case.error is None:
            assert (case.folder / "report.pdf").is_file() and all(p.is_file() for p in case.files)
    table = json.loads((out / "cases.json").read_text())
    status = {c["case"]: (c["status"], c["error"]) for c in table["cases"]}
    assert status["S003-abdomen_late"][0] == "failed" and "No space left" in status["S003-abdomen_late"][1]
    assert status["S002-abdomen"] == ("exported", "")


def test_unexpected_error_fails_its_case_and_cleans_up(fx: ResultsFixture, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An error nobody foresaw is reported against each case it hits, with its type and where it came
    from; the export goes on with the other cases, and no staging folder is left behind."""
    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(exporter, "write_png", broken)
    out = tmp_path / "out"
    report = export_results(fx.results, out, flagged_only=False, formats=("png",))
    assert len(report.failed) == len(report.cases) == 4
    assert all(c.error.startswith("unexpected RuntimeError (in test_export_safety.py:") and c.error.endswith("bug")
               for c in report.failed)
    assert list(out.iterdir()) == []


def test_no_overwrite_unless_asked(fx: ResultsFixture, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = export_results(fx.results, out, cases=["S004-chest"], formats=("png", "csv"))
    before = _tree(out)
    with pytest.raises(OutputExistsError) as info:
        export_results(fx.results, out, cases=["stack.npy", "S004-chest"], formats=("png", "csv"))
    assert info.value.path == out / "S004-chest"
    assert _tree(out) == before and not (out / "stack.npy").exists(), "a refusal writes nothing"
    with pytest.raises(OutputExistsError, match="cases.csv"):
        export_results(fx.results, out, cases=["stack.npy"], formats=("png", "csv"))

    (first.cases[0].folder / "stale.txt").write_text("from an older export")
    again = export_results(fx.results, out, cases=["S004-chest"], formats=("png", "csv"), overwrite=True)
    assert not again.failed and not (out / "S004-chest" / "stale.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["S004-chest", "cases.csv", "cases.json"]
    assert sorted(p.name for p in again.cases[0].files) == sorted(p.name for p in first.cases[0].files)


def test_selection_thresholds_and_options(fx: ResultsFixture, tmp_path: Path) -> None:
    # The tiny prior has no calibration, so the analysis flagged nothing.
    none = export_results(fx.results, tmp_path / "none")
    assert none.cases == [] and not (tmp_path / "none").exists()

    scores = fx.case_scores()
    threshold = threshold_between(list(scores.values()))
    calls: list[tuple[int, int]] = []
    report = export_results(fx.results, tmp_path / "some", flag_threshold=threshold, formats=("csv",),
                            progress=lambda done, total: calls.append((done, total)))
    expected = sorted(c for c, s in scores.items() if s > threshold)
    assert sorted(c.case for c in report.cases) == expected and 0 < len(expected) < len(scores)
    assert calls == [(k, len(expected)) for k in range(len(expected) + 1)]
    assert all(c.folder is None and c.files == [] for c in report.cases), "csv alone writes only the tables"
    assert sorted(p.name for p in (tmp_path / "some").iterdir()) == ["cases.csv", "cases.json"]
    table = json.loads((tmp_path / "some" / "cases.json").read_text())
    assert table["nats_threshold"] == threshold and table["flag_threshold_source"] == "export --flag-threshold"
    assert table["flag_rule"] == "largest_patch_kl_nats" and table["z_threshold"] is None
    assert all(c["flagged"] and c["score_nats"] > threshold for c in table["cases"])

    everything = export_results(fx.results, tmp_path / "all", flagged_only=False, formats="csv")
    assert sorted(c.case for c in everything.cases) == sorted(scores)
    with pytest.raises(KlviewerInputError, match="no case named 'nope'"):
        export_results(fx.results, tmp_path / "x", cases=["nope"])
    with pytest.raises(KlviewerInputError, match="export formats"):
        export_results(fx.results, tmp_path / "x", formats=("dicom", "tiff"))
    with pytest.raises(KlviewerInputError, match="positive"):
        export_results(fx.results, tmp_path / "x", flag_threshold=-1.0)
    assert not (tmp_path / "x").exists()


def test_export_writes_nothing_into_inputs(fx: ResultsFixture, tmp_path: Path) -> None:
    before = {folder: _tree(folder) for folder in (fx.results, fx.sources)}
    export_results(fx.results, tmp_path / "out", flagged_only=False, formats=("png", "csv"))
    assert {folder: _tree(folder) for folder in (fx.results, fx.sources)} == before


def test_cli(fx: ResultsFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from klviewer.cli.export import register

    parser = argparse.ArgumentParser(prog="klviewer")
    register(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> int:
        args = parser.parse_args(["export", *argv])
        return args.func(args)

    out = tmp_path / "out"
    threshold = threshold_between(list(fx.case_scores().values()))
    assert run(str(fx.results), "--out", str(out), "--quiet") == 0
    assert "no flagged cases" in capsys.readouterr().out and not out.exists()
    code = run(str(fx.results), "--out", str(out), "--flag-threshold", str(threshold), "--formats", "png,csv",
               "--note", "S002-abdomen=check the liver", "--quiet")
    printed = capsys.readouterr().out
    assert code == 0 and "exported" in printed and "S002-abdomen" in printed
    notes = {c["case"]: c["note"] for c in json.loads((out / "cases.json").read_text())["cases"]}
    assert notes["S002-abdomen"] == "check the liver"
    with pytest.raises(KlviewerError):
        run(str(fx.results), "--out", str(out), "--flag-threshold", str(threshold), "--quiet")
    for bad in (["--formats", "gif"], ["--flag-threshold", "0"], ["--note", "no-equals-sign"], ["--all", "--flagged-only"]):
        with pytest.raises(SystemExit):
            run(str(fx.results), "--out", str(out), *bad)


def test_cancel_stops_between_cases(fx: ResultsFixture, tmp_path: Path) -> None:
    import threading

    cancel = threading.Event()
    report = export_results(fx.results, tmp_path / "out", flagged_only=False, formats=("png", "csv"), cancel=cancel,
                            progress=lambda done, total: cancel.set() if done == 1 else None)
    assert report.cancelled and [c.error for c in report.cases] == [None]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([report.cases[0].case, "cases.csv", "cases.json"])
    assert [c["case"] for c in json.loads((tmp_path / "out" / "cases.json").read_text())["cases"]] == [report.cases[0].case]


def test_app_export_job_cancel_keeps_finished_cases_and_their_tables(fx: ResultsFixture, tmp_path: Path) -> None:
    import threading

    from klviewer.app.export_job import ExportRequest, run_export

    cancel = threading.Event()
    request = ExportRequest(out=tmp_path / "out", results_dir=fx.results, flagged_only=False, formats=("png", "csv"))
    summary = run_export(request, lambda done, total, text: cancel.set() if done == 1 else None, cancel)
    (case,) = summary.cases
    assert case.error is None and summary.outcomes[0].report.cancelled
    assert [c["case"] for c in json.loads((tmp_path / "out" / "cases.json").read_text())["cases"]] == [case.case]
