"""Progress bars on stderr: the one adapter from the services' `progress(done, total)` callbacks to tqdm."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

Progress = Callable[[int, int], None]


@contextmanager
def progress_bar(desc: str, unit: str, *, quiet: bool = False, total: int | None = None) -> Iterator[Progress]:
    """A labelled bar; the yielded callback moves it to `done` of `total` (the total may change as work is planned)."""
    # delay: a command refused in its first moments leaves no empty bar behind.
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=quiet, dynamic_ncols=True, delay=0.5) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield progress


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
