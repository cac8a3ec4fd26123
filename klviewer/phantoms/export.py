"""Writing phantom sets to disk, as .npz files or as a DICOM CT series with ground truth."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from klviewer import __version__
from klviewer.io.dicom_write import write_ct_series
from klviewer.io.safe_write import OutputExistsError, atomic_write, atomic_write_text
from klviewer.errors import KlviewerInputError
from klviewer.phantoms import Phantom, make_phantom_set, save_phantom_npz

MANIFEST = "phantoms.json"
GROUND_TRUTH = "ground_truth.npz"


def write_phantoms(
    out: Path,
    phantoms: Sequence[Phantom],
    *,
    dicom: bool,
    description: str,
    slice_thickness_mm: float = 5.0,
    patient_id: str = "KLV-PHANTOM",
) -> Path:
    """Write phantoms plus a manifest. Refuses up front if any target file already exists."""
    out = Path(out)
    names = [f"phantom_{i:04d}.npz" for i in range(len(phantoms))]
    targets = [out / MANIFEST] + ([out / GROUND_TRUTH, out / "dicom"] if dicom else [out / n for n in names])
    for target in targets:
        if target.exists():
            raise OutputExistsError(target)
    out.mkdir(parents=True, exist_ok=True)

    entries = []
    if dicom:
        files = write_ct_series(
            np.stack([p.hu for p in phantoms]),
            out / "dicom",
            pixel_spacing_mm=phantoms[0].pixel_spacing_mm,
            slice_thickness_mm=slice_thickness_mm,
            patient_id=patient_id,
            patient_name=f"PHANTOM^{patient_id}",
            study_description="klviewer procedural phantoms",
            series_description=description,
            image_comments=[f"phantom {p.kind} seed {p.seed}" for p in phantoms],
        )
        truth = {
            "ood_mask": np.stack([p.ood_mask for p in phantoms]),
            "body_mask": np.stack([p.body_mask for p in phantoms]),
            "kind": np.array([p.kind for p in phantoms]),
            "seed": np.array([p.seed for p in phantoms]),
        }
        atomic_write(out / GROUND_TRUTH, lambda f: np.savez_compressed(f, **truth))
        entries = [{"file": str(f.relative_to(out)), "slice": i, "kind": p.kind, "seed": p.seed, "meta": p.meta} for i, (f, p) in enumerate(zip(files, phantoms))]
    else:
        for name, p in zip(names, phantoms):
            save_phantom_npz(p, out / name)
            entries.append({"file": name, "kind": p.kind, "seed": p.seed, "meta": p.meta})

    manifest = {
        "klviewer_version": __version__,
        "description": description,
        "format": "dicom" if dicom else "npz",
        "size": list(phantoms[0].hu.shape),
        "pixel_spacing_mm": phantoms[0].pixel_spacing_mm,
        "phantoms": entries,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return out


def write_phantom_set(out: Path, *, kind: str, n: int, size: int, seed: int, dicom: bool) -> Path:
    if not 1 <= n <= 10000:
        raise KlviewerInputError(None, f"number of phantoms must be 1..10000, got {n}")
    if not 32 <= size <= 1024:
        raise KlviewerInputError(None, f"phantom size must be 32..1024 pixels, got {size}")
    phantoms = make_phantom_set(kind, n, size=size, seed=seed)
    return write_phantoms(out, phantoms, dicom=dicom, description=f"{n} {kind} phantoms, {size}px, seed {seed}")
