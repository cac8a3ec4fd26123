"""`export_results`: flagged (or all) cases of a results folder -> one folder per case, plus tables.

Safety rules, in the order they are checked:
1. the results folder is read and checked completely before anything is written;
2. the export folder may not overlap the results folder or any source folder;
3. existing case folders and tables are refused up front unless `overwrite`;
4. each case is written into a hidden staging folder inside the export folder and renamed into
   place only when complete, so a full disk or a permission error leaves no half-written case;
   the failure is recorded against that case (`CaseExport.error`) and the other cases go on;
5. within a case, DICOM objects that cannot be built (a source highdicom refuses, pixels that do
   not decode) are left out with the reason (`CaseExport.skipped`) and the other formats go on.

Under de-identification (`deidentify=True`) nothing exported carries a source identifier: case
folders are named case-0001, ... in export order (the analysis names cases after file names and
series descriptions, which may hold a name or an ID), the tables and the PDF leave out source
paths and real dates, DICOM headers follow klviewer.export.deidentify, and each DICOM case folder
also holds de-identified copies of its source slices (dicom/source/), which the Parametric Map,
Segmentation and Secondary Captures reference, so that a viewer can show them together.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import tempfile
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from klviewer import __version__
from klviewer.errors import MAX_PROBLEM_CHARS, KlviewerError, KlviewerInputError, shorten
from klviewer.export.deidentify import Pseudonymizer, mark_deidentified
from klviewer.export.dicom_objects import (
    DicomSkip,
    add_laterality,
    derive_frame_of_reference,
    load_sources,
    parametric_map,
    secondary_capture,
    segmentation,
    source_hu,
    source_window,
    unambiguous_names,
)
from klviewer.export.geometry import to_source_grid
from klviewer.export.images import (
    SOFT_TISSUE_WINDOW,
    OverlayStyle,
    add_colorbar,
    grey_uint8,
    overlay_rgb,
    write_png,
)
from klviewer.export.pdf_report import ReportContext, write_report_pdf
from klviewer.export.tables import CASES_CSV, CASES_JSON, write_case_tables
from klviewer.inference.prior_fit import MISMATCH as FIT_MISMATCH
from klviewer.inference.prior_fit import PriorFit
from klviewer.inference.result import SliceResult
from klviewer.inference.scoring import flag_rule, mismatch_rule
from klviewer.inference.verdict_text import VerdictText, format_nats, slice_label, table_verdict
from klviewer.io.input_files import inside
from klviewer.io.safe_write import OutputExistsError, atomic_write
from klviewer.overlay_rules import overlay_levels
from klviewer.physics.grid import AIR_HU
from klviewer.results.reader import CaseEntry, ResultsFolder, SliceEntry, read_results
from klviewer.results.slice_file import load_slice_result

EXPORT_FORMATS = ("dicom", "png", "pdf", "csv")
CASE_FORMATS = ("dicom", "png", "pdf")
"""Formats written into a case folder; `csv` only writes the tables beside the case folders."""
REPORT_FILE = "report.pdf"


@dataclass
class CaseExport:
    """What happened to one case: its folder and files, the parts left out and why, or the error."""

    case: str
    """The case's name in the results folder."""
    folder: Path | None
    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    """What was done that the user should know of (e.g. a Frame of Reference derived for the source)."""
    name: str = ""
    """The case's folder name in the export (case-0001, ... under de-identification)."""


@dataclass
class ExportReport:
    out: Path
    cases: list[CaseExport]
    table_files: list[Path]
    cancelled: bool = False
    """The cancel event stopped the export between cases; `cases` holds those finished before."""

    @property
    def failed(self) -> list[CaseExport]:
        return [c for c in self.cases if c.error is not None]


@dataclass
class _Job:
    """One export's resolved settings, shared by every case."""

    results: ResultsFolder
    out: Path
    formats: frozenset[str]
    threshold: float | None
    threshold_source: str
    selection_threshold: float | None
    """The export's own threshold (None: use the analysis' flags)."""
    z_threshold: float | None
    """Set when the export uses the analysis' flags and they came from KL z-scores: then the
    Segmentation and the captions follow the z-scores too."""
    pseudonyms: Pseudonymizer | None
    overwrite: bool
    notes: dict[str, str]
    date: str
    names: dict[str, str]
    """Case name in the results -> folder name in the export."""
    measurements: dict[str, list[str]] = field(default_factory=dict)


