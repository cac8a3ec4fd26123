"""Packaging: the wheel carries the shipped prior and every dependency it imports, the installed
wheel analyses from any folder, and the Qt runtime check maps missing libraries to apt packages."""

from __future__ import annotations

import ast
import email
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import klviewer
from klviewer.errors import KlviewerInputError
from klviewer.priors.checkpoint import DEFAULT_PRIOR, installed_prior_reason, list_priors, resolve_prior_path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SHIPPED = ROOT / "klviewer" / "resources" / "priors" / DEFAULT_PRIOR


def _load_check_qt_runtime():
    # packaging/ is not a package (and `packaging` is also PyPA's library), so load the file itself.
    spec = importlib.util.spec_from_file_location("check_qt_runtime", ROOT / "packaging" / "check_qt_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_qt_runtime = _load_check_qt_runtime()


def _distribution(requirement: str) -> str:
    """The normalised distribution name of a requirement string ("PySide6-Essentials>=6.8; ...")."""
    return _normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level names of the non-stdlib modules imported anywhere in klviewer/, with the importing files."""
    imports: dict[str, set[str]] = {}
    for path in (ROOT / "klviewer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top != "klviewer" and top not in sys.stdlib_module_names:
                    imports.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return imports


def test_every_imported_package_is_a_declared_dependency() -> None:
    project = PYPROJECT["project"]
    declared = {_distribution(r) for r in project["dependencies"]}
    declared |= {_distribution(r) for extra in project["optional-dependencies"].values() for r in extra}
    providers = importlib.metadata.packages_distributions()
    imports = _third_party_imports()
    assert "scipy" in imports  # imported directly, so it must be declared directly
    undeclared = {}
    for module, files in imports.items():
        dists = {_normalise(d) for d in providers.get(module, [])}
        assert dists, f"{module} (imported by {sorted(files)}) is not installed in the test environment"
        if not dists & declared:
            undeclared[module] = sorted(files)
    assert undeclared == {}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of this checkout with the environment's setuptools (no network).

    A copy, because setuptools packs whatever an earlier build left in build/lib.
    """
    source = tmp_path_factory.mktemp("source") / "klviewer"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "out", ".whl", ".gl"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, cwd=out)
    (built,) = out.glob("klviewer-*.whl")
    return built


