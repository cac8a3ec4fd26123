"""Which slices of which series, under which case name.

`klviewer analyze`, `shift`, `align`, `compare`, `batch` and the app all pick their slices through
a SeriesPlan, so a case is named the same way and a slice spec picks the same slices everywhere.
A plan is made from input paths (`plan_series`) or from series already open (`plan_open_series`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from klviewer.errors import KlviewerInputError
from klviewer.io.loader import open_images
from klviewer.io.study import Catalog, Series


@dataclass
class PlannedSeries:
    series: Series
    case: str
    source: str
    """The series' first file as an absolute path (or its uid when it has no file): what reports call the input."""
    indices: list[int]

    def slice_source(self, index: int) -> dict[str, str | None]:
        """Where slice `index` came from, for references in exports (DICOM file and SOP instance)."""
        sl = self.series.slices[index] if index < len(self.series.slices) else None
        return {
            "source_kind": self.series.source_kind,
            "series_uid": self.series.uid,
            "source_file": str(Path(sl.source).resolve()) if sl is not None and sl.source is not None else self.source,
            "sop_instance_uid": sl.sop_instance_uid if sl is not None else None,
        }


@dataclass
class SeriesPlan:
    series: list[PlannedSeries] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    """{"path", "reason"} for every file or series left out, and why."""

    @property
    def n_slices(self) -> int:
        return sum(len(p.indices) for p in self.series)

    @property
    def sources(self) -> list[str]:
        """The planned series' inputs, as reports record them."""
        return [p.source for p in self.series]


def parse_slices(spec: str, n: int) -> tuple[list[int], list[int]]:
    """Slices picked by `spec` from a series of n: (valid indices, requested indices it lacks).

    'all', 'mid', or comma-separated 0-based indices and ranges ('0,3,5-7'); a negative index
    counts from the end.
    """
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(n)), []
    if spec == "mid":
        return [n // 2], []
    picked: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise KlviewerInputError(None, f"slice spec {spec!r}: cannot read {part!r} (use all, mid, or e.g. 0,3,5-7)")
        lo = int(m.group(1))
        lo = lo + n if lo < 0 else lo
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise KlviewerInputError(None, f"slice spec {spec!r}: range {part.strip()!r} runs backwards")
        picked.update(range(lo, hi + 1))
    valid = sorted(i for i in picked if 0 <= i < n)
    return valid, sorted(picked - set(valid))


def case_name(series: Series, taken: set[str]) -> str:
    source = series.files[0] if series.files else Path(series.uid)
    stem = series.description or source.stem
    if series.source_kind == "dicom" and series.number is not None:
        stem = f"S{series.number:03d}-{stem}"
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:60] or "case"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def plan_series(catalog: Catalog, slices: str = "all") -> SeriesPlan:
    """Every analysable series of `catalog` with its case name and picked slices.

    Raises KlviewerInputError when nothing is left to analyse, naming the first reasons.
    """
    plan = SeriesPlan(skipped=[{"path": str(s.path), "reason": s.reason} for s in catalog.skipped])
    taken: set[str] = set()
    for series in catalog.all_series():
        source = str(series.files[0].resolve()) if series.files else series.uid
        refusal = series.analysis_refusal()
        if refusal:
            plan.skipped.append({"path": source, "reason": refusal})
            continue
        indices, missing = parse_slices(slices, series.n_slices)
        if missing:
            plan.skipped.append({"path": source, "reason": f"has {series.n_slices} slice(s); no slice {missing}"})
        if indices:
            plan.series.append(PlannedSeries(series, case_name(series, taken), source, indices))
    if not plan.series:
        raise KlviewerInputError(None, "nothing to analyse: " + "; ".join(s["reason"] for s in plan.skipped[:3]))
    return plan


def plan_open_series(picks: Sequence[tuple[Series, Sequence[int]]]) -> SeriesPlan:
    """A plan of series that are already loaded (the app's scopes): no file is opened again."""
    plan = SeriesPlan()
    taken: set[str] = set()
    for series, indices in picks:
        source = str(series.files[0].resolve()) if series.files else series.uid
        refusal = series.analysis_refusal()
        if refusal:
            plan.skipped.append({"path": source, "reason": refusal})
        elif indices:
            plan.series.append(PlannedSeries(series, case_name(series, taken), source, list(indices)))
    if not plan.series:
        raise KlviewerInputError(None, "nothing to analyse: " + ("; ".join(s["reason"] for s in plan.skipped[:3])
                                                                 or "no slices picked"))
    return plan


def as_plan(inputs: Sequence[str | Path] | SeriesPlan, slices: str = "all") -> SeriesPlan:
    """`inputs` when it is a plan already (series the app has open), else the plan of the files at those paths."""
    if isinstance(inputs, SeriesPlan):
        return inputs
    return plan_series(open_images(inputs), slices)
