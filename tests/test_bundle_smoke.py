"""Smoke test of the desktop bundle: build it with PyInstaller, then run it headless with no Python
on the PATH. Building takes minutes, so it runs only on request (CI does not build the bundle):

    make bundle-smoke        # or: KLVIEWER_BUNDLE_SMOKE=1 pytest tests/test_bundle_smoke.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import klviewer

pytestmark = pytest.mark.skipif(os.environ.get("KLVIEWER_BUNDLE_SMOKE") != "1",
                                reason="builds the PyInstaller bundle (minutes); set KLVIEWER_BUNDLE_SMOKE=1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle() -> Path:
    subprocess.run([sys.executable, str(ROOT / "packaging" / "build_bundle.py")], check=True, cwd=ROOT)
    executable = ROOT / "dist" / "klviewer" / "klviewer"
    assert executable.is_file() and os.access(executable, os.X_OK)
    return executable


def _bare_env(home: Path) -> dict[str, str]:
    """No Python reachable: an empty PATH and no PYTHON* variables; offscreen Qt; a fresh home."""
    empty = home / "empty-bin"
    empty.mkdir(parents=True, exist_ok=True)
    return {"PATH": str(empty), "HOME": str(home), "LANG": "C.UTF-8", "QT_QPA_PLATFORM": "offscreen",
            "KLVIEWER_CACHE_DIR": str(home / "cache"), "KLVIEWER_SETTINGS_FILE": str(home / "settings.ini")}


def test_the_bundle_reports_its_version(bundle: Path, tmp_path: Path) -> None:
    done = subprocess.run([str(bundle), "--version"], env=_bare_env(tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == f"klviewer {klviewer.__version__}"


def test_the_bundle_builds_the_demo_analyses_it_and_saves_a_screenshot(bundle: Path, tmp_path: Path) -> None:
    shot = tmp_path / "x.png"
    done = subprocess.run([str(bundle), "gui", "--analyze", "--screenshot", str(shot), "--quit"],
                          env=_bare_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cache" / "demo-v1" / "COMPLETE").is_file()  # klviewer.demo ran inside the bundle
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # The KL overlay and its colour bar are the only warm (inferno) colours in the window: the
    # dark theme, the grey CT and the blue accents have none, so an analysed slice shows them.
    warm = int(((pixels[..., 0] - pixels[..., 2]) > 100).sum())
    assert warm > 500


def test_the_bundle_decodes_compressed_dicom(bundle: Path, tmp_path: Path) -> None:
    """JPEG 2000 and JPEG lossless CT: the decoders are found through their entry points."""
    from pydicom.data import get_testdata_file

    inputs = [get_testdata_file("J2K_pixelrep_mismatch.dcm"), get_testdata_file("bad_sequence.dcm")]
    done = subprocess.run([str(bundle), "analyze", *inputs, "--out", "res", "--steps", "2"],
                          env=_bare_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "analysed 2 slice(s)" in done.stdout


def test_the_bundle_runs_batch_workers_as_spawned_processes(bundle: Path, tmp_path: Path) -> None:
    env = _bare_env(tmp_path)
    subprocess.run([str(bundle), "phantoms", "--out", "in", "-n", "2"], env=env, cwd=tmp_path, check=True,
                   capture_output=True)
    done = subprocess.run([str(bundle), "batch", "in/phantom_0000.npz", "in/phantom_0001.npz", "--out", "out",
                           "--workers", "2", "--steps", "2", "--quiet"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "2 done, 0 failed" in done.stdout and "2 local worker processes" in done.stdout
