"""What `klviewer info` reports: a JSON-able description of a catalog, and its text form."""

from __future__ import annotations

import math
from typing import Any

import torch

from klviewer.io.study import Catalog, Series
from klviewer.physics.radon import arc_rad


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def series_summary(series: Series) -> dict[str, Any]:
    hu = series.hu_range()
    entry: dict[str, Any] = {
        "uid": series.uid,
        "number": series.number,
        "description": series.description,
        "modality": series.modality,
        "source": series.source_kind,
        "slices": series.n_slices,
        "size": list(series.image_shape),
        "pixel_spacing_mm": None if series.pixel_spacing_mm is None else [_round(s) for s in series.pixel_spacing_mm],
        "slice_thickness_mm": _round(series.slice_thickness_mm),
        "hu_range": None if hu is None else [_round(hu[0], 1), _round(hu[1], 1)],
        "window": None if series.window is None else [_round(v, 1) for v in series.window],
        "analyzable": series.analysis_refusal() is None,
        "refusal": series.analysis_refusal(),
        "files": len(series.files),
        "warnings": list(series.warnings),
    }
    if series.sinogram is not None:
        sino = series.sinogram
        entry["sinogram"] = {
            "angles": sino.n_angles,
            "detectors": sino.n_detectors,
            "detector_spacing_mm": _round(sino.detector_spacing_mm),
            "arc_deg": _round(math.degrees(arc_rad(torch.from_numpy(sino.angles_rad))), 2),
            "data": "counts" if sino.counts is not None else "line_integrals",
            "i0": sino.i0,
            "line_integral_range": [_round(float(sino.line_integrals.min())), _round(float(sino.line_integrals.max()))],
        }
    return entry


def catalog_summary(catalog: Catalog) -> dict[str, Any]:
    return {
        "patients": [
            {
                "patient_id": p.patient_id,
                "name": p.name,
                "studies": [
                    {"uid": st.uid, "description": st.description, "date": st.date, "series": [series_summary(se) for se in st.series]}
                    for st in p.studies
                ],
            }
            for p in catalog.patients
        ],
        "skipped": [{"path": str(s.path), "reason": s.reason} for s in catalog.skipped],
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    for patient in summary["patients"]:
        name = f" ({patient['name']})" if patient["name"] else ""
        lines.append(f"Patient {patient['patient_id']}{name}")
        for study in patient["studies"]:
            date = f" {study['date']}" if study["date"] else ""
            lines.append(f"  Study {study['description'] or study['uid']}{date}")
            for se in study["series"]:
                size = "x".join(str(n) for n in se["size"])
                spacing = "?" if se["pixel_spacing_mm"] is None else "x".join(f"{s:g}" for s in se["pixel_spacing_mm"])
                lines.append(f"    Series {se['description'] or se['uid']} [{se['modality']}, {se['source']}]")
                detail = f"      {se['slices']} slice(s), {size} px, spacing {spacing} mm"
                if se["slice_thickness_mm"] is not None:
                    detail += f", thickness {se['slice_thickness_mm']:g} mm"
                lines.append(detail)
                if se["hu_range"] is not None:
                    lines.append(f"      HU range {se['hu_range'][0]:g} .. {se['hu_range'][1]:g}")
                if "sinogram" in se:
                    s = se["sinogram"]
                    lines.append(f"      sinogram: {s['angles']} angles over {s['arc_deg']:g} deg, {s['detectors']} detectors at {s['detector_spacing_mm']:g} mm, {s['data']}")
                if se["refusal"]:
                    lines.append(f"      not analysable: {se['refusal']}")
                lines.extend(f"      warning: {w}" for w in se["warnings"])
    if summary["skipped"]:
        lines.append(f"Skipped {len(summary['skipped'])} file(s):")
        lines.extend(f"  {s['path']}: {s['reason']}" for s in summary["skipped"])
    if not summary["patients"]:
        lines.append("No images found.")
    return "\n".join(lines)
