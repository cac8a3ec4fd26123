"""Which loaded data a prior-fit, alignment or comparison job reads: the shown slice, series, or everything open.

No Qt here. A scope hands the jobs the series that are already open (a `SeriesPlan`), so nothing is
read from disk again; its input paths and slice spec only record where the data came from, in the
`klviewer analyze --slices` notation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from klviewer.errors import KlviewerError
from klviewer.inference.plan import SeriesPlan, plan_open_series
from klviewer.io.study import Series

SCOPES: dict[str, str] = {"slice": "Shown slice", "series": "Shown series", "open": "All open series"}


@dataclass(frozen=True)
class Scope:
    plan: SeriesPlan
    """The open series and their picked slices."""
    inputs: tuple[Path, ...]
    slices: str
    """A slice spec as `klviewer analyze --slices` reads it."""
    n_slices: int
    label: str


def measurement_scope(kind: str, open_series: Sequence[Series], current: Series | None, index: int) -> Scope:
    """The series and slices for `kind` (a key of SCOPES); KlviewerError when there is nothing to use."""
    if kind not in SCOPES:
        raise KlviewerError(f"unknown scope {kind!r} (known: {', '.join(SCOPES)})")
    if kind == "open":
        chosen = [s for s in open_series if s.analysis_refusal() is None]
        if not chosen:
            raise KlviewerError("none of the open series can be analysed (CT images or sinograms are needed)")
        files = tuple(dict.fromkeys(f for s in chosen for f in s.files))
        plan = plan_open_series([(s, range(s.n_slices)) for s in chosen])
        return Scope(plan, files, "all", sum(s.n_slices for s in chosen), f"{len(chosen)} open series")
    if current is None:
        raise KlviewerError("no series is shown: open a study first")
    refusal = current.analysis_refusal()
    if refusal:
        raise KlviewerError(f"series '{current.description or current.uid}' cannot be used: {refusal}")
    name = current.description or current.uid
    if kind == "slice":
        return Scope(plan_open_series([(current, [index])]), tuple(current.files), str(index), 1,
                     f"slice {index} of '{name}'")
    return Scope(plan_open_series([(current, range(current.n_slices))]), tuple(current.files), "all",
                 current.n_slices, f"'{name}' ({current.n_slices} slices)")
