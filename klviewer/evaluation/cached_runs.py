"""Slices analysed once and kept in a cache folder, for the runs that score many slices (`calibrate`,
`evaluate detect`): a rerun reads its finished slices back, and the slices still to do share forward
passes (`analyze_prepared_batch`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from klviewer.errors import KlviewerInputError
from klviewer.inference.measurements import PreparedSlice
from klviewer.inference.pipeline import analyze_prepared_batch, auto_slice_batch, batch_groups
from klviewer.inference.result import SliceResult, recut
from klviewer.inference.settings import AnalysisSettings, sampling_key
from klviewer.priors.base import Prior
from klviewer.results.slice_file import load_slice_result, write_slice_npz

CachedSlice = tuple[Path | None, Callable[[], PreparedSlice]]
"""A slice's cache file (None: not cached) and how to prepare its measurement when it must be analysed."""


def analyze_with_cache(items: Sequence[CachedSlice], prior: Prior, settings: AnalysisSettings, *, prior_name: str,
                       device: torch.device, progress: Callable[[int, int], None] | None = None,
                       cancel: threading.Event | None = None) -> list[SliceResult]:
    """Every item's result, in order: read from its cache file where that exists (recut to `settings`' map),
    else analysed with no flag threshold and written there.

    A cached result made with other sampling settings or another prior is refused, naming the file.
    `progress(done, total)` counts slices, the cached ones first.
    """
    results: dict[int, SliceResult] = {}
    for i, (cached, _prepare) in enumerate(items):
        if cached is not None and cached.is_file():
            result = load_slice_result(cached)
            if sampling_key(result.settings) != sampling_key(settings) or result.prior_name != prior_name:
                raise KlviewerInputError(cached, "cached result was made with other settings or another prior; "
                                                 "use another cache folder")
            results[i] = recut(result, settings)
    if results and progress is not None:
        progress(len(results), len(items))
    todo = ((i, prepare()) for i, (_cached, prepare) in enumerate(items) if i not in results)
    for group in batch_groups(todo, auto_slice_batch(settings, device)):
        analysed = analyze_prepared_batch([p for _, p in group], prior, settings, prior_name=prior_name,
                                          flag_threshold=None, cancel=cancel)
        for (i, _), result in zip(group, analysed):
            cached = items[i][0]
            if cached is not None:
                write_slice_npz(result, cached)
            results[i] = result
        if progress is not None:
            progress(len(results), len(items))
    return [results[i] for i in range(len(items))]
