"""Shared by the batch tests (no tests here): a small phantom archive and helpers to compare batch folders."""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_PRIOR_SIZE

from klviewer.inference.settings import AnalysisSettings
from klviewer.phantoms import make_phantom, save_phantom_npz
from klviewer.phantoms.export import write_phantom_set

SIZE = TINY_PRIOR_SIZE
SETTINGS = AnalysisSettings(steps=3, samples=1, patch=4, sigma_window=(0.01, 1.0), seed=2, device="cpu")
N_STUDIES = 4
N_SLICES = 7


def make_archive(root: Path) -> Path:
    """Two DICOM studies (2 slices each), one npz phantom (1 slice), one .npy stack (2 slices).

    The DICOM sets also hold ground_truth.npz and phantoms.json, which belong to no study.
    """
    write_phantom_set(root / "setA", kind="healthy", n=2, size=SIZE, seed=1, dicom=True)
    write_phantom_set(root / "setB", kind="lesion", n=2, size=SIZE, seed=2, dicom=True)
    (root / "arrays").mkdir()
    save_phantom_npz(make_phantom("healthy", SIZE, seed=5), root / "arrays" / "one.npz")
    np.save(root / "arrays" / "stack.npy", np.stack([make_phantom("lesion", SIZE, seed=s).hu for s in (6, 7)]))
    return root


def result_arrays(out: Path) -> dict[str, dict[str, Any]]:
    """Every per-slice npz of a batch folder: arrays, plus metadata without the timing."""
    found = {}
    for f in sorted(p for p in (out / "studies").rglob("*.npz") if p.is_file()):
        with np.load(f, allow_pickle=False) as z:
            arrays: dict[str, Any] = {k: z[k] for k in z.files if k != "metadata"}
            meta = json.loads(str(z["metadata"]))
        meta.pop("seconds")
        arrays["metadata"] = meta
        found[str(f.relative_to(out))] = arrays
    return found


def assert_same_results(a: Path, b: Path) -> None:
    ra, rb = result_arrays(a), result_arrays(b)
    assert sorted(ra) == sorted(rb) and len(ra) == N_SLICES
    for name, arrays in ra.items():
        other = rb[name]
        assert sorted(arrays) == sorted(other)
        for key, value in arrays.items():
            if key == "metadata":
                assert value == other[key], name
            else:
                assert np.array_equal(value, other[key]), f"{name}: {key} differs"
    assert summary_rows(a) == summary_rows(b)


def summary_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "batch_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row.pop("seconds")
    return rows


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def batch_cli(argv: list[str]) -> int:
    """`klviewer batch ...` through the subcommand's own parser."""
    from klviewer.cli.batch import register

    parser = argparse.ArgumentParser(prog="klviewer")
    register(parser.add_subparsers())
    args = parser.parse_args(["batch", *argv])
    return args.func(args)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Every run of a batch test module uses one torch thread, as worker processes on 2 cores and
    Ray actors do: bits are only identical at equal thread counts (pigdm and dps round their
    backward pass differently with other counts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_args(prior: Path, settings: AnalysisSettings = SETTINGS) -> list[str]:
    return ["--prior", str(prior), "--steps", str(settings.steps), "--patch", str(settings.patch),
            "--sigma-window", *(str(s) for s in settings.sigma_window or ()), "--seed", str(settings.seed),
            "--device", settings.device, "--quiet"]
