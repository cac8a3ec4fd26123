"""Analysing one study inside a worker that keeps the prior loaded.

Every backend (this process, local worker processes, Ray actors) runs studies through
`StudyWorker`, so a study gives the same files and numbers wherever it runs. A study is written
into a hidden `.<id>.<random>.partial` folder and renamed to `studies/<id>` only when complete: a result
folder is therefore always whole, and a study killed mid-way leaves only a partial folder that the
next run removes.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from klviewer import __version__
from klviewer.batch.discover import StudyJob
from klviewer.batch.manifest import DONE, FAILED
from klviewer.errors import KlviewerError
from klviewer.inference.escalation import Escalation
from klviewer.inference.pipeline import LoadedPrior
from klviewer.inference.plan import plan_series
from klviewer.inference.sampler import AnalysisCancelled
from klviewer.inference.settings import AnalysisSettings
from klviewer.io.loader import open_images
from klviewer.results.analyze import analyze_plan
from klviewer.results.summary import AnalysisRun

PARTIAL_SUFFIX = ".partial"
CANCELLED = "cancelled"


@dataclass(frozen=True)
class BatchSpec:
    """Everything a worker needs to analyse studies; small and picklable, sent to each worker once."""

    settings: AnalysisSettings
    prior_path: str
    slices: str
    studies_dir: str
    threads: int | None = None
    """torch CPU threads for the worker; None leaves the process's setting alone."""
    escalation: Escalation | None = None
    """Two-stage screening (`klviewer.inference.escalation`); None: one stage."""


@dataclass(frozen=True)
class SliceProgress:
    study_id: str
    done: int
    total: int


@dataclass
class StudyOutcome:
    study_id: str
    status: str
    """'done', 'failed', or 'cancelled' (stopped on request; the study stays pending)."""
    reason: str | None = None
    traceback: str | None = None
    slices: int = 0
    flagged: int = 0
    seconds: float = 0.0
    device: str = ""
    worker: str = ""


def partial_folders(studies_dir: Path) -> list[Path]:
    return [p for p in studies_dir.glob(f".*{PARTIAL_SUFFIX}") if p.is_dir()] if studies_dir.is_dir() else []


class StudyWorker:
    """Loads the prior once, then analyses any number of studies with it."""

    def __init__(self, spec: BatchSpec) -> None:
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.loaded = LoadedPrior.load(spec.prior_path, spec.settings.device)
        self.device = self.loaded.device
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def describe(self) -> dict[str, str]:
        return {"version": __version__, "device": str(self.device), "worker": self.name}

    def run(self, job: StudyJob, emit: Callable[[SliceProgress], None] | None = None,
            cancel: threading.Event | None = None) -> StudyOutcome:
        """Analyse `job` into studies/<id>; any failure is returned as the outcome, never raised."""
        start = time.perf_counter()
        outcome = StudyOutcome(job.id, FAILED, device=str(self.device), worker=self.name)
        studies = Path(self.spec.studies_dir)
        final = studies / job.id
        if final.exists():
            outcome.reason = f"{final} exists but is not a finished result of this batch; remove it to analyse the study"
            return outcome
        partial = studies / f".{job.id}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}"
        try:
            partial.mkdir(parents=True)
            run = self._analyze(job, partial, emit or (lambda _p: None), cancel)
            os.rename(partial, final)
        except AnalysisCancelled:
            outcome.status, outcome.reason = CANCELLED, "cancelled"
        except KlviewerError as exc:
            outcome.reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - one study's failure, whatever it is, must not stop the batch
            outcome.reason = f"{type(exc).__name__}: {exc}"
            outcome.traceback = traceback.format_exc()
        else:
            outcome.status = DONE
            outcome.slices = len(run.rows)
            outcome.flagged = sum(1 for r in run.rows if r["flagged"])
        finally:
            shutil.rmtree(partial, ignore_errors=True)
            outcome.seconds = round(time.perf_counter() - start, 3)
        return outcome

    def _analyze(self, job: StudyJob, folder: Path, emit: Callable[[SliceProgress], None],
                 cancel: threading.Event | None) -> AnalysisRun:
        # The same code as `klviewer analyze` with the prior already loaded: each study's folder
        # is exactly an analyze results folder.
        plan = plan_series(open_images(list(job.inputs)), self.spec.slices)
        emit(SliceProgress(job.id, 0, plan.n_slices))
        done = 0

        def slice_done(_row: dict, _result: object) -> None:
            nonlocal done
            done += 1
            emit(SliceProgress(job.id, done, plan.n_slices))

        run = analyze_plan(plan, folder, self.spec.settings, self.loaded, escalation=self.spec.escalation, cancel=cancel,
                           on_slice=slice_done)
        return run
