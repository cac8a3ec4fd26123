import subprocess
import sys

import klviewer

SCRIPT = """
import importlib, pkgutil, sys
import klviewer
names = [m.name for m in pkgutil.walk_packages(klviewer.__path__, "klviewer.") if not m.name.startswith("klviewer.app")]
for name in names:
    importlib.import_module(name)
qt = sorted(m for m in sys.modules if m.split(".")[0] in ("PySide6", "PyQt5", "PyQt6", "pyqtgraph", "shiboken6"))
print(len(names), ",".join(qt))
"""


def test_core_imports_without_loading_qt() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    count, loaded = int(out[0]), out[1] if len(out) > 1 else ""
    assert count >= 10, "the walk should have imported the core modules"
    assert loaded == "", f"core modules pulled in Qt: {loaded}"


def test_version_is_exposed() -> None:
    assert klviewer.__version__.count(".") == 2
