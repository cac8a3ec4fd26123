import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from klviewer.cli import main
from klviewer.errors import KlviewerInputError
from klviewer.io.loader import open_images, open_paths


def _tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_mixed_folder_loads_each_kind_and_reports_the_rest(tmp_path: Path) -> None:
    data = tmp_path / "in"
    (data / "sub").mkdir(parents=True)
    (data / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    np.save(data / "img.npy", np.full((16, 16), 40.0, np.float32) + np.eye(16, dtype=np.float32) * 100)
    np.save(data / "sub" / "scan.npy", np.zeros((4, 8), np.float32))
    (data / "sub" / "scan.json").write_text(json.dumps({
        "klviewer_sinogram": 1, "geometry": "parallel",
        "angles": {"unit": "deg", "start": 0, "stop": 180, "count": 4},
        "detector": {"count": 8, "spacing_mm": 1.0}, "data": {"kind": "line_integrals"},
        "grid": {"size": [6, 6], "pixel_spacing_mm": 1.0},
    }))
    (data / "notes.txt").write_text("hello")
    (data / "orphan.json").write_text("{}")
    (data / "lonely.raw").write_bytes(b"\0" * 16)
    before = _tree_state(data)

    catalog = open_paths([data])
    kinds = sorted(s.source_kind for s in catalog.all_series())
    assert kinds == ["array", "dicom", "sinogram"]
    skipped = {s.path.name: s.reason for s in catalog.skipped}
    assert set(skipped) == {"notes.txt", "orphan.json", "lonely.raw"}
    assert "sinogram sidecar" in skipped["lonely.raw"]
    assert _tree_state(data) == before, "loading must not touch or add files in the input folder"


def test_missing_path_and_empty_folder_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(KlviewerInputError, match="does not exist"):
        open_paths([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(KlviewerInputError, match=r"empty: folder contains no files"):
        open_paths([tmp_path / "empty"])


def test_open_images_explains_why_nothing_loaded(tmp_path: Path) -> None:
    (tmp_path / "junk.dcm").write_bytes(os.urandom(300))
    with pytest.raises(KlviewerInputError, match=r"no loadable images found\. junk\.dcm: "):
        open_images([tmp_path])


def test_info_on_real_ct_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    path = get_testdata_file("CT_small.dcm")
    assert main(["info", path]) == 0
    text = capsys.readouterr().out
    assert "[CT, dicom]" in text and "128x128 px" in text
    assert main(["info", "--json", path]) == 0
    summary = json.loads(capsys.readouterr().out)
    series = summary["patients"][0]["studies"][0]["series"][0]
    assert series["size"] == [128, 128] and series["modality"] == "CT"
    lo, hi = series["hu_range"]
    assert lo == pytest.approx(-896, abs=1) and hi == pytest.approx(1167, abs=1)
    assert series["analyzable"] is True


def test_info_lists_skipped_files_and_fails_when_nothing_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.dcm").write_bytes(b"DICM" + os.urandom(64))
    assert main(["info", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "Skipped 1 file(s):" in out and "broken.dcm" in out
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_and_module_entry_points() -> None:
    from klviewer import __version__

    version = subprocess.run([sys.executable, "-m", "klviewer", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"klviewer {__version__}"
    script = Path(sys.executable).with_name("klviewer")
    helptext = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("info", "phantoms", "demo"):
        assert command in helptext


def test_info_describes_a_sinogram(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "scan.npy", np.zeros((24, 10), np.float32))
    (tmp_path / "scan.json").write_text(json.dumps({
        "klviewer_sinogram": 1, "geometry": "parallel", "angles": {"unit": "deg", "start": 0, "stop": 180, "count": 24},
        "detector": {"count": 10, "spacing_mm": 1.5}, "data": {"kind": "line_integrals"},
        "grid": {"size": [8, 8], "pixel_spacing_mm": 1.5},
    }))
    assert main(["info", str(tmp_path / "scan.json")]) == 0
    assert "sinogram: 24 angles over 180 deg, 10 detectors at 1.5 mm, line_integrals" in capsys.readouterr().out
