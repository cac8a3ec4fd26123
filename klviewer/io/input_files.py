"""Opening input files so that nothing an input folder holds can block, flood or lead a reader astray.

- Only regular files are read. A FIFO blocks `open()` until someone writes to it, and a device
  (`/dev/zero`) never ends. Files are opened with O_NONBLOCK, so even a FIFO returns at once, and
  what was opened is checked with fstat, so a file swapped for a FIFO after a check is caught too.
- A symbolic link found inside an input folder is followed only when it stays inside that folder:
  a link out of it could pull any file on the machine into an analysis or an export.
- Reads are bounded by the file's size and a limit per kind of file.
- A NUL character in a path is refused with the file named (the OS would raise ValueError).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from klviewer.errors import KlviewerInputError


def path_problem(path: str | Path) -> str | None:
    """Why `path` cannot name a file at all (NUL characters), or None."""
    return "the path holds a NUL character" if "\x00" in str(path) else None


def check_path(path: str | Path) -> Path:
    problem = path_problem(path)
    if problem is not None:
        raise KlviewerInputError(str(path).replace("\x00", "\\0"), problem)
    return Path(path)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def not_regular_reason(path: Path) -> str | None:
    """Why `path` is not a readable regular file (it is missing, a FIFO, a device, a link loop...), or None."""
    problem = path_problem(path)
    if problem is not None:
        return problem
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None if stat.S_ISREG(mode) else f"is {_kind(mode)}, not a regular file; not read"


def open_input(path: str | Path) -> BinaryIO:
    """Open a regular file for reading in binary; anything else is refused without blocking."""
    path = check_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise KlviewerInputError(path, f"cannot be opened ({exc.strerror or exc})") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise KlviewerInputError(path, f"is {_kind(mode)}, not a regular file; not read")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_input_bytes(path: str | Path, max_bytes: int, what: str = "file") -> bytes:
    """The whole file, refused (naming it) when it is larger than `max_bytes`."""
    with open_input(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise KlviewerInputError(path, f"{what} is {size} bytes, more than the {max_bytes} allowed")
        # read(n) allocates n bytes up front: ask for what the file holds, plus one to see it grow.
        data = handle.read(size + 1)
    if len(data) > size:  # grew while being read
        raise KlviewerInputError(path, f"{what} grew while it was being read; not read")
    return data


def read_up_to(handle: BinaryIO, nbytes: int, block: int = 1 << 24) -> bytes:
    """At most `nbytes` from `handle`, read in blocks: memory follows the data that is really there,
    never a size a header declared (read(n) on a file or a decompressing stream allocates n at once)."""
    data = bytearray()
    while len(data) < nbytes:
        chunk = handle.read(min(block, nbytes - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def real(path: str | Path) -> str:
    """The path with every link resolved; unlike Path.resolve on Python 3.11 it never raises on link loops."""
    return os.path.realpath(path)


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path`, links resolved, lies in `folder` (links resolved too)."""
    target, root = real(path), real(folder)
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def link_problem(path: Path, folder: Path) -> str | None:
    """Why a file found in the input folder `folder` must not be followed, or None when it may be read.

    A plain file is fine; a link is fine when it resolves to a regular file inside `folder`.
    """
    problem = path_problem(path)
    if problem is not None:
        return problem
    try:
        if not os.path.islink(path):
            return None
    except (OSError, ValueError) as exc:
        return f"cannot be read ({exc})"
    try:
        os.stat(path)
    except OSError as exc:
        return f"a symbolic link that cannot be followed ({exc.strerror or exc}: broken or looping)"
    if not inside(path, folder):
        return f"a symbolic link to {real(path)}, outside the input folder {folder}; not followed"
    return None