def export_results(
    results_dir: str | Path,
    out: str | Path,
    *,
    flagged_only: bool = True,
    formats: Sequence[str] = EXPORT_FORMATS,
    flag_threshold: float | None = None,
    deidentify: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    notes: dict[str, str] | None = None,
    measurements: dict[str, list[str]] | None = None,
    cases: Sequence[str] | None = None,
    cancel: threading.Event | None = None,
) -> ExportReport:
    """Export cases of a `klviewer analyze` results folder into `out`, one folder per case.

    A case is flagged when any of its slices is: score above `flag_threshold` (nats) when given,
    else as the analysis flagged it. `cases` names the cases to export explicitly (e.g. those
    flagged by hand in the app) and then overrides `flagged_only`. `notes` maps case names to
    free text for the PDF and the tables; `measurements` maps case names to lines for the PDF. Refusals raise KlviewerError before anything is
    written; a case that fails while being written is reported in `ExportReport.failed`.
    Setting `cancel` stops between cases: finished cases stay, and the tables list them.
    """
    chosen = _check_formats([formats] if isinstance(formats, str) else formats)
    if flag_threshold is not None and not (math.isfinite(flag_threshold) and flag_threshold > 0):
        raise KlviewerInputError(None, f"flag threshold must be a positive number of nats, got {flag_threshold!r}")
    results = read_results(results_dir)
    out = Path(out)
    z_threshold = None
    if flag_threshold is not None:
        threshold, source = float(flag_threshold), "export --flag-threshold"
    else:
        threshold, source = results.analysis_threshold
        z_threshold = results.z_threshold
        if z_threshold is not None:
            source = "prior's healthy reference: the threshold is a KL z-score, not nats"
    if cases is not None:
        selection = "named cases"
        selected = [results.case(name) for name in dict.fromkeys(cases)]
    elif flagged_only:
        selection = "flagged cases"
        selected = [c for c in results.cases if c.flagged_slices(flag_threshold)]
    else:
        selection = "all cases"
        selected = list(results.cases)
    names = {c.name: f"case-{k:04d}" if deidentify else c.name for k, c in enumerate(selected, start=1)}
    _check_target(out, results, [names[c.name] for c in selected], chosen, overwrite)
    if not selected:
        return ExportReport(out, [], [])
    _prepare_folder(out)
    job = _Job(results, out, chosen, threshold, source, flag_threshold, z_threshold, Pseudonymizer() if deidentify else None,
               overwrite, dict(notes or {}), datetime.now(timezone.utc).isoformat(timespec="seconds"), names,
               dict(measurements or {}))
    exports: list[CaseExport] = []
    records: list[dict[str, Any]] = []
    if progress is not None:
        progress(0, len(selected))
    cancelled = False
    for done, case in enumerate(selected, start=1):
        if cancel is not None and cancel.is_set():
            cancelled = True
            break
        export, record = _export_case(job, case)
        exports.append(export)
        records.append(record)
        if progress is not None:
            progress(done, len(selected))
    tables = write_case_tables(out, _table_header(job, selection), records, overwrite=overwrite) if "csv" in chosen else []
    return ExportReport(out, exports, tables, cancelled)


def _check_formats(formats: Sequence[str]) -> frozenset[str]:
    """The chosen formats; a single comma-separated string ("dicom,pdf") is accepted too."""
    chosen = frozenset(f.strip().lower() for item in formats for f in item.split(",") if f.strip())
    unknown = sorted(chosen - set(EXPORT_FORMATS))
    if unknown or not chosen:
        raise KlviewerInputError(None, f"export formats must be some of {', '.join(EXPORT_FORMATS)}; got {list(formats)}")
    return chosen


def _check_target(out: Path, results: ResultsFolder, selected: Sequence[str], formats: frozenset[str],
                  overwrite: bool) -> None:
    # Relative source paths from another working folder would resolve against ours: only
    # paths that are absolute or exist here say anything about where the sources are.
    sources = {Path(s.source_file) for c in results.cases for s in c.slices if s.source_file}
    folders = {results.path, *(p.parent for p in sources if p.is_absolute() or p.exists())}
    for folder in sorted(folders):
        # Both directions: a source folder inside the export could be taken for a case folder
        # and replaced under overwrite.
        if inside(out, folder) or inside(folder, out):
            raise KlviewerInputError(out, f"export folder overlaps the input {folder}; choose a folder outside "
                                          "the results and source folders")
    if out.exists() and not out.is_dir():
        raise KlviewerInputError(out, "export target exists and is not a folder")
    if overwrite:
        return
    folders = [out / name for name in selected] if formats & set(CASE_FORMATS) else []
    targets = folders + ([out / CASES_CSV, out / CASES_JSON] if "csv" in formats and selected else [])
    existing = next((t for t in targets if t.exists() or t.is_symlink()), None)
    if existing is not None:
        raise OutputExistsError(existing)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DIR_MODE = 0o777 & ~_umask()


