"""Training images for a prior: a seeded pool of healthy phantoms, or CT slices from a folder.

Images are held in memory as one (N, 1, size, size) float32 tensor in prior units, and training
draws random square patches from it. No flips or rotations: CT anatomy is not left/right
symmetric (the liver is on the patient's right), so a flipped slice is itself out of distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from klviewer.errors import KlviewerInputError
from klviewer.priors.unet import position_grid

PHANTOM_SOURCE = "phantoms"


@dataclass
class ImagePool:
    """Training images in prior units, with a JSON-able description of where they came from."""

    images: torch.Tensor
    pixel_spacing_mm: float | None
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def sample_patches(self, batch: int, patch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` random patch x patch crops and their (B, 2, patch, patch) position grids."""
        n, _, h, w = self.images.shape
        index = torch.randint(n, (batch,), generator=generator)
        tops = torch.randint(h - patch + 1, (batch,), generator=generator)
        lefts = torch.randint(w - patch + 1, (batch,), generator=generator)
        crops, grids = [], []
        for i, t, l in zip(index.tolist(), tops.tolist(), lefts.tolist()):
            crops.append(self.images[i, :, t:t + patch, l:l + patch])
            grids.append(position_grid((h, w), t, l, patch, patch))
        return torch.stack(crops), torch.stack(grids)


def hu_to_prior_units(hu: np.ndarray, hu_offset: float, hu_scale: float) -> torch.Tensor:
    return torch.from_numpy((np.asarray(hu, dtype=np.float32) - hu_offset) / hu_scale)


def phantom_pool(n: int, size: int, seed: int, hu_offset: float, hu_scale: float, workers: int = 1) -> ImagePool:
    """``n`` healthy phantoms from ``make_phantom_set("healthy", n, size, seed)``, built by ``workers`` processes."""
    from klviewer.phantoms import make_phantom_set

    phantoms = make_phantom_set("healthy", n, size, seed, workers=workers)
    images = torch.stack([hu_to_prior_units(p.hu, hu_offset, hu_scale) for p in phantoms]).unsqueeze(1)
    description = {"source": PHANTOM_SOURCE, "kind": "healthy", "n": n, "size": size, "seed": seed,
                   "phantom_seeds": [int(p.seed) for p in phantoms]}
    return ImagePool(images, float(phantoms[0].pixel_spacing_mm), description)


def resize_square(hu: torch.Tensor, size: int) -> torch.Tensor:
    """(S, H, W) -> (S, size, size): centre-pad to square with air, then resample (antialiased).

    Training slices and analysed slices both go through here, so the prior sees one geometry.
    """
    _, h, w = hu.shape
    side = max(h, w)
    if h != w:
        fill = float(hu.min())
        pad_h, pad_w = side - h, side - w
        hu = F.pad(hu, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
    if side != size:
        hu = F.interpolate(hu[:, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[:, 0]
    return hu


def folder_pool(folder: Path, size: int, hu_offset: float, hu_scale: float) -> ImagePool:
    """Every CT slice found under ``folder`` (DICOM, .npy/.npz), resampled to size x size."""
    from klviewer.io.loader import open_images

    catalog = open_images([folder])
    stacks, spacings, series_count = [], [], 0
    for series in catalog.all_series():
        # Sinogram inputs have no images to learn from; non-CT series are not in HU.
        if series.sinogram is not None or series.analysis_refusal() is not None:
            continue
        volume = torch.from_numpy(np.asarray(series.volume(), dtype=np.float32))
        _, h, w = volume.shape
        stacks.append((resize_square(volume, size) - hu_offset) / hu_scale)
        if series.pixel_spacing_mm is not None:
            spacings.append(float(max(series.pixel_spacing_mm)) * max(h, w) / size)
        series_count += 1
    if not stacks:
        raise KlviewerInputError(folder, "no image series to train on (only sinograms or nothing loadable)")
    images = torch.cat(stacks).unsqueeze(1).contiguous()
    description = {"source": str(folder), "n_series": series_count, "n": int(images.shape[0]), "size": size,
                   "skipped_files": len(catalog.skipped)}
    spacing = float(np.median(spacings)) if spacings else None
    return ImagePool(images, spacing, description)


def load_pool(data: str, n_phantoms: int, size: int, seed: int, hu_offset: float, hu_scale: float,
              workers: int = 1) -> ImagePool:
    if data == PHANTOM_SOURCE:
        return phantom_pool(n_phantoms, size, seed, hu_offset, hu_scale, workers)
    folder = Path(data)
    if not folder.is_dir():
        raise KlviewerInputError(folder, f"training data must be '{PHANTOM_SOURCE}' or an existing folder")
    return folder_pool(folder, size, hu_offset, hu_scale)
