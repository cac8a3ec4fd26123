"""cases.csv (one row per exported case) and cases.json (the same, plus slices and export settings)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from klviewer.io.safe_write import atomic_write_text

CASES_CSV = "cases.csv"
CASES_JSON = "cases.json"
CASE_COLUMNS = [
    "case", "status", "verdict", "flagged", "score_nats", "z_score", "top_slice", "total_kl_nats", "slices",
    "flagged_slices", "flag_rule", "z_threshold", "nats_threshold", "source_kind", "patient", "series_uid", "folder",
    "files", "skipped", "notes", "error", "note",
]
"""Every number names its unit. `verdict` is flagged / not flagged / cannot flag (no calibrated rule);
`score_nats` is the case's largest slice score (largest patch KL) and `total_kl_nats` that slice's
total; `z_score` the largest slice KL z-score. `flag_rule` is kl_z_score (then `z_threshold` holds
the threshold, a z-score), largest_patch_kl_nats (then `nats_threshold`, in nats) or none. Slices
are numbered from 0 (`top_slice`). `files`, `skipped` and `notes` are joined with ' | '."""


def write_case_tables(out: Path, header: dict[str, Any], cases: Sequence[dict[str, Any]], *,
                      overwrite: bool) -> list[Path]:
    """Write both tables atomically; `cases` are dicts with CASE_COLUMNS keys plus a `slices` list."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CASE_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for case in cases:
        row = dict(case)
        row["files"] = " | ".join(case["files"])
        row["skipped"] = " | ".join(case["skipped"])
        row["notes"] = " | ".join(case.get("notes", []))
        row["slices"] = len(case["slices"])
        writer.writerow(row)
    csv_path = atomic_write_text(out / CASES_CSV, buffer.getvalue(), overwrite=overwrite)
    json_path = atomic_write_text(out / CASES_JSON, json.dumps({**header, "cases": list(cases)}, indent=2),
                                  overwrite=overwrite)
    return [csv_path, json_path]
