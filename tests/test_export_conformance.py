"""Exported DICOM validates with dciodvfy (dicom3tools): every Parametric Map, Segmentation and
Secondary Capture, for sources with a Frame of Reference and without one (pydicom-data's
693_UNCR.dcm), plain and de-identified; and klviewer's own CT writer validates too.

dicom3tools is a Debian package. The test installs it with apt-get when it runs as root and apt
is there (as CI does); otherwise it is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from klviewer.export.exporter import export_results
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.dicom_write import write_ct_series
from klviewer.phantoms import make_phantom
from klviewer.results.analyze import run_analysis

SETTINGS = AnalysisSettings(steps=8, views=8, samples=1, patch=8, seed=0, device="cpu")


def _install_dicom3tools() -> str | None:
    """Why dciodvfy cannot be had, or None once it is on the PATH."""
    if shutil.which("dciodvfy"):
        return None
    if not shutil.which("apt-get"):
        return "dciodvfy (dicom3tools) is not installed and there is no apt-get to install it"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "dciodvfy (dicom3tools) is not installed, and installing it with apt-get needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "-qq", "dicom3tools"], ["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "dicom3tools"]):
        try:
            subprocess.run(command, env=env, capture_output=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"installing dicom3tools with apt-get failed ({exc})"
        if shutil.which("dciodvfy"):
            return None
    return "apt-get could not install dicom3tools (no network to the Debian mirror?)"


@pytest.fixture(scope="module")
def dciodvfy() -> str:
    reason = _install_dicom3tools()
    if reason is not None:
        pytest.skip(reason)
    return shutil.which("dciodvfy")


def errors(tool: str, path: Path) -> list[str]:
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, tiny_prior: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conformance")
    sources = root / "sources"
    write_ct_series(np.stack([make_phantom("lesion", 48, seed=k).hu for k in range(2)]), sources / "phantom",
                    pixel_spacing_mm=8.0, slice_thickness_mm=5.0, patient_id="C-1", patient_name="Conform^Ance",
                    study_description="conformance", series_description="phantom")
    for name in ("693_UNCR.dcm", "CT_small.dcm"):
        (sources / name[:-4]).mkdir()
        shutil.copy(get_testdata_file(name), sources / name[:-4] / name)
    assert "FrameOfReferenceUID" not in pydicom.dcmread(sources / "693_UNCR" / "693_UNCR.dcm")
    results = root / "results"
    run = run_analysis([sources / "phantom", sources / "693_UNCR", sources / "CT_small"], results, SETTINGS,
                       prior=tiny_prior)
    threshold = min(row["score"] for row in run.rows) / 2  # every case gets a Segmentation
    out = {"sources": sources}
    for label, deidentify in (("plain", False), ("deidentified", True)):
        report = export_results(results, root / label, flagged_only=False, flag_threshold=threshold,
                                deidentify=deidentify, formats=("dicom", "csv"))
        assert not report.failed and len(report.cases) == 3
        frame_notes = [c for c in report.cases if any("Frame of Reference" in n for n in c.notes)]
        assert [c.case for c in frame_notes] == [next(c.case for c in report.cases if "5_5mm" in c.case)], \
            "693_UNCR's case says that its Frame of Reference was derived"
        out[label] = root / label
    return out


@pytest.mark.parametrize("label", ["plain", "deidentified"])
def test_every_exported_object_validates(dciodvfy: str, exports: dict[str, Path], label: str) -> None:
    objects = sorted(p for p in exports[label].rglob("*.dcm") if p.parent.name == "dicom")
    kinds = {p.stem.rstrip("_0123456789") for p in objects}
    assert kinds == {"parametric_map", "segmentation", "secondary_capture"}
    assert len([p for p in objects if p.stem == "parametric_map"]) == 3, "every case, with and without a Frame of Reference"
    found = {str(p.relative_to(exports[label])): errors(dciodvfy, p) for p in objects}
    assert not any(found.values()), {k: v for k, v in found.items() if v}


def test_klviewers_own_ct_series_validates(dciodvfy: str, exports: dict[str, Path]) -> None:
    for path in sorted((exports["sources"] / "phantom").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        assert ds.PatientPosition == "HFS" and ds.Laterality == "" and ds.AcquisitionNumber == 1
        assert errors(dciodvfy, path) == [], path.name
