"""The one-page PDF case report: pictures of the deciding slice, the numbers, the note, the provenance.

`report_sections` produces all the text (so it can be checked without reading a PDF);
`write_report_pdf` lays it out on one A4 page with matplotlib's Agg/PDF backend (no pyplot).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from matplotlib.backends.backend_pdf import FigureCanvasPdf
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from klviewer import __version__
from klviewer.export.images import COLORMAP, OverlayStyle
from klviewer.results.reader import CaseEntry

A4_INCHES = (8.27, 11.69)
MAX_SLICE_ROWS = 10
MAX_NOTE_LINES = 6
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
    name: str = ""
    """The case's name in the export (case-0001 under de-identification); the results' name by default."""

    @property
    def title(self) -> str:
        return self.name or self.case.name

    @property
    def flagged(self) -> bool:
        return bool(self.flagged_slices)


def _nats(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g} nats"


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
    flag = f"Flag: {'FLAGGED' if ctx.flagged else 'not flagged'}   "
    if ctx.z_threshold is not None:
        flag += f"KL z-score threshold {ctx.z_threshold:.4g} (prior's healthy reference)"
        z_scores = [x.row.get("z_score") for x in ctx.case.slices]
        largest = max((float(z) for z in z_scores if z is not None), default=None)
        if largest is not None:
            flag += f", largest slice z-score {largest:.4g}"
    else:
        flag += f"threshold {_nats(ctx.threshold)} ({ctx.threshold_source})"
    return [
        ("Result", [
            flag,
            f"Score (largest patch KL): {_nats(top.score)}   on slice {top.slice_index}",
            f"Total KL of that slice: {_nats(top.total_kl)}",
            f"Slices analysed: {len(ctx.case.slices)}, flagged: {len(flagged_indices)}",
        ]),
        ("Slices", [f"slice {x.slice_index:>4}   score {x.score:>12.4g}   total {x.total_kl:>12.4g}"
                    f"   {'flagged' if x.slice_index in flagged_indices else ''}"
                    for x in ctx.case.slices[:MAX_SLICE_ROWS]]
         + ([f"... and {len(ctx.case.slices) - MAX_SLICE_ROWS} more (see cases.json)"]
            if len(ctx.case.slices) > MAX_SLICE_ROWS else [])),
        ("Note", note),
        ("Acquisition", [f"source: {ctx.case.source_kind or 'not recorded'}   projections: {views}",
                         f"noise: {noise}"]),
        ("Sampler", [f"guidance {s.get('guidance')}, {s.get('steps')} steps, {s.get('samples')} sample(s), seed {s.get('seed')}",
                     f"patch {s.get('patch')} px, sigma window {window[0]:g}-{window[1]:g}" if window else
                     f"patch {s.get('patch')} px, all noise levels"]),
        ("Provenance", [f"prior: {ctx.prior.get('name')}",
                        f"prior SHA-256: {ctx.prior.get('sha256')}",
                        f"analysed with klviewer {ctx.analysis_version} on {ctx.analysis_date}",
                        f"report by klviewer {__version__} on {ctx.export_date}"]),
    ]


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
    fig.text(0.06, 0.965, f"klviewer case report: {ctx.title}", fontsize=13, weight="bold")
    fig.text(0.06, 0.945, f"Patient: {ctx.patient}", fontsize=9)
    width = 0.27
    for k, (title, image) in enumerate(panels[:3]):
        ax = fig.add_axes((0.06 + k * (width + 0.035), 0.70, width, 0.22))
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    cax = fig.add_axes((0.06, 0.685, width, 0.008))
    bar = fig.colorbar(ScalarMappable(Normalize(*style.levels), COLORMAP), cax=cax, orientation="horizontal")
    bar.set_label("KL (nats) of the patch; cyan = above threshold", fontsize=7)
    bar.ax.xaxis.set_major_locator(MaxNLocator(5))
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
