"""Finding the studies under a batch's inputs, without reading any pixel data.

A study is what the loaders make one: DICOM files sharing a (PatientID, StudyInstanceUID), and
each array or sinogram file on its own (`read_array_image` and `read_sinogram` give every file
its own study). Discovery reads only DICOM headers, JSON sidecars and npz directories, so it
stays quick on an archive; each study is loaded in full only by the worker that analyses it.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import MediaStorageDirectoryStorage

from klviewer.errors import KlviewerInputError, shorten
from klviewer.io.arrays import ARRAY_SUFFIXES, NPZ_IMAGE_KEYS
from klviewer.io.dicom import read_bounded_dataset
from klviewer.io.loader import expand_inputs
from klviewer.io.study import SkippedFile
from klviewer.io.sidecar import read_json_sidecar
from klviewer.io.sinogram import RAW_SUFFIXES, is_sinogram_sidecar



@dataclass(frozen=True)
class StudyJob:
    """One unit of batch work: the files of one study, analysed together into one folder."""

    id: str
    """Folder name under studies/ and key of the manifest: readable, filesystem-safe, stable."""
    key: str
    """What identifies the study across runs: 'dicom:<patient>|<study uid>' or 'file:<resolved path>'."""
    kind: str
    """'dicom', 'array' or 'sinogram'."""
    inputs: tuple[str, ...]
    patient_id: str = ""
    study_uid: str = ""
    description: str = ""
    date: str = ""


@dataclass
class Discovery:
    studies: list[StudyJob] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    """{"path", "reason"} for every file that belongs to no study."""


def study_id(readable: str, key: str) -> str:
    """`readable` made safe for a folder name, plus a hash of `key` so that ids never collide."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("._-")[:48] or "study"
    return f"{stem}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:8]}"


def _files_under(inputs: Sequence[str | Path], found: Discovery) -> list[Path]:
    """The loader's own walk (regular files only, no links out of the folders), with a DICOMDIR
    standing for its folder, whose files it lists."""
    paths = [Path(p).parent if Path(p).is_file() and Path(p).name.upper() == "DICOMDIR" else p for p in inputs]
    skipped: list[SkippedFile] = []
    files = expand_inputs(paths, skipped)
    found.skipped.extend({"path": str(s.path), "reason": s.reason} for s in skipped)
    return files


def _npz_refusal(path: Path) -> str | None:
    """Why an npz holds no image (e.g. a mask file beside the images), read from its zip index only.

    An npz that cannot be opened at all is left to the loader, so that it fails as a study and
    the loader's own message says what is wrong.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    if len(names) > 1 and "meta" in names:
        names.remove("meta")
    if len(names) == 1 or any(k in names for k in NPZ_IMAGE_KEYS):
        return None
    return f"npz holds {names or 'no arrays'}, none of them an image ({', '.join(NPZ_IMAGE_KEYS)} or a single array)"


def discover_studies(inputs: Sequence[str | Path]) -> Discovery:
    """Every study under `inputs` (folders are walked; files are taken as they are), sorted by id."""
    found = Discovery()
    files = _files_under(inputs, found)
    claimed: set[str] = set()
    array_stems = {f.with_suffix("") for f in files if f.suffix.lower() in ARRAY_SUFFIXES}

    def skip(path: Path, reason: str) -> None:
        found.skipped.append({"path": str(path), "reason": reason})

    for f in files:
        if f.suffix.lower() != ".json":
            continue
        try:
            doc = read_json_sidecar(f)
        except KlviewerInputError as exc:
            skip(f, exc.problem)
            continue
        if is_sinogram_sidecar(doc):
            data = doc.get("data")
            named = data.get("file") if isinstance(data, dict) else None
            claimed.update(os.path.realpath(f.with_suffix(s)) for s in (*ARRAY_SUFFIXES, *RAW_SUFFIXES))
            if isinstance(named, str):
                claimed.add(os.path.realpath(f.parent / named))
            key = f"file:{os.path.realpath(f)}"
            found.studies.append(StudyJob(study_id(f.stem, key), key, "sinogram", (str(f),), description=f.name))
        elif f.with_suffix("") not in array_stems:
            skip(f, "JSON file with no matching array or sinogram data")

    dicom: dict[tuple[str, str], list[Path]] = defaultdict(list)
    headers: dict[tuple[str, str], pydicom.Dataset] = {}
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".json" or os.path.realpath(f) in claimed:
            continue
        if suffix in ARRAY_SUFFIXES:
            refusal = _npz_refusal(f) if suffix == ".npz" else None
            if refusal:
                skip(f, refusal)
                continue
            key = f"file:{os.path.realpath(f)}"
            found.studies.append(StudyJob(study_id(f.stem, key), key, "array", (str(f),), description=f.name))
            continue
        if suffix in RAW_SUFFIXES:
            skip(f, "raw data without a sinogram sidecar (<name>.json)")
            continue
        try:
            ds = read_bounded_dataset(f, header_only=True)
            patient = str(ds.get("PatientID", "") or "") or str(ds.get("PatientName", "") or "") or "UNKNOWN"
            uid = str(ds.get("StudyInstanceUID", "") or "") or f"no StudyInstanceUID, folder {f.parent}"
        except KlviewerInputError as exc:
            skip(f, exc.problem)
            continue
        except Exception as exc:  # noqa: BLE001 - pydicom converts values lazily and raises many types for damaged ones
            skip(f, f"unreadable DICOM header ({type(exc).__name__}: {shorten(str(exc), 300)})")
            continue
        meta = getattr(ds, "file_meta", None)
        if f.name.upper() == "DICOMDIR" or (meta is not None and meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage):
            skip(f, "DICOMDIR: the files it lists are found by walking its folder")
            continue
        dicom[(patient, uid)].append(f)
        headers.setdefault((patient, uid), ds)

    for (patient, uid), members in dicom.items():
        ds = headers[(patient, uid)]
        date = str(ds.get("StudyDate", "") or "")
        key = f"dicom:{patient}|{uid}"
        found.studies.append(StudyJob(
            study_id(f"{patient}_{date}" if date else patient, key), key, "dicom", tuple(str(m) for m in members),
            patient_id=patient, study_uid=uid, description=str(ds.get("StudyDescription", "") or ""), date=date,
        ))
    found.studies.sort(key=lambda s: s.id)
    return found
