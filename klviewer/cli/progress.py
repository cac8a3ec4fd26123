"""Progress bars on stderr: the one adapter from the services' `progress(done, total)` callbacks to tqdm;
and Ctrl-C as the services' cancel event."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

Progress = Callable[[int, int], None]


@contextmanager
def interrupt_cancels() -> Iterator[threading.Event]:
    """A cancel event that Ctrl-C sets, as the app's Cancel does: a resumable run stops within a step and
    leaves what it has made for --resume, instead of dying mid-write. The previous handler comes back after."""
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def progress_bar(desc: str, unit: str, *, quiet: bool = False) -> Iterator[Progress]:
    """A labelled bar; the yielded callback moves it to `done` of `total` (the total may change as work is planned).

    The bar is made at the first report, when its total is known: a command refused before any work
    (a missing prior, a bad input) leaves no empty "0step [00:00, ?step/s]" bar on stderr.
    """
    bar: tqdm | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=quiet, dynamic_ncols=True, delay=0.5)
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


class StageBars:
    """One labelled bar per stage of a job (align: reconstruct, then align); a new stage closes the last one's bar."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._bars: dict[str, tqdm] = {}

    def update(self, stage: str, done: int, total: int, unit: str = "step", loss: float | None = None) -> None:
        bar = self._bars.get(stage)
        if bar is None:
            self.close()
            # initial: a resumed run starts its bar where the run was, and its rate counts new steps only.
            bar = self._bars[stage] = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, disable=self.quiet,
                                           dynamic_ncols=True, initial=max(done - 1, 0))
        bar.update(done - bar.n)
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
