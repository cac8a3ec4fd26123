"""Before/after: the same measurements reconstructed and analysed with two priors (e.g. a base
prior and its aligned copy), with per-case numbers and the measurement-domain KL of each prior
against a reference prior.

Both priors see identical inputs: one measurement per slice (made once, on the shared grid)
and the same sampler seed, so every difference comes from the prior.
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from klviewer import __version__
from klviewer.devices import resolve_device
from klviewer.errors import KlviewerInputError
from klviewer.evaluation.metrics import psnr_hu, ssim_hu
from klviewer.inference.measurements import PreparedSlice, collect_measurements, ct_measurement_model
from klviewer.inference.pipeline import LoadedPrior, analyze_measurements
from klviewer.inference.plan import SeriesPlan
from klviewer.inference.result import SliceResult
from klviewer.inference.settings import AnalysisSettings
from klviewer.inference.shift_kl.core import grid_differences
from klviewer.io.safe_write import OutputExistsError, atomic_write, atomic_write_text, check_output_folder
from klviewer.priors.checkpoint import CONFIG_FILE, load_prior, prior_fingerprint, resolve_prior_path
from klviewer.results.slice_file import write_slice_npz

if TYPE_CHECKING:
    from klviewer.inference.shift_kl import ShiftCurve

METRIC_KEYS = ("dc_residual", "score", "total_kl", "psnr", "ssim")
SIDES = ("before", "after")
CSV_COLUMNS = ["input", "case", "slice_index",
               *[f"{side}_{key}" for key in METRIC_KEYS for side in SIDES], "file_before", "file_after"]
JSON_FILE, CSV_FILE, PLOT_FILE = "comparison.json", "comparison.csv", "shift_kl.png"


@dataclass
class PriorRef:
    """Which prior a side of the comparison used."""

    name: str
    path: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path, "sha256": self.sha256}


@dataclass
class CaseComparison:
    case: str
    source: str
    index: int
    before: SliceResult
    after: SliceResult
    metrics: dict[str, dict[str, float | None]]
    """{"before": {...}, "after": {...}} with METRIC_KEYS; psnr/ssim are None without a reference image."""


@dataclass
class Comparison:
    before_prior: str
    after_prior: str
    settings: AnalysisSettings
    cases: list[CaseComparison]
    shift_before: ShiftCurve | None
    shift_after: ShiftCurve | None
    """Measurement-domain KL(reference || before) and KL(reference || after), when a reference was given."""
    before_ref: PriorRef | None = None
    after_ref: PriorRef | None = None
    reference_ref: PriorRef | None = None
    inputs: list[str] = field(default_factory=list)
    slices: str = "all"
    skipped: list[dict[str, str]] = field(default_factory=list)

    def means(self) -> dict[str, dict[str, float | None]]:
        """Mean of each metric over the cases that have it, per side."""
        out: dict[str, dict[str, float | None]] = {}
        for side in SIDES:
            out[side] = {}
            for key in METRIC_KEYS:
                values = [c.metrics[side][key] for c in self.cases if c.metrics[side].get(key) is not None]
                out[side][key] = float(np.mean(values)) if values else None
        return out


def _prior_ref(path: Path) -> PriorRef:
    return PriorRef(path.name, str(path), prior_fingerprint(path))


def check_same_grid(first, second, second_path: Path, role: str) -> None:
    """Refuse priors that cannot be compared pixel for pixel (no resampling is done)."""
    a = first.config
    problems = grid_differences(a, second.config)
    if problems:
        raise KlviewerInputError(second_path / CONFIG_FILE, f"the {role} prior cannot be compared with the before prior "
                                 f"'{a.name}': " + "; ".join(problems) + " (compare priors on one grid and HU mapping)")


def slice_metrics(result: SliceResult, prepared: PreparedSlice, prior) -> dict[str, float | None]:
    """DC residual, KLIP score, total KL, and PSNR/SSIM against the reference image when there is one.

    dc_residual is the RMS of the noise-whitened sinogram residual of the posterior mean,
    sqrt(mean((y - K x_hat)^2 / variance)): about 1 for a reconstruction that fits the data to
    the noise level, larger where it does not.
    """
    model = ct_measurement_model(prepared.acquisition, prior)
    x_hat = prior.hu_to_x(torch.from_numpy(result.recon_hu)).reshape(1, 1, *result.recon_hu.shape).to(model.y.device)
    with torch.no_grad():
        whitened = model.residual(x_hat) / model.variance.sqrt()
    metrics: dict[str, float | None] = {
        "dc_residual": float(whitened.pow(2).mean().sqrt()),
        "score": float(result.score),
        "total_kl": float(result.total_kl),
        "psnr": None,
        "ssim": None,
    }
    if result.original_hu is not None:
        metrics["psnr"] = psnr_hu(result.original_hu, result.recon_hu)
        metrics["ssim"] = ssim_hu(result.original_hu, result.recon_hu)
    return metrics


def compare_priors(
    before: str | Path,
    after: str | Path,
    inputs: Sequence[str | Path] | SeriesPlan,
    settings: AnalysisSettings,
    *,
    reference: str | Path | None = None,
    slices: str = "all",
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> Comparison:
    """Analyse every picked slice of `inputs` (paths, or the series of a plan) with both priors, and
    (with `reference`) the measurement-domain KL curve of each prior against the reference.

    `progress(done, total)` counts sampler steps, then shift-estimate work; setting `cancel`
    raises klviewer.inference.sampler.AnalysisCancelled within one step.
    """
    device = resolve_device(settings.device)
    paths = {"before": resolve_prior_path(before), "after": resolve_prior_path(after)}
    if reference is not None:
        paths["reference"] = resolve_prior_path(reference)
    priors = {role: load_prior(path, device=device) for role, path in paths.items()}
    for role in ("after", "reference"):
        if role in priors:
            check_same_grid(priors["before"], priors[role], paths[role], role)
    measurements = collect_measurements(inputs, priors["before"], settings, slices=slices, device=device)
    analyses = settings.step_count * len(measurements)
    shift_units = len(measurements) if reference is not None else 0
    total = 2 * (analyses + shift_units)
    done = 0

    def tick(base: int) -> Callable[[int, int], None]:
        def report(step: int, _total: int) -> None:
            if progress is not None:
                progress(base + step, total)
        return report

    results: dict[str, list[SliceResult]] = {}
    for side in SIDES:
        loaded = LoadedPrior.of(paths[side], priors[side], device)
        results[side] = [r for _m, r in analyze_measurements(measurements, loaded, settings, progress=tick(done),
                                                             cancel=cancel)]
        done += analyses
    cases = []
    for k, measured in enumerate(measurements.slices):
        metrics = {side: slice_metrics(results[side][k], measured.prepared, priors[side]) for side in SIDES}
        cases.append(CaseComparison(measured.case, measured.source, measured.index, results["before"][k],
                                    results["after"][k], metrics))

    shift: dict[str, ShiftCurve | None] = {side: None for side in SIDES}
    if reference is not None:
        from klviewer.inference.shift_kl import measurement_kl

        for side in SIDES:
            base = done

            def shift_progress(step: int, of: int, base: int = base) -> None:
                if progress is not None:
                    progress(base + round(len(measurements) * step / max(of, 1)), total)

            shift[side] = measurement_kl(priors["reference"], priors[side], measurements, seed=settings.seed,
                                         progress=shift_progress, cancel=cancel)
            done += len(measurements)
    return Comparison(
        before_prior=paths["before"].name, after_prior=paths["after"].name, settings=settings, cases=cases,
        shift_before=shift["before"], shift_after=shift["after"],
        before_ref=_prior_ref(paths["before"]), after_ref=_prior_ref(paths["after"]),
        reference_ref=_prior_ref(paths["reference"]) if reference is not None else None,
        inputs=inputs.sources if isinstance(inputs, SeriesPlan) else [str(p) for p in inputs], slices=slices,
        skipped=measurements.skipped,
    )


def _case_file(side: str, case: CaseComparison) -> Path:
    return Path(side) / case.case / f"{case.index:04d}.npz"


def _rounded(value: float | None) -> float | None:
    """JSON-safe: an infinite PSNR (a reconstruction equal to its reference) is written as null."""
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def comparison_document(comparison: Comparison) -> dict[str, Any]:
    """What comparison.json holds (see docs/alignment.md)."""
    def ref(r: PriorRef | None, name: str | None) -> dict[str, str] | None:
        if r is not None:
            return r.to_dict()
        return None if name is None else {"name": name}

    return {
        "klviewer_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "before_prior": ref(comparison.before_ref, comparison.before_prior),
        "after_prior": ref(comparison.after_ref, comparison.after_prior),
        "reference_prior": ref(comparison.reference_ref, None),
        "settings": comparison.settings.to_dict(),
        "inputs": comparison.inputs,
        "slices": comparison.slices,
        "cases": [{
            "input": c.source, "case": c.case, "slice_index": c.index,
            **{side: {k: _rounded(v) for k, v in c.metrics[side].items()} for side in SIDES},
            "files": {side: str(_case_file(side, c)) for side in SIDES},
        } for c in comparison.cases],
        "means": {side: {k: _rounded(v) for k, v in values.items()} for side, values in comparison.means().items()},
        "shift_kl": None if comparison.shift_before is None or comparison.shift_after is None else {
            "before": comparison.shift_before.to_dict(), "after": comparison.shift_after.to_dict()},
        "skipped": comparison.skipped,
    }


def _csv_text(comparison: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for c in comparison.cases:
        row: dict[str, Any] = {"input": c.source, "case": c.case, "slice_index": c.index}
        for side in SIDES:
            for key in METRIC_KEYS:
                row[f"{side}_{key}"] = _rounded(c.metrics[side][key])
            row[f"file_{side}"] = str(_case_file(side, c))
        writer.writerow(row)
    return buffer.getvalue()


def plot_shift_curves(before: ShiftCurve, after: ShiftCurve, path: Path, labels: tuple[str, str] = ("before", "after"),
                      overwrite: bool = False) -> Path:
    """Cumulative measurement-domain KL against sigma for both priors, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for curve, label, colour in ((before, labels[0], "C3"), (after, labels[1], "C0")):
        ax.plot(curve.sigmas, curve.cumulative, color=colour, label=f"{label}: {curve.total:.4g} nats")
    ax.set_xscale("log")
    ax.set_xlabel("noise level σ (prior units)")
    ax.set_ylabel("cumulative KL (nats)")
    ax.set_title(f"measurement-domain KL vs reference ({before.operator}, {before.weighting}, N = {before.n})")
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()), overwrite=overwrite)


