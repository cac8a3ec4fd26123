"""Atomic, non-clobbering file writes (a temporary file beside the target, then a rename), and outputs kept out of
input folders."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from klviewer.errors import OVERWRITE_HINT, KlviewerError, KlviewerInputError
from klviewer.io.input_files import inside


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; outputs should get the usual permissions.
_FILE_MODE = 0o666 & ~_current_umask()


class OutputExistsError(KlviewerError, FileExistsError):
    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{path}: already exists; refusing to overwrite ({OVERWRITE_HINT})")


def atomic_write(path: Path, write: Callable[[BinaryIO], None], *, overwrite: bool = False) -> Path:
    """Write through `write(fileobj)` into a temporary file, then move it into place.

    Either the complete file appears at `path` or nothing does, even when `write` fails midway.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp_name, path)
        else:
            # link() fails if the target appeared meanwhile, so a concurrent writer is never clobbered.
            try:
                os.link(tmp_name, path)
            except FileExistsError:
                raise OutputExistsError(path) from None
            os.unlink(tmp_name)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def atomic_write_text(path: Path, text: str, *, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), overwrite=overwrite)


def check_output_folder(out: Path, inputs: Sequence[str | Path]) -> None:
    """Results never go into (or over) an input folder."""
    for raw in inputs:
        src = Path(raw)
        folder = src if src.is_dir() else src.parent
        if inside(out, folder) or (src.is_dir() and inside(folder, out)):
            raise KlviewerInputError(out, f"output folder overlaps the input {src}; choose a folder outside the inputs")
