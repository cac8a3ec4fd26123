"""`klviewer batch`: analyse every study under the inputs, resumably, on a chosen backend.

Layout of the batch folder:
    manifest.json                  every study, its status and reason, and the pinned settings
    batch_summary.json / .csv      every analysed slice of every finished study
    studies/<study id>/            one `klviewer analyze` results folder per study
    export/<study id>/             with --export
A study is one unit of work: its folder appears complete or not at all, and the manifest is
saved after every study, so a re-run picks up exactly the studies that are not finished.
"""

from __future__ import annotations

import shutil
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from klviewer.batch.backend import Backend
from klviewer.batch.discover import Discovery, StudyJob, discover_studies
from klviewer.batch.export_step import ExportOptions, check_export, export_studies
from klviewer.batch.local import InProcessBackend
from klviewer.batch.lock import LOCK_FILE, BatchLock
from klviewer.batch.manifest import (
    DONE,
    MANIFEST_FILE,
    PENDING,
    STUDIES_DIR,
    Manifest,
    StudyRecord,
    batch_config,
    now_iso,
)
from klviewer.batch.study import CANCELLED, BatchSpec, SliceProgress, StudyOutcome, partial_folders
from klviewer.batch.summary import BatchResult, study_rows, write_batch_summary
from klviewer.errors import KlviewerInputError
from klviewer.inference.calibration import PriorCalibration
from klviewer.inference.escalation import Escalation, escalation_rule
from klviewer.inference.plan import parse_slices
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.safe_write import check_output_folder
from klviewer.priors.checkpoint import DEFAULT_PRIOR, load_prior, prior_fingerprint, resolve_prior_path

POLL_SECONDS = 0.5


class BatchObserver:
    """Progress hooks, called on the thread running `run_batch`. The defaults do nothing."""

    def on_start(self, to_run: list[StudyJob], already_done: int) -> None:
        pass

    def on_slice(self, progress: SliceProgress) -> None:
        pass

    def on_study(self, record: StudyRecord) -> None:
        """After a study finished or failed, once the manifest records it."""


def _require_batch_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise KlviewerInputError(out, "exists and is not a folder")
    # A lock alone is what a run killed before its first manifest save leaves behind.
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise KlviewerInputError(out, f"is not empty and holds no batch {MANIFEST_FILE}: give a new or empty folder, "
                                      "or the folder of an earlier batch to resume it")


def _merge(manifest: Manifest, inputs: Sequence[Path], discovery: Discovery) -> list[str]:
    """Add newly found studies; returns warnings about finished studies whose files changed."""
    manifest.add_inputs([str(p.resolve()) for p in inputs])
    warnings = []
    for job in discovery.studies:
        record, fresh = manifest.studies.get(job.id), StudyRecord.from_job(job)
        if record is None:
            manifest.studies[job.id] = fresh
        elif record.status != DONE:
            record.source, record.files = fresh.source, fresh.files
        elif fresh.files != record.files:
            warnings.append(f"{job.id} has {fresh.files} file(s) now but had {record.files} when it was "
                            f"analysed; delete {record.results} to analyse it again")
    return warnings


def _reconcile(out: Path, manifest: Manifest) -> list[str]:
    """Make the manifest agree with the result folders on disk, after a run that was killed."""
    for partial in partial_folders(out / STUDIES_DIR):
        shutil.rmtree(partial)
    warnings = []
    for record in manifest.records():
        finished = (out / record.results / "summary.json").is_file()
        if record.status == DONE and not finished:
            record.status = PENDING
            warnings.append(f"{record.id}: its results folder is missing or incomplete; analysing it again")
        elif record.status != DONE and finished:
            # Renamed into place, but the run stopped before the manifest said so.
            rows = study_rows(out, record)
            record.status, record.reason, record.traceback = DONE, None, None
            record.slices, record.flagged = len(rows), sum(1 for r in rows if r["flagged"])
    return warnings


def _record(manifest: Manifest, outcome: StudyOutcome) -> StudyRecord:
    record = manifest.studies[outcome.study_id]
    if outcome.status == CANCELLED:
        return record
    record.status, record.reason, record.traceback = outcome.status, outcome.reason, outcome.traceback
    record.slices, record.flagged, record.seconds = outcome.slices, outcome.flagged, outcome.seconds
    record.device, record.worker, record.finished = outcome.device, outcome.worker, now_iso()
    record.attempts += 1
    return record


