"""Running studies on this machine: in this process (the default) or in N worker processes.

Worker processes are spawned (not forked, which is unsafe once torch has started threads), load
the prior once each, and share the machine's torch threads between them. Ctrl-C is handled by
the parent alone: it sets a shared cancel event and the workers stop within one sampler step.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from klviewer.batch.discover import StudyJob
from klviewer.batch.study import BatchSpec, SliceProgress, StudyOutcome, StudyWorker
from klviewer.errors import KlviewerError


class InProcessBackend:
    """One study at a time, in the calling process."""

    def __init__(self) -> None:
        self._worker: StudyWorker | None = None
        self._job: StudyJob | None = None
        self._emit: Callable[[SliceProgress], None] = lambda _p: None
        self._cancel: threading.Event | None = None

    def start(self, spec: BatchSpec, emit: Callable[[SliceProgress], None], cancel: threading.Event, n_jobs: int) -> None:
        self._worker, self._emit, self._cancel = StudyWorker(spec), emit, cancel

    @property
    def free_slots(self) -> int:
        return 0 if self._job is not None else 1

    def submit(self, job: StudyJob) -> None:
        self._job = job

    def poll(self, timeout: float) -> list[StudyOutcome]:
        if self._job is None or self._worker is None:
            return []
        job, self._job = self._job, None
        return [self._worker.run(job, self._emit, self._cancel)]

    def close(self) -> None:
        self._worker = None

    def describe(self) -> str:
        return "this process"


_worker: StudyWorker | None = None
_events: Any = None
_cancel: Any = None


def _init_worker(spec: BatchSpec, events: Any, cancel: Any) -> None:
    global _worker, _events, _cancel
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker, _events, _cancel = StudyWorker(spec), events, cancel


def _run_job(job: StudyJob) -> StudyOutcome:
    assert _worker is not None, "worker process was not initialised"
    return _worker.run(job, emit=_events.put, cancel=_cancel)


class ProcessBackend:
    """Up to `workers` studies at once, each in its own spawned worker process."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise KlviewerError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[Future[StudyOutcome], StudyJob] = {}
        self._threads = 1
        self._size = workers

    def start(self, spec: BatchSpec, emit: Callable[[SliceProgress], None], cancel: threading.Event, n_jobs: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._emit, self._cancel = emit, cancel
        self._events, self._shared_cancel = ctx.Queue(), ctx.Event()
        self._threads = max(1, torch.get_num_threads() // self.workers)
        spec = dataclasses.replace(spec, threads=self._threads)
        self._size = max(1, min(self.workers, n_jobs))
        self._pool = ProcessPoolExecutor(self._size, mp_context=ctx, initializer=_init_worker,
                                         initargs=(spec, self._events, self._shared_cancel))

    @property
    def free_slots(self) -> int:
        return self._size - len(self._futures)

    def submit(self, job: StudyJob) -> None:
        assert self._pool is not None, "start() first"
        self._futures[self._pool.submit(_run_job, job)] = job

    def poll(self, timeout: float) -> list[StudyOutcome]:
        if self._cancel.is_set():
            self._shared_cancel.set()
        outcomes = []
        if self._futures:
            finished, _ = wait(list(self._futures), timeout=timeout, return_when=FIRST_COMPLETED)
            for future in finished:
                job = self._futures.pop(future)
                try:
                    outcomes.append(future.result())
                except BrokenProcessPool as exc:
                    raise KlviewerError(
                        f"a worker process stopped unexpectedly (failed to start, killed, or out of memory) while "
                        f"analysing {job.id}; finished studies are kept: run the batch again to continue"
                    ) from exc
        self._drain()
        return outcomes

    def _drain(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            self._emit(event)

    def close(self) -> None:
        if self._pool is None:
            return
        self._shared_cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._drain()
        self._events.close()
        self._pool = None
        self._futures.clear()

    def describe(self) -> str:
        return f"{self.workers} local worker processes ({self._threads} torch thread(s) each)"
