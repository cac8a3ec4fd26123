"""One batch at a time per output folder.

Two runs on the same folder would analyse the same studies twice and overwrite each other's
manifest. A lock file names the run holding the folder; one left behind by a killed run on this
machine is recognised (its process is gone) and taken over.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import TracebackType

from klviewer.batch.manifest import now_iso
from klviewer.errors import KlviewerError, KlviewerInputError
from klviewer.io.json_input import read_json

LOCK_FILE = ".batch.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BatchLock:
    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._held = False

    def _holder(self) -> dict[str, object]:
        try:
            return read_json(self.path, 1 << 16, "batch lock")
        except KlviewerInputError:
            return {}

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid = holder.get("pid")
                if holder.get("host") == me["host"] and isinstance(pid, int) and not _alive(pid):
                    self.path.unlink(missing_ok=True)
                    continue
                raise KlviewerError(
                    f"{self.path.parent}: in use by another klviewer batch (pid {pid} on {holder.get('host')}, "
                    f"since {holder.get('started')}); if that run is gone, delete {self.path}"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(me, handle)
            self._held = True
            return
        raise KlviewerError(f"{self.path}: could not take the batch lock")

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "BatchLock":
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
