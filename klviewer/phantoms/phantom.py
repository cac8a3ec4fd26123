"""The Phantom record and its .npz file format.

The file holds plain arrays plus one JSON string, so it loads with ``allow_pickle=False``
and can be read by anything that reads .npz (no klviewer classes inside).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from klviewer.errors import KlviewerInputError
from klviewer.io.arrays import load_npz_arrays
from klviewer.io.json_input import parse_json
from klviewer.io.safe_write import atomic_write

FOV_MM = 400.0
HU_MIN = -1024.0
HU_MAX = 3071.0
KINDS = ("healthy", "lesion", "metal", "shift")

# The format tag lets a generic .npz reader tell a phantom from any other HU array file.
FILE_FORMAT = "klviewer.phantom"
FILE_VERSION = 1
REQUIRED_KEYS = ("hu", "body_mask", "ood_mask", "meta")


@dataclass
class Phantom:
    """One synthetic axial CT slice with its ground truth.

    ``labels`` (optional, uint8) is the tissue label map the generator painted; the code of each
    label is in ``meta["label_codes"]``. Lesion pixels keep the label of the organ they sit in,
    so ``labels`` describes the anatomy and ``ood_mask`` the shift.
    """

    hu: np.ndarray
    body_mask: np.ndarray
    ood_mask: np.ndarray
    kind: str
    seed: int
    pixel_spacing_mm: float
    meta: dict = field(default_factory=dict)
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        problems = _array_problems(self.hu, self.body_mask, self.ood_mask, self.labels)
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        if problems:
            raise KlviewerInputError(None, "invalid phantom: " + "; ".join(problems))

    @property
    def size(self) -> int:
        return int(self.hu.shape[0])


def _array_problems(hu: np.ndarray, body: np.ndarray, ood: np.ndarray, labels: np.ndarray | None) -> list[str]:
    problems = []
    if hu.ndim != 2 or hu.dtype != np.float32:
        problems.append(f"hu must be a 2-D float32 array, got {hu.ndim}-D {hu.dtype}")
    for name, mask in (("body_mask", body), ("ood_mask", ood)):
        if mask.dtype != np.bool_ or mask.shape != hu.shape:
            problems.append(f"{name} must be a bool array of shape {hu.shape}, got {mask.dtype} {mask.shape}")
    if labels is not None and (labels.dtype != np.uint8 or labels.shape != hu.shape):
        problems.append(f"labels must be a uint8 array of shape {hu.shape}, got {labels.dtype} {labels.shape}")
    return problems


def save_phantom_npz(phantom: Phantom, path: Path, overwrite: bool = False) -> None:
    """Write ``phantom`` to ``path`` (.npz, compressed), atomically and never over an existing
    file unless ``overwrite``. The scalar fields travel in the meta JSON."""
    header = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "kind": phantom.kind,
        "seed": int(phantom.seed),
        "pixel_spacing_mm": float(phantom.pixel_spacing_mm),
        "meta": phantom.meta,
    }
    arrays = {
        "hu": phantom.hu,
        "body_mask": phantom.body_mask,
        "ood_mask": phantom.ood_mask,
        "meta": np.array(json.dumps(header)),
    }
    if phantom.labels is not None:
        arrays["labels"] = phantom.labels
    # Writing into an open handle also stops np.savez from appending ".npz" to the name.
    atomic_write(Path(path), lambda handle: np.savez_compressed(handle, **arrays), overwrite=overwrite)


def load_phantom_npz(path: Path) -> Phantom:
    """Read a file written by :func:`save_phantom_npz`; every refusal names the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise KlviewerInputError(path, "phantom file not found")
    arrays = load_npz_arrays(path, None)
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise KlviewerInputError(path, f"not a klviewer phantom: missing key(s) {', '.join(missing)} "
                                       f"(has {', '.join(arrays) or 'nothing'})")
    header = _parse_header(path, arrays["meta"])
    problems = _array_problems(arrays["hu"], arrays["body_mask"], arrays["ood_mask"], arrays.get("labels"))
    if header["kind"] not in KINDS:
        problems.append(f"kind must be one of {KINDS}, got {header['kind']!r}")
    if problems:
        raise KlviewerInputError(path, "; ".join(problems))
    return Phantom(
        hu=arrays["hu"],
        body_mask=arrays["body_mask"],
        ood_mask=arrays["ood_mask"],
        kind=header["kind"],
        seed=int(header["seed"]),
        pixel_spacing_mm=float(header["pixel_spacing_mm"]),
        meta=header["meta"],
        labels=arrays.get("labels"),
    )


def _parse_header(path: Path, raw: np.ndarray) -> dict:
    if raw.ndim != 0 or raw.dtype.kind != "U":
        raise KlviewerInputError(path, f"key 'meta' must hold one JSON string, got {raw.dtype} of shape {raw.shape}")
    header = parse_json(str(raw), path, "key 'meta'")
    if header.get("format") != FILE_FORMAT:
        raise KlviewerInputError(path, f"key 'meta' is not a {FILE_FORMAT} header")
    if header.get("version") != FILE_VERSION:
        raise KlviewerInputError(path, f"phantom file version {header.get('version')!r} is not supported "
                                       f"(this klviewer reads version {FILE_VERSION})")
    missing = [key for key in ("kind", "seed", "pixel_spacing_mm", "meta") if key not in header]
    if missing:
        raise KlviewerInputError(path, f"meta header lacks {', '.join(missing)}")
    return header