def test_the_wheel_carries_the_prior_files_that_loading_reads_and_no_tests(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        prefix = f"klviewer/resources/priors/{DEFAULT_PRIOR}/"
        shipped = sorted(n.removeprefix(prefix) for n in names if n.startswith(prefix))
        assert shipped == ["TRAINING.md", "calibration.json", "config.json", "model.safetensors"]
        for name in shipped:  # byte for byte the repository's prior
            assert archive.read(prefix + name) == (SHIPPED / name).read_bytes()
        dist_info = f"klviewer-{klviewer.__version__}.dist-info/"
        assert {n.partition("/")[0] + "/" for n in names} == {"klviewer/", dist_info}
        metadata = email.message_from_bytes(archive.read(dist_info + "METADATA"))
        entry_points = archive.read(dist_info + "entry_points.txt").decode()
        assert dist_info + "licenses/LICENSE" in names
    assert not any("/training/" in n or n.startswith("tests/") for n in names)
    assert "scipy" in {_distribution(r) for r in metadata.get_all("Requires-Dist")}
    assert metadata["License-Expression"] == "BSD-3-Clause"
    assert any(url.startswith("Source, https://") for url in metadata.get_all("Project-URL"))
    assert "klviewer = klviewer.cli:main" in entry_points
    assert "[gui_scripts]\nklviewer-gui = klviewer.__main__:gui" in entry_points


def test_the_unpacked_wheel_analyses_a_phantom_from_another_folder(wheel: Path, tmp_path: Path) -> None:
    """A wheel install is an unpacked wheel: klviewer then comes from there, prior included."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # The checkout stays off the path: the unpacked wheel comes first, and the CWD is elsewhere.
    env = {**os.environ, "PYTHONPATH": str(site), "KLVIEWER_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("KLVIEWER_RESOURCES", None)

    def klviewer_cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "klviewer", *args], cwd=work, env=env, capture_output=True,
                              text=True, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert klviewer_cli("--version").strip() == f"klviewer {klviewer.__version__}"
    klviewer_cli("phantoms", "--out", "ph", "-n", "1")
    klviewer_cli("analyze", "ph/phantom_0000.npz", "--out", "res", "--steps", "4")
    summary = json.loads((work / "res" / "summary.json").read_text())
    assert Path(summary["prior"]["path"]) == site / "klviewer" / "resources" / "priors" / DEFAULT_PRIOR


def test_a_missing_shipped_prior_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLVIEWER_RESOURCES", str(tmp_path))
    with pytest.raises(KlviewerInputError, match="Reinstall klviewer") as caught:
        resolve_prior_path(DEFAULT_PRIOR)
    assert str(tmp_path / "priors") in str(caught.value) and "--prior PATH" in str(caught.value)


def test_calibrate_refuses_to_write_into_an_installed_shipped_prior(tiny_prior: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed package is replaced by the next install: a calibration written there would be lost."""
    from klviewer.evaluation.calibrate import calibrate_prior
    from klviewer.inference.settings import AnalysisSettings

    installed = tmp_path / "venv" / "lib" / "site-packages" / "klviewer" / "resources"
    shutil.copytree(tiny_prior, installed / "priors" / "tiny")
    monkeypatch.setenv("KLVIEWER_RESOURCES", str(installed))
    before = (installed / "priors" / "tiny" / "calibration.json").exists()
    with pytest.raises(KlviewerInputError, match="installed klviewer.*--prior ~/my-prior.*--dry-run"):
        calibrate_prior("tiny", AnalysisSettings(steps=2), n=2, write=True)
    assert (installed / "priors" / "tiny" / "calibration.json").exists() == before
    assert installed_prior_reason(tiny_prior) is None, "a prior folder of the user's own"
    checkout = tmp_path / "checkout" / "klviewer" / "resources"
    shutil.copytree(tiny_prior, checkout / "priors" / "tiny")
    monkeypatch.setenv("KLVIEWER_RESOURCES", str(checkout))
    assert installed_prior_reason(checkout / "priors" / "tiny") is None, "a source checkout's shipped prior may be recalibrated"


def test_the_shipped_prior_is_package_data() -> None:
    assert list_priors() == [DEFAULT_PRIOR]
    assert resolve_prior_path(DEFAULT_PRIOR) == Path(str(importlib.resources.files("klviewer"))) / SHIPPED.relative_to(
        ROOT / "klviewer")


def test_the_gui_launcher_opens_the_app_with_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    import klviewer.__main__ as entry

    seen: list[list[str]] = []
    monkeypatch.setattr(entry, "main", lambda argv: seen.append(argv) or 0)
    for argv in (["klviewer-gui"], ["klviewer-gui", "a.dcm", "b"], ["klviewer-gui", "--version"]):
        monkeypatch.setattr(sys, "argv", argv)
        assert entry.gui() == 0
    assert seen == [["gui"], ["gui", "a.dcm", "b"], ["--version"]]


LDD_OUTPUT = """\
\tlinux-vdso.so.1 (0x00007ffc)
\tlibQt6XcbQpa.so.6 => /venv/PySide6/Qt/lib/libQt6XcbQpa.so.6 (0x00007f1)
\tlibxcb-cursor.so.0 => not found
\tlibxcb-icccm.so.4 => not found
\tlibX11.so.6 => /lib/x86_64-linux-gnu/libX11.so.6 (0x00007f2)
\tlibxcb-icccm.so.4 => not found
\tlibweird.so.3 => not found
\t/lib64/ld-linux-x86-64.so.2 (0x00007f3)
"""


def test_missing_libraries_map_to_apt_packages() -> None:
    missing = check_qt_runtime.missing_libraries(LDD_OUTPUT)
    assert missing == ["libxcb-cursor.so.0", "libxcb-icccm.so.4", "libweird.so.3"]
    assert check_qt_runtime.packages_for(missing) == (["libxcb-cursor0", "libxcb-icccm4"], ["libweird.so.3"])
    assert check_qt_runtime.apt_command(["libxcb-cursor0"], as_root=False)[:3] == ["sudo", "apt-get", "install"]
    assert check_qt_runtime.apt_command(["libxcb-cursor0"], as_root=True)[:2] == ["apt-get", "install"]


def test_the_qt_check_finds_the_offscreen_plugin_the_tests_use() -> None:
    plugin = check_qt_runtime.platform_plugin("offscreen")
    assert plugin is not None and plugin.name == "libqoffscreen.so"
    if shutil.which("ldd") is None:
        pytest.skip("no ldd on this machine")
    # These tests run offscreen, so the linker finds everything that plugin needs.
    assert check_qt_runtime.ldd_missing(plugin) == []
    assert check_qt_runtime.platform_plugin("no-such-platform") is None


def _fake_machine(monkeypatch: pytest.MonkeyPatch, uid: int, ldd_answers: list[list[str]]) -> list[list[str]]:
    """A Linux machine where `ldd` answers `ldd_answers` in turn; returns the commands run."""
    commands: list[list[str]] = []
    monkeypatch.setattr(check_qt_runtime.os, "geteuid", lambda: uid)
    monkeypatch.setattr(check_qt_runtime, "ldd_missing", lambda plugin: ldd_answers.pop(0))
    monkeypatch.setattr(check_qt_runtime, "has_fonts", lambda: True)
    monkeypatch.setattr(check_qt_runtime.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(check_qt_runtime.subprocess, "run", lambda command, **kw: commands.append(command))
    return commands


def test_a_user_is_told_the_exact_apt_command(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    commands = _fake_machine(monkeypatch, uid=1000, ldd_answers=[["libxcb-cursor.so.0", "libxcb-keysyms.so.1"]])
    assert check_qt_runtime.main(["--platform", "xcb"]) == 1
    assert commands == []
    err = capsys.readouterr().err
    assert "libxcb-cursor.so.0, libxcb-keysyms.so.1" in err
    assert "sudo apt-get install -y --no-install-recommends libxcb-cursor0 libxcb-keysyms1\n" in err


def test_root_installs_the_missing_libraries_with_apt(monkeypatch: pytest.MonkeyPatch) -> None:
    commands = _fake_machine(monkeypatch, uid=0, ldd_answers=[["libxcb-cursor.so.0"], []])
    assert check_qt_runtime.main(["--platform", "xcb"]) == 0
    assert commands == [["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "--no-install-recommends", "libxcb-cursor0"]]
