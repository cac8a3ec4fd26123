"""The one-page PDF case report: pictures of the deciding slice, the numbers, the note, the provenance.

`report_sections` produces all the text (so it can be checked without reading a PDF);
`write_report_pdf` lays it out on one A4 page with matplotlib's Agg/PDF backend (no pyplot).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from matplotlib.backends.backend_pdf import FigureCanvasPdf
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from klviewer import __version__
from klviewer.export.images import COLORMAP, OverlayStyle, mark_colorbar
from klviewer.inference.verdict_text import VerdictText, nats_meaning, table_verdict
from klviewer.results.reader import CaseEntry

A4_INCHES = (8.27, 11.69)
MAX_SLICE_ROWS = 10
MAX_NOTE_LINES = 6
TITLE_CHARS = 62
DISCLAIMER = "Research software: not for diagnostic use. KL = KL divergence between the diffusion prior and the posterior."


@dataclass
class ReportContext:
    case: CaseEntry
    patient: str
    """Who the case is, as it may be shown (pseudonymised under de-identification)."""
    flagged_slices: set[int]
    """Indices of the slices counted as flagged (by the export's threshold or the analysis' flags)."""
    threshold: float | None
    threshold_source: str
    note: str
    settings: dict[str, Any]
    prior: dict[str, Any]
    analysis_version: str
    analysis_date: str
    export_date: str
    z_threshold: float | None = None
    """Set when the flags came from KL z-scores against the prior's healthy reference."""
    rule_forced: bool = False
    """The nats threshold was set for the export (`--flag-threshold`), not taken from the prior's calibration."""
    measurements: list[str] = field(default_factory=list)
    """Measurements drawn in the app (distance, ROI statistics), one line each."""
    name: str = ""
    """The case's name in the export (case-0001 under de-identification); the results' name by default."""
    escalation: str = ""
    """A two-stage run's rule in words (the results summary's escalation); empty for one stage."""

    @property
    def title(self) -> str:
        return self.name or self.case.name

    @property
    def flagged(self) -> bool:
        return bool(self.flagged_slices)


def _nats(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g} nats"


def _prior_mismatch(case: CaseEntry) -> str | None:
    """The verdict line of a study the prior does not describe (its slices' median prior-fit score above the
    threshold), or None: such a study is reported as a mismatch, never as not flagged."""
    scores = [float(x.row["prior_fit_score"]) for x in case.slices if x.row.get("prior_fit_score") is not None]
    verdicts = [x.row.get("prior_fit") for x in case.slices]
    if not scores or verdicts.count("mismatch") * 2 <= len(verdicts):
        return None
    return (f"Verdict: PRIOR MISMATCH   the prior does not describe this study ({verdicts.count('mismatch')} of "
            f"{len(verdicts)} slices, median prior fit {float(np.median(scores)):.3g} nats per body pixel); "
            "its KL maps and flags are not meaningful")


def report_sections(ctx: ReportContext) -> list[tuple[str, list[str]]]:
    """(heading, lines) blocks of the report, in page order."""
    top = ctx.case.top
    s = ctx.settings
    flagged_indices = ctx.flagged_slices
    noise = (f"Poisson, I0 = {s['dose_i0']:g} photons/ray" if s.get("dose_i0") else
             f"Gaussian, sigma = {s['noise_sigma']:g} on line integrals" if s.get("noise_sigma") else "none added")
    window = s.get("sigma_window")
    note = textwrap.wrap(ctx.note, 95) or ["(none)"]
    if len(note) > MAX_NOTE_LINES:
        note = note[:MAX_NOTE_LINES - 1] + ["... (the full note is in cases.json)"]
    views = ("as measured (sinogram input)" if ctx.case.source_kind == "sinogram"
             else f"{s.get('views')} simulated parallel-beam views over 180 deg")
    z_scores = [float(x.row["z_score"]) for x in ctx.case.slices if x.row.get("z_score") is not None]
    verdict = _verdict(ctx, ctx.flagged, top.score, max(z_scores, default=None))
    status = verdict.status.upper() if verdict.flagged else verdict.status
    mismatch = _prior_mismatch(ctx.case)
    first = [f"Flag: {status} · {verdict.value} · {verdict.rule_text}"] if mismatch is None else textwrap.wrap(mismatch, 100)
    geometry = sorted({w for x in ctx.case.slices for w in str(x.row.get("geometry_warnings") or "").split("; ") if w})
    sections = [
        ("Result", [
            *first,
            f"Score (largest patch KL): {_nats(top.score)}   on slice {top.slice_index} (slices numbered from 0)",
            f"Total KL of that slice: {_nats(top.total_kl)}",
            f"Slices analysed: {len(ctx.case.slices)}, flagged: {len(flagged_indices)}",
        ]),
        ("Slices", [f"slice {x.slice_index:>4}   score {x.score:>10.4g} nats   total {x.total_kl:>10.4g} nats   "
                    f"{_z(x.row.get('z_score'))}   {_verdict(ctx, x.slice_index in flagged_indices, x.score, x.row.get('z_score')).status}"
                    f"{'   escalated' if x.row.get('escalated') else ''}"
                    for x in ctx.case.slices[:MAX_SLICE_ROWS]]
         + ([f"... and {len(ctx.case.slices) - MAX_SLICE_ROWS} more (see cases.json)"]
            if len(ctx.case.slices) > MAX_SLICE_ROWS else [])),
        *([("Geometry far from the prior's", [textwrap.shorten(w, 110) for w in geometry[:4]])] if geometry else []),
        ("Note", note),
        ("Acquisition", [f"source: {ctx.case.source_kind or 'not recorded'}   projections: {views}",
                         f"noise: {noise}"]),
        ("Sampler", [f"guidance {s.get('guidance')}, {s.get('steps')} steps, {s.get('samples')} sample(s), seed {s.get('seed')}",
                     f"patch {s.get('patch')} px, sigma window {window[0]:g}-{window[1]:g}" if window else
                     f"patch {s.get('patch')} px, all noise levels",
                     *textwrap.wrap(ctx.escalation, 100),
                     *textwrap.wrap(nats_meaning(s.get("guidance")), 100)]),
        ("Provenance", [f"prior: {ctx.prior.get('name')}",
                        f"prior SHA-256: {ctx.prior.get('sha256')}",
                        f"analysed with klviewer {ctx.analysis_version} on {ctx.analysis_date}",
                        f"report by klviewer {__version__} on {ctx.export_date}"]),
    ]
    if ctx.measurements:
        after_note = [heading for heading, _ in sections].index("Note") + 1
        sections.insert(after_note, ("Measurements", ctx.measurements[:MAX_NOTE_LINES]))
    return sections