def _prepare_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".klviewer-write-test-", dir=out)
        os.rmdir(probe)
    except OSError as exc:
        raise KlviewerInputError(out, f"cannot write the export here ({exc.strerror or exc})") from exc


def _export_case(job: _Job, case: CaseEntry) -> tuple[CaseExport, dict[str, Any]]:
    name = job.names[case.name]
    export = CaseExport(case.name, None, name=name)
    if not job.formats & set(CASE_FORMATS):
        # Tables only: no case folder, but the tables still say who the patient is.
        try:
            patient = _sources(job, case, export).patient
        except Exception as exc:  # noqa: BLE001 - one case's sources must not stop the others
            export.error = _failure(exc)
            patient = ""
        return export, _record(job, case, export, {"patient": patient})
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=job.out))
        os.chmod(staging, _DIR_MODE)  # mkdtemp makes it owner-only; a published case gets the usual mode
        written, info = _write_case(job, case, staging, export)
        export.folder = _publish(staging, job.out / name, job.overwrite)
    except Exception as exc:  # noqa: BLE001 - a case that cannot be written is reported; the others go on
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        export.error = _failure(exc)
        return export, _record(job, case, export, {})
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    export.files = [export.folder / p.relative_to(staging) for p in written]
    return export, _record(job, case, export, info)


def _failure(exc: BaseException) -> str:
    """The reason a case failed: the refusal itself, or what an unexpected error was and where it came from."""
    if isinstance(exc, (KlviewerError, OSError)):
        return f"{type(exc).__name__}: {shorten(str(exc), MAX_PROBLEM_CHARS)}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (in {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"unexpected {type(exc).__name__}{where}: {shorten(str(exc), MAX_PROBLEM_CHARS)}"


def _publish(staging: Path, target: Path, overwrite: bool) -> Path:
    """Move the finished staging folder to `target`; an old target is replaced only under overwrite."""
    if not (target.exists() or target.is_symlink()):
        os.rename(staging, target)
        return target
    if not overwrite:
        raise OutputExistsError(target)
    backup = target.with_name(f".{target.name}.{secrets.token_hex(4)}.replaced")
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(backup, target)
        raise
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink()
    return target


@dataclass
class _Sources:
    datasets: list[Dataset] | None
    patient: str
    window: tuple[float, float]


def _sources(job: _Job, case: CaseEntry, export: CaseExport) -> _Sources:
    """The case's DICOM sources (pseudonymised when asked), who the patient is, and the display window."""
    want_dicom = "dicom" in job.formats
    try:
        datasets = load_sources(case.slices, pixels=want_dicom)
    except DicomSkip as exc:
        if want_dicom:
            export.skipped.append(f"dicom: {exc}")
        no_patient = "not recorded (array or sinogram input)" if case.source_kind != "dicom" else f"unknown ({exc})"
        return _Sources(None, no_patient, SOFT_TISSUE_WINDOW)
    if want_dicom:
        derived = derive_frame_of_reference(datasets)
        if derived is not None:
            export.notes.append(derived)
    if job.pseudonyms is not None:
        datasets = [job.pseudonyms.apply(ds) for ds in datasets]
    datasets = [unambiguous_names(ds) for ds in datasets]
    first = datasets[0]
    date = str(first.get("StudyDate", "") or "")
    date = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 and date.isdigit() else date
    patient = f"{first.get('PatientName', '')} (ID {first.get('PatientID', '')})" + (f", study date {date}" if date else "")
    return _Sources(datasets if want_dicom else None, patient, source_window(first) or SOFT_TISSUE_WINDOW)


def _above_z(result: SliceResult, z_threshold: float) -> np.ndarray:
    """Pixels of the patches whose KL z-score is above `z_threshold` (none without z-scores)."""
    if result.z_map is None:
        return np.zeros(result.recon_hu.shape, bool)
    return result.z_map.to_pixels() > z_threshold


