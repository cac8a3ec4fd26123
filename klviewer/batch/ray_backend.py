"""Studies fanned out to Ray actors that keep the prior loaded: one per GPU, or one per CPU when
the cluster has no free GPU.

Ray is an optional extra (`pip install 'klviewer[cluster]'`) and is imported only when a batch
asks for it. Every node needs the same klviewer version, and must see the inputs, the prior and
the output folder at the same paths (a shared file system): actors read their study's files and
write its results folder themselves, so only outcomes and progress travel through Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

from klviewer import __version__
from klviewer.batch.discover import StudyJob
from klviewer.batch.manifest import FAILED
from klviewer.batch.study import CANCELLED, BatchSpec, SliceProgress, StudyOutcome, StudyWorker
from klviewer.devices import DeviceUnavailableError
from klviewer.errors import KlviewerError


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise KlviewerError("Ray is not installed: --ray needs the optional extra, pip install 'klviewer[cluster]'") from exc
    return ray


class StudyActor:
    """The body of each Ray actor: a StudyWorker that lives as long as the batch."""

    def __init__(self, spec: BatchSpec, events: Any) -> None:
        self._worker = StudyWorker(spec)
        self._events = events

    def describe(self) -> dict[str, str]:
        return self._worker.describe()

    def run(self, job: StudyJob) -> StudyOutcome:
        return self._worker.run(job, emit=self._events.put)


class RayBackend:
    """`address`: 'auto' (a running cluster), 'local' (start one on this machine), 'ray://host:port'
    or 'host:port'; None uses the Ray session this process has already started, or starts a local one.
    `max_actors` caps the number of actors (default: every free GPU, else every free CPU)."""

    def __init__(self, address: str | None = None, max_actors: int | None = None) -> None:
        self.address = address
        self.max_actors = max_actors
        self._ray: Any = None
        self._owns_session = False
        self._actors: list[Any] = []
        self._idle: list[Any] = []
        self._running: dict[Any, tuple[Any, StudyJob]] = {}
        self._events: Any = None
        self._kind = "CPU"

    def start(self, spec: BatchSpec, emit: Callable[[SliceProgress], None], cancel: threading.Event, n_jobs: int) -> None:
        ray = self._ray = import_ray()
        self._emit, self._cancel = emit, cancel
        if not ray.is_initialized():
            local = self.address in (None, "local")
            ray.init(address=self.address, logging_level=logging.WARNING, **({"include_dashboard": False} if local else {}))
            self._owns_session = True
        free = ray.available_resources()
        device = spec.settings.device
        gpus = 0 if device == "cpu" else int(free.get("GPU", 0))
        if device.startswith("cuda") and gpus == 0:
            raise DeviceUnavailableError("--device cuda was asked for, but the Ray cluster has no free GPU")
        slots = gpus or int(free.get("CPU", 0))
        if slots < 1:
            raise KlviewerError("the Ray cluster has no free CPU or GPU for a worker")
        self._kind = "GPU" if gpus else "CPU"
        n = min(slots, max(1, n_jobs), self.max_actors or slots)
        options = {"num_cpus": 1, "num_gpus": 1} if gpus else {"num_cpus": 1}
        actor_class = ray.remote(**options)(StudyActor)

        from ray.util.queue import Queue

        self._events = Queue(actor_options={"num_cpus": 0})
        # One thread per actor: a CPU actor owns one CPU, and a GPU actor's CPU work is light.
        actor_spec = dataclasses.replace(spec, threads=1)
        self._actors = [actor_class.remote(actor_spec, self._events) for _ in range(n)]
        try:
            infos = ray.get([a.describe.remote() for a in self._actors])
        except ray.exceptions.RayError as exc:
            raise KlviewerError(f"a Ray worker could not start (is klviewer installed on every node, and are the "
                                f"prior and inputs at the same paths there?): {exc}") from exc
        versions = {i["version"] for i in infos}
        if versions != {__version__}:
            raise KlviewerError(f"Ray workers run klviewer {', '.join(sorted(versions))} but this process runs "
                                f"{__version__}; install the same version on every node")
        self._idle = list(self._actors)

    @property
    def free_slots(self) -> int:
        return len(self._idle)

    def submit(self, job: StudyJob) -> None:
        actor = self._idle.pop()
        self._running[actor.run.remote(job)] = (actor, job)

    def poll(self, timeout: float) -> list[StudyOutcome]:
        ray = self._ray
        if self._cancel.is_set() and self._running:
            # A running actor call cannot be interrupted; the actor is stopped instead, and the
            # partial folder it leaves is removed by the next run.
            stopped = [StudyOutcome(job.id, CANCELLED, "cancelled") for _, job in self._running.values()]
            for actor, _ in self._running.values():
                ray.kill(actor)
                self._actors.remove(actor)
            self._running.clear()
            return stopped
        outcomes = []
        if self._running:
            ready, rest = ray.wait(list(self._running), num_returns=1, timeout=timeout)
            if ready and rest:
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                actor, job = self._running.pop(ref)
                try:
                    outcomes.append(ray.get(ref))
                    self._idle.append(actor)
                except ray.exceptions.RayActorError as exc:
                    self._actors.remove(actor)
                    outcomes.append(StudyOutcome(job.id, FAILED, f"the Ray worker analysing this study died: {exc}"))
                except ray.exceptions.RayError as exc:
                    self._idle.append(actor)
                    outcomes.append(StudyOutcome(job.id, FAILED, f"Ray error: {exc}"))
        self._drain()
        if not self._actors:
            raise KlviewerError("every Ray worker has died; finished studies are kept: run the batch again to continue")
        return outcomes

    def _drain(self) -> None:
        if self._events is None:
            return
        waiting = self._events.qsize()
        if waiting:
            for event in self._events.get_nowait_batch(waiting):
                self._emit(event)

    def close(self) -> None:
        ray = self._ray
        if ray is None:
            return
        if ray.is_initialized():
            if self._events is not None:
                self._drain()
            for actor in self._actors:
                ray.kill(actor)
            if self._events is not None:
                self._events.shutdown()
            if self._owns_session:
                ray.shutdown()
        self._actors, self._idle, self._events, self._ray = [], [], None, None
        self._running.clear()

    def describe(self) -> str:
        return f"{len(self._actors)} Ray {self._kind} actor(s)"
