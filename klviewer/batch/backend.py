"""What the batch runner needs from a place that runs studies (this process, worker processes, Ray)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from klviewer.batch.discover import StudyJob
from klviewer.batch.study import BatchSpec, SliceProgress, StudyOutcome


class Backend(Protocol):
    def start(self, spec: BatchSpec, emit: Callable[[SliceProgress], None], cancel: threading.Event, n_jobs: int) -> None:
        """Start workers (each loads the prior once) for up to `n_jobs` studies.

        `emit` is called on the caller's thread. Once `cancel` is set, running studies stop and come
        back from `poll` as cancelled.
        """

    @property
    def free_slots(self) -> int:
        """How many more studies `submit` takes now."""

    def submit(self, job: StudyJob) -> None: ...

    def poll(self, timeout: float) -> list[StudyOutcome]:
        """Outcomes of studies finished since the last call; waits up to `timeout` s for one."""

    def close(self) -> None:
        """Stop the workers. Safe to call more than once, and after a failed `start`."""

    def describe(self) -> str: ...