def _run_jobs(backend: Backend, jobs: list[StudyJob], manifest: Manifest, observer: BatchObserver,
              cancel: threading.Event) -> list[str]:
    """Keep every worker busy until the jobs are done (or cancelled); returns the ids that ran."""
    pending, running, ran = deque(jobs), 0, []

    def fill() -> None:
        nonlocal running
        while pending and not cancel.is_set() and backend.free_slots > 0:
            backend.submit(pending.popleft())
            running += 1

    while running or (pending and not cancel.is_set()):
        fill()
        outcomes = backend.poll(POLL_SECONDS)
        if not outcomes:
            continue
        running -= len(outcomes)
        records = [_record(manifest, outcome) for outcome in outcomes]
        # Free workers get their next study before the save; when studies finish faster than the
        # manifest is written, one save covers all of them.
        fill()
        manifest.save()
        for outcome, record in zip(outcomes, records):
            if outcome.status != CANCELLED:
                ran.append(record.id)
                observer.on_study(record)
    return ran


def run_batch(
    inputs: Sequence[str | Path],
    out: str | Path,
    settings: AnalysisSettings,
    *,
    prior: str | Path = DEFAULT_PRIOR,
    slices: str = "all",
    backend: Backend | None = None,
    export: ExportOptions | None = None,
    observer: BatchObserver | None = None,
    cancel: threading.Event | None = None,
    escalation: Escalation | None = None,
) -> BatchResult:
    """Analyse every study under `inputs` into `out`, skipping studies an earlier run finished.
    `escalation` runs each study in two stages (`klviewer.inference.escalation`).

    A study that fails is recorded with its reason and the others go on. Setting `cancel` stops
    the batch after (in this process: within) the running studies; they stay pending.
    """
    out = Path(out)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise KlviewerInputError(None, "no inputs given")
    for path in paths:
        if not path.exists():
            raise KlviewerInputError(path, "does not exist")
    check_output_folder(out, paths)
    parse_slices(slices, 1)
    if export is not None:
        check_export(export)
    _require_batch_folder(out)
    prior_path = resolve_prior_path(prior)
    load_prior(prior_path)  # refuse a broken prior here, before any worker starts
    if escalation is not None:  # refuse a prior not calibrated for both stages here, before any worker starts
        escalation_rule(PriorCalibration.read(prior_path), settings, escalation)
    config = batch_config(settings, slices, prior_path.name, prior_fingerprint(prior_path), escalation)
    observer = observer or BatchObserver()
    cancel = cancel or threading.Event()
    backend = backend or InProcessBackend()

    manifest_path = out / MANIFEST_FILE
    discovery = discover_studies(paths)
    if not discovery.studies and not manifest_path.is_file():
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in discovery.skipped[:3])
        raise KlviewerInputError(None, "no studies found under the inputs" + (f" ({reasons})" if reasons else ""))

    out.mkdir(parents=True, exist_ok=True)
    with BatchLock(out):
        manifest = Manifest.load(manifest_path) if manifest_path.is_file() else Manifest(manifest_path, config)
        manifest.require_config(config)
        warnings = _merge(manifest, paths, discovery) + _reconcile(out, manifest)
        found = {job.id for job in discovery.studies}
        lost = [r.id for r in manifest.records() if r.id not in found and r.status != DONE]
        if lost:
            warnings.append(f"{len(lost)} unfinished study(ies) from earlier runs are not under the inputs given now: "
                            + ", ".join(lost[:5]))
        manifest.save()
        jobs = [job for job in discovery.studies if manifest.studies[job.id].status != DONE]
        already_done = [job.id for job in discovery.studies if manifest.studies[job.id].status == DONE]
        observer.on_start(jobs, len(already_done))

        ran: list[str] = []
        ran_on = "nothing (no study left to analyse)"
        if jobs:
            spec = BatchSpec(settings, str(prior_path), slices, str(out / STUDIES_DIR), escalation=escalation)
            try:
                backend.start(spec, observer.on_slice, cancel, len(jobs))
                ran_on = backend.describe()
                ran = _run_jobs(backend, jobs, manifest, observer, cancel)
            finally:
                backend.close()

        if export is not None and not cancel.is_set():
            export_studies(out, manifest, export, settings.flag_threshold)
        rows = [row for r in manifest.records() if r.status == DONE for row in study_rows(out, r)]
        write_batch_summary(out, manifest, rows, discovery.skipped)
        return BatchResult(out=out, backend=ran_on, studies=manifest.records(), rows=rows, ran=ran,
                           already_done=already_done, skipped=discovery.skipped, warnings=warnings,
                           cancelled=cancel.is_set())
