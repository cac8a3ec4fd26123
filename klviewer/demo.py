"""The bundled demo study: a small DICOM series of healthy and lesion phantom slices.

It is generated (deterministically) on first use into the user cache directory rather than
shipped, and re-used afterwards. KLVIEWER_CACHE_DIR overrides the cache location.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import platformdirs

from klviewer.phantoms import make_phantom
from klviewer.phantoms.export import write_phantoms

DEMO_VERSION = 1
DEMO_SEED = 2026
DEMO_SIZE = 256
DEMO_HEALTHY = 4
DEMO_LESION = 4
COMPLETE_MARKER = "COMPLETE"


def cache_dir() -> Path:
    override = os.environ.get("KLVIEWER_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir("klviewer"))


def demo_dir() -> Path:
    return cache_dir() / f"demo-v{DEMO_VERSION}"


def _build(target: Path) -> None:
    phantoms = [make_phantom("healthy", DEMO_SIZE, DEMO_SEED + i) for i in range(DEMO_HEALTHY)]
    phantoms += [make_phantom("lesion", DEMO_SIZE, DEMO_SEED + 100 + i) for i in range(DEMO_LESION)]
    write_phantoms(
        target,
        phantoms,
        dicom=True,
        description=f"Phantom abdomen: {DEMO_HEALTHY} healthy, {DEMO_LESION} with liver lesions",
        patient_id="KLV-DEMO-001",
    )
    (target / COMPLETE_MARKER).write_text("ok\n")


def ensure_demo_study() -> Path:
    """Return the demo study's DICOM folder, creating it on first use.

    It is built in a temporary folder and renamed into place, so an interrupted build never
    leaves a half-written demo behind.
    """
    final = demo_dir()
    if (final / COMPLETE_MARKER).is_file():
        return final / "dicom"
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=final.parent))
    try:
        _build(staging)
        if not (final / COMPLETE_MARKER).is_file():  # else another process finished first
            if final.exists():
                shutil.rmtree(final)  # an interrupted earlier attempt: it has no marker
            os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return final / "dicom"
