"""Load a script from benchmarks/ as a module, so that tests can call its functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(script: str) -> ModuleType:
    """benchmarks/`script` as a module named klviewer_bench_<stem> (registered, so its dataclasses resolve)."""
    path = BENCHMARKS / script
    spec = importlib.util.spec_from_file_location(f"klviewer_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