def _verdict(job: _Job, entry: SliceEntry, flagged: bool) -> VerdictText:
    """A slice's verdict as the export decides it, with the rule (the same words as the app's): a prior-fit
    mismatch first."""
    z = entry.row.get("z_score")
    return table_verdict(flagged, entry.score, None if z is None else float(z), job.threshold, _row_z_threshold(job, entry),
                         job.selection_threshold, _mismatch(job, entry.row))


def _row_z_threshold(job: _Job, entry: SliceEntry) -> float | None:
    """The z threshold that decided the slice: its row's where the run recorded one (a two-stage run's slices that
    stayed at stage 1 were decided by the escalation threshold), else the run's."""
    own = entry.row.get("z_threshold")
    return float(own) if job.z_threshold is not None and own is not None else job.z_threshold


def _mismatch(job: _Job, row: dict[str, Any]) -> str | None:
    """The prior-fit mismatch words of a summary row whose slice the prior does not describe, else None."""
    threshold = job.results.summary.get("prior_fit_threshold")
    if row.get("prior_fit") != FIT_MISMATCH or row.get("prior_fit_score") is None or threshold is None:
        return None
    return mismatch_rule(PriorFit(FIT_MISMATCH, float(row["prior_fit_score"]), float(threshold)))


def _caption(job: _Job, entry: SliceEntry, flagged: bool) -> str:
    """The line burned into overlays: no patient data, so it is safe under de-identification too."""
    verdict = _verdict(job, entry, flagged)
    score = f" · score {format_nats(entry.score)} nats" if verdict.rule != "nats" else ""
    return f"{slice_label(entry.slice_index)} · {verdict.caption}{score}"


def _flag_mask(job: _Job, result: SliceResult, kl: np.ndarray) -> np.ndarray:
    """Pixels of the patches the flag rule flags: KL z windows under the z rule, else patches above the nats threshold."""
    if job.z_threshold is not None:
        return _above_z(result, job.z_threshold)
    return kl > job.threshold if job.threshold is not None else np.zeros(kl.shape, bool)


@dataclass
class _DicomParts:
    """What the case's DICOM objects are made of, gathered slice by slice."""

    maps: list[np.ndarray] = field(default_factory=list)
    """KL on each source slice's grid."""
    z_masks: list[np.ndarray] = field(default_factory=list)
    captures: list[tuple[str, Dataset, Dataset]] = field(default_factory=list)
    """(file stem, Secondary Capture, its source) for the pictured slices."""
    capture_series: str = field(default_factory=generate_uid)

    def add(self, job: _Job, source: Dataset, result: SliceResult, kl: np.ndarray, mask: np.ndarray,
            style: OverlayStyle, window: tuple[float, float], caption: str, stem: str, pictured: bool) -> None:
        """One slice: its KL map and flag mask (what the rule flags) carried back onto the source's own grid."""
        hu = source_hu(source)
        grid = result.grid_for(hu.shape)
        kl_source = to_source_grid(kl, grid)
        mask_source = to_source_grid(mask.astype(np.float32), grid) > 0
        self.maps.append(kl_source)
        if job.z_threshold is not None:
            self.z_masks.append(mask_source)
        if pictured:
            rgb = add_colorbar(overlay_rgb(hu, kl_source, window, style, flagged=mask_source), style, caption)
            sc = secondary_capture(source, rgb, series_uid=self.capture_series, instance_number=len(self.captures) + 1)
            self.captures.append((stem, sc, source))


