"""PNG overlays, the one-page PDF report and the case tables."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from export_fixtures import ResultsFixture, make_results, threshold_between
from PIL import Image

from klviewer import __version__
from klviewer.export import export_results
from klviewer.export.images import OUTLINE_RGB, OverlayStyle, grey_uint8, overlay_rgb
from klviewer.export.pdf_report import ReportContext, report_sections
from klviewer.results.reader import read_results
from klviewer.results.slice_file import load_slice_result

NOTE = "Hypodense focus in segment VII; compare with the prior study."


@pytest.fixture(scope="module")
def fx(tiny_prior: Path, tmp_path_factory: pytest.TempPathFactory) -> ResultsFixture:
    return make_results(tmp_path_factory.mktemp("export-reports"), tiny_prior)


@pytest.fixture(scope="module")
def threshold(fx: ResultsFixture) -> float:
    return threshold_between(list(fx.case_scores().values()))


@pytest.fixture(scope="module")
def report(fx: ResultsFixture, threshold: float, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("export-reports-out") / "export"
    return export_results(fx.results, out, flagged_only=False, formats=("png", "pdf", "csv"), flag_threshold=threshold,
                          notes={"S002-abdomen": NOTE})


def test_overlay_colours_outlines_and_transparency() -> None:
    base = np.full((16, 16), 40.0)  # mid-grey in a 40/400 window
    kl = np.zeros((16, 16))
    kl[4:8, 4:8] = 10.0   # above the threshold: coloured and outlined
    kl[8:12, 8:12] = 4.0  # coloured, not flagged
    kl[0:4, 12:16] = 1.0  # below a fifth of the peak: left transparent
    style = OverlayStyle.for_map(kl, threshold=5.0)
    assert style.levels == (0.0, 7.5) and style.cut == pytest.approx(2.0), "a fixed range: 1.5 x the threshold"
    rgb = overlay_rgb(base, kl, (40, 400), style)
    grey = grey_uint8(base, (40, 400))[0, 0]
    assert grey == 128
    assert tuple(rgb[0, 0]) == (grey,) * 3 and tuple(rgb[1, 13]) == (grey,) * 3
    assert tuple(rgb[4, 4]) == tuple(round(c * 255) for c in OUTLINE_RGB)  # patch border
    inside, unflagged = rgb[5, 5].astype(int), rgb[9, 9].astype(int)
    assert np.ptp(inside) > 40 and np.ptp(unflagged) > 20, "heat map colours, not grey"
    assert inside.sum() > unflagged.sum(), "inferno: more KL is brighter"
    assert tuple(rgb[9, 8]) != tuple(rgb[4, 4]), "unflagged patches are not outlined"
    assert OverlayStyle.for_map(kl, None).levels == (0.0, 10.0) and OverlayStyle.for_map(kl * 0, None).levels == (0.0, 1.0)
    by_z = OverlayStyle.for_map(kl, threshold=5.0, nats_rule=False)
    assert by_z.threshold is None and not by_z.flagged_mask(kl).any(), "under the z rule no nats threshold outlines"
    rgb_z = overlay_rgb(base, kl, (40, 400), by_z, flagged=np.zeros(kl.shape, bool))
    assert not (rgb_z == np.round(np.array(OUTLINE_RGB) * 255).astype(np.uint8)).all(axis=2).any()
    with pytest.raises(ValueError):
        overlay_rgb(base, kl[:8], (40, 400), style)


def test_pngs_are_the_windowed_images(fx: ResultsFixture, report, threshold: float) -> None:
    case = next(c for c in report.cases if c.case == "S002-abdomen")
    rows = {r["slice_index"]: r for r in fx.summary["rows"] if r["case"] == "S002-abdomen"}
    assert rows[0]["score"] > threshold >= rows[1]["score"]
    # Pictures of the flagged slice only; the unflagged one is in the Parametric Map and the tables.
    assert sorted(p.name for p in (case.folder / "png").iterdir()) == [
        "0000_fbp.png", "0000_original.png", "0000_overlay.png", "0000_reconstruction.png"]
    result = load_slice_result(fx.results / rows[0]["file"])
    window = (40.0, 400.0)  # write_ct_series' default window, read from the source series
    grid = result.grid_transform
    assert grid is not None and not grid.is_identity(), "the fixture's 40x48 slices are resampled onto the prior's grid"
    for name, image in (("reconstruction", result.recon_hu), ("fbp", result.fbp_hu), ("original", result.original_hu)):
        png = np.asarray(Image.open(case.folder / "png" / f"0000_{name}.png"))
        assert png.shape == grid.source_shape, "pictures show the source geometry"
        np.testing.assert_array_equal(png, grey_uint8(grid.resample_to_source(image, fill=-1000.0), window))
    overlay = np.asarray(Image.open(case.folder / "png" / "0000_overlay.png"))
    assert overlay.ndim == 3 and overlay.shape[1] >= 384 + 110 and overlay.shape[1] > overlay.shape[0], \
        "the 40 x 48 source slice enlarged to at least 384 px across, plus the colour bar"
    array_case = next(c for c in report.cases if c.case == "stack.npy")
    assert (array_case.folder / "png" / "0000_original.png").is_file()


def test_sinogram_input_exports_without_original_or_dicom(tiny_prior: Path, tmp_path: Path) -> None:
    from klviewer.inference.settings import AnalysisSettings
    from klviewer.results.analyze import run_analysis

    folder = tmp_path / "scan"
    folder.mkdir()
    rng = np.random.default_rng(5)
    np.save(folder / "scan.npy", (2.0 + 0.1 * rng.random((1, 12, 46))).astype(np.float32))
    (folder / "scan.json").write_text(json.dumps({
        "klviewer_sinogram": 1, "geometry": "parallel", "angles": {"unit": "deg", "start": 0, "stop": 180, "count": 12},
        "detector": {"count": 46, "spacing_mm": 10.0}, "data": {"kind": "line_integrals"},
        "grid": {"size": [32, 32], "pixel_spacing_mm": 12.5},
    }))
    run_analysis([folder / "scan.json"], tmp_path / "results", AnalysisSettings(steps=3, device="cpu"), prior=tiny_prior)
    report = export_results(tmp_path / "results", tmp_path / "out", flagged_only=False)
    case = report.cases[0]
    assert case.error is None and any("sinogram" in reason for reason in case.skipped)
    names = sorted(p.name for p in case.files)
    assert names == ["0000_fbp.png", "0000_overlay.png", "0000_reconstruction.png", "report.pdf"]
    table = json.loads((report.out / "cases.json").read_text())["cases"][0]
    assert table["source_kind"] == "sinogram" and table["patient"].startswith("not recorded")


def test_pdf_is_one_page_with_the_case_in_its_metadata(report) -> None:
    for case in report.cases:
        data = (case.folder / "report.pdf").read_bytes()
        assert data.startswith(b"%PDF") and b"/Count 1" in data
        assert len(re.findall(rb"/Type /Page\b(?!s)", data)) == 1
        assert f"/Title (klviewer case report: {case.case})".encode() in data
        assert f"/Creator (klviewer {__version__})".encode() in data


def test_report_text_has_scores_flag_note_settings_and_provenance(fx: ResultsFixture, threshold: float) -> None:
    results = read_results(fx.results)
    case = results.case("S002-abdomen")
    flagged = {s.slice_index for s in case.flagged_slices(threshold)}
    ctx = ReportContext(case=case, patient="Doe^Jane (ID P-111)", flagged_slices=flagged, threshold=threshold,
                        threshold_source="export --flag-threshold", note=NOTE, settings=results.settings,
                        prior=results.prior, analysis_version="0.0.9", analysis_date="2024-01-02",
                        export_date="2024-02-03")
    sections = dict(report_sections(ctx))
    text = "\n".join(line for lines in sections.values() for line in lines)
    top = max(r["score"] for r in fx.summary["rows"] if r["case"] == "S002-abdomen")
    assert sections["Result"][0].startswith("Flag: FLAGGED") and f"{threshold:.4g} nats" in sections["Result"][0]
    assert f"{top:.4g} nats" in sections["Result"][1]
    assert sections["Note"] == [NOTE]
    assert "4 steps" in text and "seed 1" in text and "guidance pigdm" in text and "24 simulated" in text
    assert "relative energy (pigdm guidance)" in " ".join(sections["Sampler"]), "the report says what the nats are"
    assert fx.summary["prior"]["sha256"] in text and "klviewer 0.0.9 on 2024-01-02" in text
    assert f"klviewer {__version__} on 2024-02-03" in text
    assert len(sections["Slices"]) == 2

    long_note = ReportContext(**{**ctx.__dict__, "note": "word " * 400, "flagged_slices": set()})
    long_sections = dict(report_sections(long_note))
    assert len(long_sections["Note"]) == 6 and "cases.json" in long_sections["Note"][-1]
    assert long_sections["Result"][0].startswith("Flag: not flagged")


def test_case_tables(fx: ResultsFixture, report, threshold: float) -> None:
    with open(report.out / "cases.csv") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    scores = fx.case_scores()
    assert set(rows) == set(scores)
    for name, row in rows.items():
        assert float(row["score_nats"]) == pytest.approx(scores[name])
        assert row["flagged"] == str(scores[name] > threshold) and row["status"] == "exported"
        assert row["verdict"] == ("flagged" if scores[name] > threshold else "not flagged")
        assert row["flag_rule"] == "largest_patch_kl_nats" and row["z_threshold"] == ""
        assert float(row["nats_threshold"]) == pytest.approx(threshold), "a threshold in nats, in a column that says so"
    assert rows["S002-abdomen"]["note"] == NOTE and rows["S002-abdomen"]["slices"] == "2"
    assert rows["S002-abdomen"]["patient"].startswith("Doe^Jane (ID P-111)")
    assert rows["stack.npy"]["source_kind"] == "array" and "report.pdf" in rows["stack.npy"]["files"]
    doc = json.loads((report.out / "cases.json").read_text())
    assert doc["prior"]["sha256"] == fx.summary["prior"]["sha256"] and doc["selection"] == "all cases"
    assert doc["analysis"]["settings"]["steps"] == 4 and doc["formats"] == ["csv", "pdf", "png"]
    case = next(c for c in doc["cases"] if c["case"] == "S002-abdomen")
    assert [s["slice_index"] for s in case["slices"]] == [0, 1] and case["top_slice"] in (0, 1)
    assert doc["slice_numbering"] == "from 0" and {"score_nats", "total_kl_nats", "verdict"} <= set(case["slices"][0])
    assert all(Path(report.out / f).is_file() for c in doc["cases"] for f in c["files"])
