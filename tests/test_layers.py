"""The package layers: no package imports one above it, the command line lives in klviewer/cli/, Qt in klviewer/app/.

Every import counts, also those inside functions, because a lazy import up the layers is still a
dependency that runs the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import klviewer

ROOT = Path(klviewer.__file__).parent
LAYERS = ("physics", "io", "phantoms", "priors", "inference", "results", "evaluation", "export", "batch", "app", "cli")
"""Bottom to top: a package may import its own layer and those below it."""
BASE = {"klviewer", "klviewer.errors", "klviewer.devices", "klviewer.overlay_rules"}
"""Modules with no klviewer dependencies of their own, which every layer may use."""
TOP_LEVEL = {"klviewer.demo": "phantoms", "klviewer.__main__": "cli"}
QT_PACKAGES = ("PySide6", "PyQt5", "PyQt6", "shiboken6", "pyqtgraph")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """The layer's rank, or None for the base modules."""
    if module in BASE:
        return None
    if module in TOP_LEVEL:
        return LAYERS.index(TOP_LEVEL[module])
    package = module.split(".")[1]
    assert package in LAYERS, f"{module}: not in any layer; add its package to LAYERS or BASE"
    return LAYERS.index(package)


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_no_package_imports_one_above_it() -> None:
    upward = []
    for path in sources():
        mine = layer_of(module_name(path))
        for line, target in imports(path):
            if target.split(".")[0] != "klviewer":
                continue
            theirs = layer_of(target if target in BASE or target in TOP_LEVEL else ".".join(target.split(".")[:2]))
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_base_modules_import_no_layer() -> None:
    for name in BASE - {"klviewer"}:
        path = ROOT / f"{name.split('.')[1]}.py"
        assert all(t in BASE or not t.startswith("klviewer") for _, t in imports(path)), name


def test_the_command_line_lives_in_one_package() -> None:
    stray = [str(p.relative_to(ROOT.parent)) for p in sources() if p.name.endswith("_cli.py") or p.name == "cli_options.py"]
    assert not stray, f"command-line modules outside klviewer/cli/: {stray}"
    below = [f"{p.relative_to(ROOT.parent)}:{line}" for p in sources() if module_name(p).split(".")[1:2] != ["cli"]
             and p.name != "__main__.py" for line, t in imports(p) if t == "klviewer.cli" or t.startswith("klviewer.cli.")]
    assert not below, f"library modules importing the command line: {below}"


def test_only_the_app_imports_qt() -> None:
    qt = [f"{p.relative_to(ROOT.parent)}:{line} imports {t}" for p in sources() if module_name(p).split(".")[1:2] != ["app"]
          for line, t in imports(p) if t.split(".")[0] in QT_PACKAGES]
    assert not qt, "Qt outside klviewer/app/:\n" + "\n".join(qt)


def test_the_layer_rule_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from klviewer.results.summary import CSV_COLUMNS\n")
    assert imports(bad) == [(2, "klviewer.results.summary")]
    assert layer_of("klviewer.results.summary") > layer_of("klviewer.inference.pipeline")