def write_comparison(comparison: Comparison, out: Path, overwrite: bool = False) -> Path:
    """Write comparison.json, comparison.csv, before/<case>/<slice>.npz, after/<case>/<slice>.npz and,
    with shift curves, shift_kl.png into `out`; returns `out`.

    Nothing is replaced without `overwrite`: every target is checked before the first write.
    comparison.json is written last, so a folder holding it is complete.
    """
    out = Path(out)
    check_output_folder(out, comparison.inputs)
    has_curves = comparison.shift_before is not None and comparison.shift_after is not None
    targets = [out / JSON_FILE, out / CSV_FILE, *(out / _case_file(side, c) for c in comparison.cases for side in SIDES)]
    if has_curves:
        targets.append(out / PLOT_FILE)
    if not overwrite:
        for target in targets:
            if target.exists():
                raise OutputExistsError(target)
    for c in comparison.cases:
        for side in SIDES:
            write_slice_npz(getattr(c, side), out / _case_file(side, c), overwrite=overwrite)
    atomic_write_text(out / CSV_FILE, _csv_text(comparison), overwrite=overwrite)
    if has_curves:
        plot_shift_curves(comparison.shift_before, comparison.shift_after, out / PLOT_FILE,
                          labels=(comparison.before_prior, comparison.after_prior), overwrite=overwrite)
    atomic_write_text(out / JSON_FILE, json.dumps(comparison_document(comparison), indent=2) + "\n", overwrite=overwrite)
    return out

