"""Open whatever a user points at: DICOM files, folders, DICOMDIRs, arrays, sinograms, NIfTI
volumes and InVesalius projects.

Folders are walked recursively. Every file either lands in the catalog or in `Catalog.skipped`
with the reason, so a bad file never hides the rest of a study.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from klviewer.errors import KlviewerInputError
from klviewer.io.arrays import ARRAY_SUFFIXES, read_array_image
from klviewer.io.dicom import read_dicom_files
from klviewer.io.input_files import check_path, link_problem, not_regular_reason, path_problem, real
from klviewer.io.inv3 import INV3_SUFFIX, read_inv3
from klviewer.io.nifti import is_nifti, read_nifti
from klviewer.io.sidecar import read_json_sidecar
from klviewer.io.sinogram import RAW_SUFFIXES, is_sinogram_sidecar, read_sinogram
from klviewer.io.study import Catalog, SkippedFile


def _walk(folder: Path, skipped: list[SkippedFile]) -> list[Path]:
    """Every regular file under `folder`; links out of it, link loops, FIFOs and devices go to `skipped`."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, onerror=None, followlinks=False):
        dirs.sort()
        for name in sorted(dirs):
            if os.path.islink(os.path.join(root, name)):
                skipped.append(SkippedFile(Path(root) / name, "a symbolic link to a folder; not followed"))
        for name in sorted(files):
            path = Path(root) / name
            problem = link_problem(path, folder) or not_regular_reason(path)
            if problem is None:
                found.append(path)
            else:
                skipped.append(SkippedFile(path, problem))
    return found


def expand_inputs(paths: Sequence[str | Path], skipped: list[SkippedFile]) -> list[Path]:
    """The files named or found under `paths`, each once; what must not be read goes to `skipped`
    with the reason. Raises only when a path itself is unusable."""
    files: list[Path] = []
    for raw in paths:
        path = check_path(raw)
        if path.is_dir():
            before = len(skipped)
            contents = _walk(path, skipped)
            if not contents and len(skipped) == before:
                raise KlviewerInputError(path, "folder contains no files")
            files.extend(contents)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise KlviewerInputError(path, f"{not_regular_reason(path) or 'is neither a file nor a folder'}")
        elif path.is_symlink():
            raise KlviewerInputError(path, "is a symbolic link that cannot be followed (broken or looping)")
        else:
            raise KlviewerInputError(path, "does not exist")
    unique: dict[str, Path] = {}
    for f in files:
        unique.setdefault(real(f), f)
    return list(unique.values())


def _sinogram_sidecars(files: Iterable[Path], catalog: Catalog) -> tuple[list[Path], set[str]]:
    """Find sinogram sidecars, and the data files they claim, so those are not read as images."""
    sidecars: list[Path] = []
    claimed: set[str] = set()
    for f in files:
        if f.suffix.lower() != ".json":
            continue
        try:
            doc = read_json_sidecar(f)
        except KlviewerInputError as exc:
            catalog.skipped.append(SkippedFile(f, exc.problem))
            claimed.add(real(f))
            continue
        if not is_sinogram_sidecar(doc):
            continue
        sidecars.append(f)
        claimed.add(real(f))
        data = doc.get("data")
        named = data.get("file") if isinstance(data, dict) else None
        if isinstance(named, str) and path_problem(named) is None:
            claimed.add(real(f.parent / named))
        for suffix in (*ARRAY_SUFFIXES, *RAW_SUFFIXES):
            claimed.add(real(f.with_suffix(suffix)))
    return sidecars, claimed


def _read_volume(path: Path) -> Catalog:
    return read_inv3(path) if path.suffix.lower() == INV3_SUFFIX else read_nifti(path)


def open_paths(paths: Sequence[str | Path]) -> Catalog:
    """Load everything under `paths` into one catalog. Raises only when a path itself is unusable."""
    catalog = Catalog()
    files = expand_inputs(paths, catalog.skipped)
    sidecars, claimed = _sinogram_sidecars(files, catalog)
    array_files = [f for f in files if f.suffix.lower() in ARRAY_SUFFIXES and real(f) not in claimed]
    array_sidecars = {real(f.with_suffix(".json")) for f in array_files}
    dicom_candidates: list[Path] = []
    volume_files: list[Path] = []

    for f in files:
        key = real(f)
        suffix = f.suffix.lower()
        if key in claimed or key in array_sidecars or suffix in ARRAY_SUFFIXES:
            continue
        if suffix == ".json":
            catalog.skipped.append(SkippedFile(f, "JSON file with no matching array or sinogram data"))
        elif suffix in RAW_SUFFIXES:
            catalog.skipped.append(SkippedFile(f, "raw data without a sinogram sidecar (<name>.json)"))
        elif suffix == INV3_SUFFIX or is_nifti(f):
            volume_files.append(f)
        else:
            dicom_candidates.append(f)

    for loader, inputs in ((read_sinogram, sidecars), (read_array_image, array_files), (_read_volume, volume_files)):
        for f in inputs:
            try:
                catalog.merge(loader(f))
            except KlviewerInputError as exc:
                catalog.skipped.append(SkippedFile(exc.path or f, exc.problem))
    if dicom_candidates:
        catalog.merge(read_dicom_files(dicom_candidates))
    return catalog


def open_images(paths: Sequence[str | Path]) -> Catalog:
    """Like `open_paths`, but an input with nothing loadable is an error that lists why."""
    catalog = open_paths(paths)
    if not catalog.all_series():
        reasons = "; ".join(f"{s.path.name}: {s.reason}" for s in catalog.skipped[:5])
        more = f" (and {len(catalog.skipped) - 5} more)" if len(catalog.skipped) > 5 else ""
        where = paths[0] if len(paths) == 1 else None
        raise KlviewerInputError(where, f"no loadable images found. {reasons}{more}")
    return catalog