def _write_case(job: _Job, case: CaseEntry, staging: Path, export: CaseExport) -> tuple[list[Path], dict[str, Any]]:
    """Everything of one case into `staging`.

    The Parametric Map and Segmentation cover every analysed slice; pictures (PNG, Secondary
    Capture) are made for the flagged slices, or for the top-scoring slice when none is flagged,
    so a 300-slice series does not turn into 300 pictures per format.
    """
    written: list[Path] = []

    def save(relative: str, write: Callable[[Any], None]) -> None:
        written.append(atomic_write(staging / relative, write))

    sources = _sources(job, case, export)
    flagged = {s.slice_index for s in case.flagged_slices(job.selection_threshold)}
    top = case.top
    pictured = flagged or {top.slice_index}
    parts = _DicomParts() if sources.datasets is not None else None
    top_result: SliceResult | None = None
    for number, entry in enumerate(case.slices):
        if parts is None and entry.slice_index not in pictured and entry is not top:
            continue
        result = load_slice_result(entry.file)
        kl = result.kl_map.to_pixels().astype(np.float32)
        style = OverlayStyle.for_map(kl, job.threshold, nats_rule=job.z_threshold is None)
        mask = _flag_mask(job, result, kl)
        caption = _caption(job, entry, entry.slice_index in flagged)
        stem = f"{entry.slice_index:04d}"
        if "png" in job.formats and entry.slice_index in pictured:
            _save_pngs(save, stem, result, kl, style, sources.window, caption, mask)
        if parts is not None and sources.datasets is not None:
            try:
                parts.add(job, sources.datasets[number], result, kl, mask, style, sources.window, caption, stem,
                          entry.slice_index in pictured)
            except Exception as exc:  # noqa: BLE001 - a source the DICOM objects cannot be built on costs only them
                export.skipped.append(f"dicom: cannot be built on the source slices ({_failure(exc)})")
                parts = None
        if entry is top:
            top_result = result
    if parts is not None and sources.datasets is not None:
        _save_dicom_objects(job, case, sources.datasets, parts, staging, written, export)
    if "pdf" in job.formats and top_result is not None:
        ctx = _report_context(job, case, sources.patient, flagged)
        kl = top_result.kl_map.to_pixels().astype(np.float32)
        style = OverlayStyle.for_map(kl, job.threshold, nats_rule=job.z_threshold is None)
        panels = _panels(top_result, kl, style, sources.window, _flag_mask(job, top_result, kl))
        save(REPORT_FILE, lambda f: write_report_pdf(f, ctx, panels, style, dated=job.pseudonyms is None))
    return written, {"patient": sources.patient}


def _on_source(result: SliceResult, kl: np.ndarray, flagged: np.ndarray) -> dict[str, np.ndarray | None]:
    """The result's images, KL map and flagged pixels on its source grid, as pictures show them (where the grid
    is recorded)."""
    images = {"recon": result.recon_hu, "fbp": result.fbp_hu, "original": result.original_hu,
              "std": result.posterior_std_hu}
    grid = result.grid_transform
    if grid is None or grid.is_identity():
        return {**images, "kl": kl, "flagged": flagged}
    back = {k: None if v is None else grid.resample_to_source(v, fill=AIR_HU) for k, v in images.items()}
    back["std"] = grid.resample_to_source(result.posterior_std_hu, fill=0.0)
    return {**back, "kl": to_source_grid(kl, grid), "flagged": to_source_grid(flagged.astype(np.float32), grid) > 0}


def _save_pngs(save: Callable[[str, Callable[[Any], None]], None], stem: str, result: SliceResult, kl: np.ndarray,
               style: OverlayStyle, window: tuple[float, float], caption: str, flagged: np.ndarray) -> None:
    shown = _on_source(result, kl, flagged)
    overlay = add_colorbar(overlay_rgb(shown["recon"], shown["kl"], window, style, flagged=shown["flagged"]), style,
                           caption)
    images = {"overlay": overlay, "reconstruction": grey_uint8(shown["recon"], window),
              "fbp": grey_uint8(shown["fbp"], window)}
    if shown["original"] is not None:
        images["original"] = grey_uint8(shown["original"], window)
    for name, image in images.items():
        save(f"png/{stem}_{name}.png", lambda f, image=image: write_png(f, image))


def _save_dicom_objects(job: _Job, case: CaseEntry, datasets: list[Dataset], parts: _DicomParts, staging: Path,
                        written: list[Path], export: CaseExport) -> None:
    """Build and write the case's DICOM objects; if any cannot be, none is kept and the case goes on without them."""
    before = len(written)
    try:
        objects = [(f"dicom/secondary_capture_{stem}.dcm", sc, source) for stem, sc, source in parts.captures]
        objects += _map_objects(job, case, datasets, np.stack(parts.maps),
                                np.stack(parts.z_masks) if parts.z_masks else None, export.skipped)
        if job.pseudonyms is not None:
            # The maps reference de-identified UIDs; the slices they name are exported with them.
            objects += [(f"dicom/source/IM{k:04d}.dcm", ds, None) for k, ds in enumerate(datasets, start=1)]
            for ds in datasets:
                add_laterality(ds, ds)
        for relative, obj, source in objects:
            written.append(atomic_write(staging / relative, lambda f, obj=obj, source=source: _save_dicom(job, obj, source, f)))
    except Exception as exc:  # noqa: BLE001 - DICOM objects that cannot be built or written cost only themselves
        for path in written[before:]:
            path.unlink(missing_ok=True)
        del written[before:]
        export.skipped.append(f"dicom: cannot be written ({_failure(exc)})")


