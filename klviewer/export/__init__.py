"""Exporting analysed cases: DICOM Parametric Map / Segmentation / Secondary Capture, PNG, PDF, CSV/JSON.

See docs/export.md for the output layout.
"""

from klviewer.export.exporter import EXPORT_FORMATS, CaseExport, ExportReport, export_results

__all__ = ["EXPORT_FORMATS", "CaseExport", "ExportReport", "export_results"]
