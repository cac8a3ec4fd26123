"""Procedural CT phantoms: healthy abdominal slices (the prior's training distribution) and
out-of-distribution variants with ground-truth masks.

One seed fixes one patient. ``make_phantom("lesion", seed=s)`` and ``make_phantom("metal", seed=s)``
are the healthy phantom with seed ``s`` (same size) plus the abnormality, so a pair differs only
where the abnormality is. See docs/phantoms.md for the HU values and the artifact model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

import numpy as np

from klviewer.errors import KlviewerInputError
from klviewer.phantoms.abdomen import (
    ENHANCED_HU,
    UNENHANCED_HU,
    Canvas,
    Landmarks,
    Tissue,
    build_abdomen,
    finish,
    sample_hu_table,
)
from klviewer.phantoms.ood import (
    LesionParams,
    MetalParams,
    ShiftParams,
    add_lesions,
    add_metal,
    build_thorax,
    metal_ood_mask,
)
from klviewer.phantoms.phantom import FOV_MM, KINDS, Phantom, load_phantom_npz, save_phantom_npz

__all__ = [
    "FOV_MM",
    "KINDS",
    "Phantom",
    "Tissue",
    "load_phantom_npz",
    "make_phantom",
    "make_phantom_set",
    "save_phantom_npz",
]

GENERATOR_VERSION = 1
MIN_SIZE, MAX_SIZE = 32, 1024
_PARAMS = {"lesion": LesionParams, "metal": MetalParams, "shift": ShiftParams}


def _parse_params(kind: str, params: dict[str, Any]) -> LesionParams | MetalParams | ShiftParams | None:
    cls = _PARAMS.get(kind)
    allowed = [f.name for f in fields(cls)] if cls else []
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise KlviewerInputError(None, f"unknown parameter(s) {', '.join(unknown)} for kind {kind!r}; "
                                       f"allowed: {', '.join(allowed) or 'none'}")
    return cls(**params) if cls else None


def _check_request(kind: str, size: int, seed: int) -> None:
    if kind not in KINDS:
        raise KlviewerInputError(None, f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise KlviewerInputError(None, f"size must be an integer from {MIN_SIZE} to {MAX_SIZE}, got {size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise KlviewerInputError(None, f"seed must be a non-negative integer, got {seed!r}")


def make_phantom(kind: str = "healthy", size: int = 256, seed: int = 0, **params: Any) -> Phantom:
    """One phantom of ``kind`` ("healthy", "lesion", "metal", "shift") on a ``size`` x ``size`` grid.

    The field of view is fixed (FOV_MM), so the pixel spacing is FOV_MM / size and the organ
    layout is the same at every size. ``params`` are those of LesionParams, MetalParams or ShiftParams.
    """
    _check_request(kind, size, seed)
    options = _parse_params(kind, params)
    # Independent streams: the OOD draws never disturb the anatomy, so variants pair with healthy.
    anatomy_seed, boundary_seed, texture_seed, ood_seed = np.random.SeedSequence(seed).spawn(4)
    enhanced = isinstance(options, ShiftParams) and options.anatomy == "enhanced"
    anatomy_rng = np.random.default_rng(anatomy_seed)
    table = sample_hu_table(anatomy_rng, ENHANCED_HU if enhanced else UNENHANCED_HU)

    def canvas_factory(rotation_deg: float, offset_mm: tuple[float, float]) -> Canvas:
        return Canvas.create(int(size), rotation_deg, offset_mm, table, np.random.default_rng(boundary_seed))

    if isinstance(options, ShiftParams) and options.anatomy == "thorax":
        canvas, anatomy = build_thorax(canvas_factory, anatomy_rng)
        marks = None
    else:
        canvas, marks, anatomy = build_abdomen(canvas_factory, anatomy_rng)
    hu, ood_mask, details = _render(canvas, marks, options, texture_seed, np.random.default_rng(ood_seed))
    # A JSON round trip makes meta plain lists/dicts/floats, so a saved and re-loaded phantom compares equal.
    meta = json.loads(json.dumps({
        "generator": "klviewer.phantoms",
        "generator_version": GENERATOR_VERSION,
        "size": int(size),
        "fov_mm": FOV_MM,
        "params": asdict(options) if options else {},
        "contrast_phase": "portal-venous" if enhanced else "unenhanced",
        "hu_table": {tissue.name.lower(): value for tissue, value in table.items()},
        "label_codes": {tissue.name.lower(): int(tissue) for tissue in Tissue},
        "anatomy": anatomy,
        **details,
    }))
    return Phantom(hu=hu, body_mask=canvas.body_sdf < 0, ood_mask=ood_mask, kind=kind, seed=int(seed),
                   pixel_spacing_mm=FOV_MM / size, meta=meta, labels=canvas.labels)


def _render(canvas: Canvas, marks: Landmarks | None, options: LesionParams | MetalParams | ShiftParams | None,
            texture_seed: np.random.SeedSequence, ood_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """Add the variant's abnormality, then texture and noise. Returns HU, the OOD mask and a description."""
    body = canvas.body_sdf < 0

    def texture() -> np.random.Generator:
        return np.random.default_rng(texture_seed)

    if isinstance(options, LesionParams):
        mask, lesions = add_lesions(canvas, ood_rng, options)
        return finish(canvas, texture()), mask, {"lesions": lesions}
    if isinstance(options, MetalParams):
        without_metal = canvas.copy()
        artifact, metal, description = add_metal(canvas, ood_rng, marks, options)
        hu = finish(canvas, texture(), artifact)
        # The same texture draw on the canvas without metal is exactly the paired healthy phantom.
        reference = finish(without_metal, texture())
        mask, stats = metal_ood_mask(hu, reference, metal, body, options.artifact_threshold_hu)
        return hu, mask, {"metal": {**description, **stats}}
    hu = finish(canvas, texture())
    if isinstance(options, ShiftParams):
        return hu, body.copy(), {"shift": {"anatomy": options.anatomy}}
    return hu, np.zeros_like(body), {}


def member_seed(seed: int, index: int) -> int:
    """Seed of member ``index`` of a set, hashed from (seed, index) so that sets with nearby seeds do not overlap."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_phantom_set(kind: str, n: int, size: int = 256, seed: int = 0, workers: int = 1) -> list[Phantom]:
    """``n`` phantoms of ``kind`` with default parameters; member i uses ``member_seed(seed, i)``.

    kind "mixed" draws each member's kind (healthy, lesion, metal, shift with equal odds) from
    (seed, i), so a member does not depend on ``n``. ``workers`` > 1 builds members in that many
    processes; each member depends only on its own seed, so the set is the same.
    """
    _check_request("healthy" if kind == "mixed" else kind, size, seed)
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise KlviewerInputError(None, f"n must be a non-negative integer, got {n!r}")
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise KlviewerInputError(None, f"workers must be a positive integer, got {workers!r}")
    kinds = [KINDS[int(np.random.default_rng([seed, i, 1]).integers(len(KINDS)))] if kind == "mixed" else kind
             for i in range(n)]
    seeds = [member_seed(seed, i) for i in range(n)]
    if workers == 1 or n < 2:
        return [make_phantom(k, size=size, seed=s) for k, s in zip(kinds, seeds)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the caller may hold torch or Qt threads, which a forked child would inherit locked.
    with ProcessPoolExecutor(min(workers, n), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(make_phantom, kinds, [size] * n, seeds, chunksize=max(1, n // (4 * workers))))