def _map_objects(job: _Job, case: CaseEntry, datasets: list[Dataset], kl_maps: np.ndarray, z_masks: np.ndarray | None,
                 skipped: list[str]) -> list[tuple[str, Dataset, Dataset]]:
    """The Parametric Map of KL, and the Segmentation of the patches the flag rule marks."""
    threshold = job.threshold
    patch = case.slices[0].row.get("patch")
    pm = parametric_map(datasets, kl_maps, levels=overlay_levels(float(kl_maps.max()), threshold),
                        description=f"KL per {patch or '?'} px patch, nats")
    objects = [("dicom/parametric_map.dcm", pm, datasets[0])]
    if job.z_threshold is not None and z_masks is not None:
        masks, rule, limit, unit = z_masks, "z", job.z_threshold, "KL z-score"
    elif threshold is not None:
        masks, rule, limit, unit = kl_maps > threshold, "nats", threshold, "nats"
    else:
        skipped.append("dicom segmentation: no flag threshold (none calibrated for these settings; pass a flag threshold)")
        return objects
    if not masks.any():
        skipped.append(f"dicom segmentation: no patch above the flag threshold {limit:.4g} ({unit})")
        return objects
    seg = segmentation(datasets, masks, rule=rule, threshold=limit, patch=int(patch or 0),
                       prior_sha256=str(job.results.prior.get("sha256", "")))
    return [*objects, ("dicom/segmentation.dcm", seg, datasets[0])]


def _save_dicom(job: _Job, ds: Dataset, source: Dataset | None, handle: Any) -> None:
    """Write one object; under de-identification, the dates it made itself are shifted like its patient's."""
    if job.pseudonyms is not None:
        if source is not None:
            job.pseudonyms.shift_new_dates(ds, source)
        mark_deidentified(ds)
    ds.save_as(handle, enforce_file_format=True)


def _panels(result: SliceResult, kl: np.ndarray, style: OverlayStyle, window: tuple[float, float],
            flagged: np.ndarray) -> list[tuple[str, np.ndarray]]:
    shown = _on_source(result, kl, flagged)
    panels = [("Reconstruction (posterior mean) + KL",
               overlay_rgb(shown["recon"], shown["kl"], window, style, flagged=shown["flagged"]))]
    if shown["original"] is not None:
        panels.append(("Original", grey_uint8(shown["original"], window)))
    panels.append(("FBP of the measurement", grey_uint8(shown["fbp"], window)))
    if shown["original"] is None:
        spread = float(shown["std"].max()) or 1.0
        panels.append(("Posterior std (0 to max)", grey_uint8(shown["std"], (spread / 2, spread))))
    return panels


WITHHELD = "withheld (de-identified export)"


def _report_context(job: _Job, case: CaseEntry, patient: str, flagged: set[int]) -> ReportContext:
    summary = job.results.summary
    deidentified = job.pseudonyms is not None
    return ReportContext(
        case=case, patient=patient, flagged_slices=flagged, threshold=job.threshold, threshold_source=job.threshold_source,
        note=job.notes.get(case.name, ""), settings=job.results.settings, prior=job.results.prior,
        analysis_version=str(summary.get("klviewer_version", "unknown")),
        analysis_date=WITHHELD if deidentified else str(summary.get("created", "unknown")),
        export_date=WITHHELD if deidentified else job.date, z_threshold=job.z_threshold, name=job.names[case.name],
        rule_forced=job.selection_threshold is not None, measurements=job.measurements.get(case.name, []),
        escalation=(summary.get("escalation") or {}).get("rule", ""),
    )


def _scrub(job: _Job, case: CaseEntry, text: str) -> str:
    """Under de-identification, a reason without the source paths and the case's own name in it."""
    if job.pseudonyms is None:
        return text
    secrets_ = {str(job.results.path), str(job.results.path.resolve()), case.name}
    for entry in case.slices:
        if entry.source_file:
            secrets_ |= {entry.source_file, str(Path(entry.source_file).parent), Path(entry.source_file).name}
        if entry.series_uid:
            secrets_.add(entry.series_uid)
        if entry.sop_instance_uid:
            secrets_.add(entry.sop_instance_uid)
    for secret in sorted((x for x in secrets_ if len(x) > 2), key=len, reverse=True):
        text = text.replace(secret, "<source>")
    return text


