"""The prior-fit job: how far the loaded studies lie from each candidate prior, from their measurements only.

No Qt here; the numbers come from `klviewer.inference.prior_selection.rank_priors`, as in
`klviewer shift`. With a reference prior (one that fits the studies, e.g. aligned to them)
each candidate's curve is the measurement-domain KL(reference || candidate) over sigma.
Without one, it is the candidate's denoising fit on the measured data, which equals the KL
from the studies' own distribution plus a constant shared by all candidates: only the
differences between candidates (delta) mean something then.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klviewer.inference.verdict_text import format_nats
from klviewer.app.scope import Scope
from klviewer.devices import resolve_device
from klviewer.errors import KlviewerError
from klviewer.inference.settings import AnalysisSettings
from klviewer.priors.checkpoint import load_prior

Report = Callable[[int, int, str], None]


@dataclass(frozen=True)
class FitRequest:
    reference: Path | None
    candidates: tuple[Path, ...]
    scope: Scope
    settings: AnalysisSettings
    seed: int = 0


@dataclass
class FitRow:
    name: str
    path: Path
    score: float
    """Nats; lower is better (see the module docstring for what it is without a reference)."""
    delta: float
    """score minus the best candidate's score."""
    curve: Any
    """The klviewer.inference.shift_kl.ShiftCurve whose end value is the score."""


@dataclass
class FitResult:
    reference: str | None
    criterion: str
    rows: list[FitRow]
    """Best first."""
    n_measurements: int
    scope_label: str
    skipped: list[dict[str, str]] = field(default_factory=list)


def run_prior_fit(request: FitRequest, report: Report, cancel: threading.Event) -> FitResult:
    """Rank every candidate against the loaded studies (see the module docstring)."""
    from klviewer.inference.measurements import measure_plan
    from klviewer.inference.prior_selection import rank_priors

    if not request.candidates:
        raise KlviewerError("pick at least one candidate prior")
    device = resolve_device(request.settings.device)
    report(0, 1, "Preparing the measurements")
    grid = load_prior(request.reference or request.candidates[0], device)
    measurements = measure_plan(request.scope.plan, grid, request.settings, device)
    what = f"KL from {request.reference.name}" if request.reference else "Denoising fit"

    def progress(done: int, total: int) -> None:
        report(done, total, what)

    ranks = rank_priors(list(request.candidates), measurements, reference=request.reference, seed=request.seed,
                        device=device, progress=progress, cancel=cancel)
    rows = [FitRow(Path(r.path).name, Path(r.path), float(r.score), float(r.delta), r.curve) for r in ranks]
    criterion = (f"measurement-domain KL({request.reference.name} ‖ prior)" if request.reference
                 else "denoising fit on the measured data (KL from the studies + a shared constant)")
    return FitResult(request.reference.name if request.reference else None, criterion, rows, len(measurements),
                     request.scope.label, measurements.skipped)


def legend_label(row: FitRow, relative: bool) -> str:
    """A legend entry: the end value, or (without a reference) the difference to the best candidate."""
    if relative:
        return f"{row.name}: +{format_nats(row.delta)} nats vs best"
    return f"{row.name}: {format_nats(row.score)} nats"