def _verdict(ctx: ReportContext, flagged: bool, score: float, z_score: float | None) -> VerdictText:
    return table_verdict(flagged, score, None if z_score is None else float(z_score), ctx.threshold, ctx.z_threshold,
                         ctx.threshold if ctx.rule_forced else None)


def _z(value: float | None) -> str:
    return "KL z      -" if value is None else f"KL z {float(value):>6.3g}"


def write_report_pdf(handle: BinaryIO, ctx: ReportContext, panels: Sequence[tuple[str, np.ndarray]],
                     style: OverlayStyle, dated: bool = True) -> None:
    """Write the report as a one-page PDF; without `dated`, the PDF records no creation date."""
    metadata = {
        "Title": f"klviewer case report: {ctx.title}",
        "Subject": f"score {ctx.case.score:.6g} nats; {'flagged' if ctx.flagged else 'not flagged'}",
        "Creator": f"klviewer {__version__}",
        "Keywords": f"prior {ctx.prior.get('name')}; sha256 {ctx.prior.get('sha256')}",
    }
    if not dated:
        metadata["CreationDate"] = None
    FigureCanvasPdf(report_figure(ctx, panels, style)).print_pdf(handle, metadata=metadata)


def report_figure(ctx: ReportContext, panels: Sequence[tuple[str, np.ndarray]], style: OverlayStyle) -> Figure:
    """One A4 page: title, up to three image panels (the first with the KL colour bar), the sections."""
    fig = Figure(figsize=A4_INCHES)
    # Long case names (series UIDs) wrap instead of running off the page's right edge.
    title = textwrap.wrap(f"klviewer case report: {ctx.title}", TITLE_CHARS, break_on_hyphens=False)
    fig.text(0.06, 0.975, "\n".join(title[:2]), fontsize=13 if len(title) == 1 else 10, weight="bold", va="top")
    fig.text(0.06, 0.935, textwrap.shorten(f"Patient: {ctx.patient}", 110), fontsize=9)
    width = 0.27
    for k, (title, image) in enumerate(panels[:3]):
        ax = fig.add_axes((0.06 + k * (width + 0.035), 0.70, width, 0.22))
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    cax = fig.add_axes((0.06, 0.685, width, 0.008))
    bar = fig.colorbar(ScalarMappable(Normalize(*style.levels), COLORMAP), cax=cax, orientation="horizontal")
    fig.text(0.06, 0.655, "KL (nats) of the patch; cyan outline = flagged by the rule; dashed line = the slice's maximum",
             fontsize=7)
    mark_colorbar(bar, style)
    bar.ax.tick_params(labelsize=6)

    y = 0.64
    for heading, lines in report_sections(ctx):
        fig.text(0.06, y, heading, fontsize=10, weight="bold")
        y -= 0.018
        for line in lines:
            fig.text(0.08, y, line, fontsize=8, family="monospace")
            y -= 0.0145
        y -= 0.008
    fig.text(0.06, 0.03, DISCLAIMER, fontsize=7, style="italic")
    return fig