def _record(job: _Job, case: CaseEntry, export: CaseExport, info: dict[str, Any]) -> dict[str, Any]:
    """The case's row in cases.csv / cases.json; identifiers are pseudonymised or left out under de-identification."""
    flagged = {s.slice_index for s in case.flagged_slices(job.selection_threshold)}
    top = case.top
    deidentified = job.pseudonyms is not None

    def uid(value: str | None) -> str:
        if not value:
            return ""
        if job.pseudonyms is None:
            return value
        return job.pseudonyms.uid(value) if case.source_kind == "dicom" else ""

    slices = []
    for s in case.slices:
        verdict = _verdict(job, s, s.slice_index in flagged)
        item: dict[str, Any] = {"slice_index": s.slice_index, "score_nats": s.score, "total_kl_nats": s.total_kl,
                                "z_score": s.row.get("z_score"), "verdict": verdict.status,
                                "flagged": s.slice_index in flagged, "sop_instance_uid": uid(s.sop_instance_uid)}
        if not deidentified:
            item["result_file"] = str(s.row["file"])
            item["source_file"] = s.source_file
        slices.append(item)
    verdict = _case_verdict(job, case, flagged)
    return {
        "case": export.name, "status": "failed" if export.error else "exported", "verdict": verdict.status,
        "flagged": bool(flagged), "score_nats": top.score, "top_slice": top.slice_index, "total_kl_nats": top.total_kl,
        "z_score": _largest_z(case), "slices": slices, "flagged_slices": len(flagged), **_rule_columns(job),
        "source_kind": case.source_kind or "",
        "patient": info.get("patient", ""), "series_uid": uid(top.series_uid),
        "folder": export.name if export.folder is not None else "",
        "files": [str(p.relative_to(job.out)) for p in export.files],
        "skipped": [_scrub(job, case, x) for x in export.skipped], "notes": list(export.notes),
        "error": _scrub(job, case, export.error or ""), "note": job.notes.get(case.name, ""),
    }


def _largest_z(case: CaseEntry) -> float | None:
    """The case's KL z-score: its largest slice z-score (None without z-scores)."""
    return max((float(s.row["z_score"]) for s in case.slices if s.row.get("z_score") is not None), default=None)


def _case_verdict(job: _Job, case: CaseEntry, flagged: set[int]) -> VerdictText:
    """The case's verdict: the study's prior fit first, then flagged when any slice is; its numbers are the
    largest slice's."""
    top = case.top
    fit = (job.results.summary.get("cases") or {}).get(case.name)
    mismatch = None
    if isinstance(fit, dict) and fit.get("verdict") == FIT_MISMATCH:
        mismatch = mismatch_rule(PriorFit.from_dict(fit, job.results.path))
    return table_verdict(bool(flagged), top.score, _largest_z(case), job.threshold, job.z_threshold,
                         job.selection_threshold, mismatch)


def _rule_columns(job: _Job) -> dict[str, Any]:
    """The flag rule and its thresholds, each in a column named by its unit."""
    rule = flag_rule(job.threshold, job.z_threshold, job.selection_threshold)
    return {"flag_rule": {"z": "kl_z_score", "nats": "largest_patch_kl_nats"}.get(rule, "none"),
            "z_threshold": job.z_threshold if rule == "z" else None,
            "nats_threshold": job.threshold if rule == "nats" else None}


def _table_header(job: _Job, selection: str) -> dict[str, Any]:
    summary = job.results.summary
    deidentified = job.pseudonyms is not None
    return {
        "klviewer_version": __version__, "exported": WITHHELD if deidentified else job.date,
        "results": WITHHELD if deidentified else str(job.results.path),
        "analysis": {"klviewer_version": summary.get("klviewer_version"),
                     "created": WITHHELD if deidentified else summary.get("created"), "settings": job.results.settings},
        "prior": {k: job.results.prior.get(k) for k in ("name", "sha256")},
        **_rule_columns(job), "flag_threshold_source": job.threshold_source, "slice_numbering": "from 0",
        "selection": selection, "formats": sorted(job.formats), "deidentified": deidentified,
    }
