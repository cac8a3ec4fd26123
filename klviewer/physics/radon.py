"""Parallel-beam CT: forward projection, its exact adjoint, and filtered back-projection.

Geometry (matches ``skimage.transform.radon(circle=False)`` at unit spacing):

- the rotation axis sits at pixel index ``(H // 2, W // 2)``; detector ``D // 2`` sees the ray
  through it;
- for view angle theta, detector offset t (mm) and position s (mm) along the ray, the ray point
  is ``col = W//2 + (cos*t + sin*s)/ps``, ``row = H//2 + (-sin*t + cos*s)/ps``;
- the image is sampled bilinearly (zero outside) every ``ps`` mm along each ray, and the samples
  are summed times ``ps``. Detectors are point samples of the line integral (no detector width).

The forward map is one ``grid_sample`` per chunk of views with the views in the batch dimension,
because the CPU kernel parallelises over the batch only. The adjoint is the exact transpose of
that same map (the input-gradient kernel of ``grid_sample``), not a separate back-projector,
so gradient-based samplers see a consistent pair. On CUDA that kernel accumulates with atomic
adds, so ``A_adjoint`` there is exact but not bit-for-bit repeatable. On the CPU both run as
sparse-matrix products of the same map where its matrices fit their budget (`radon_matrix`),
because the input-gradient kernel scatters serially there. FBP uses its own pixel-driven back-projector
with linear interpolation on the detector, as analytic FBP expects.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from klviewer.physics.radon_matrix import projection_matrices

FilterName = Literal["ramp", "shepp-logan", "hann"]
FILTERS: tuple[str, ...] = ("ramp", "shepp-logan", "hann")

_BILINEAR = 0
_ZEROS = 0
# Largest temporary buffer per chunk of views on CPU, by stage. Measured on a 2-core EPYC
# (2 MiB L2 total, 32 MiB L3): ray samples stream best from L3-sized chunks, while the adjoint's
# scatter targets must stay L2-sized; larger chunks ran up to 2x slower.
_CPU_CHUNK_BYTES = {"forward": 16 * 2**20, "adjoint": 2 * 2**20, "fbp": 8 * 2**20}
_GPU_CHUNK_BYTES = 256 * 2**20
# Views whose directions (mod pi) differ by less than this share one direction in FBP weighting;
# well above float32 rounding of angles up to 2 pi, far below any real angular step.
_SAME_DIRECTION_RAD = 1e-5
# An angular gap this many times the median gap is a missing wedge, not a sampling step; golden-
# angle gaps differ by at most phi^2 = 2.6x, so they stay below it.
_WEDGE_GAP_RATIO = 4.0


def sparse_view_angles(n_views: int, arc_deg: float = 180.0) -> torch.Tensor:
    """``n_views`` equally spaced angles on ``[0, arc)`` in radians (float64; endpoint excluded)."""
    if n_views < 1:
        raise ValueError(f"n_views must be at least 1, got {n_views}")
    if not (math.isfinite(arc_deg) and arc_deg > 0):
        raise ValueError(f"arc_deg must be positive, got {arc_deg}")
    return torch.arange(n_views, dtype=torch.float64) * (math.radians(arc_deg) / n_views)


def default_n_detectors(image_size: tuple[int, int]) -> int:
    """Detectors covering the image diagonal, as skimage's ``radon(circle=False)`` uses."""
    return int(math.ceil(math.sqrt(2) * max(image_size)))


def arc_rad(angles_rad: torch.Tensor) -> float:
    """Angular range covered, counting each view as one step wide (so 24 views on [0, pi) give pi)."""
    a = torch.sort(angles_rad.to(torch.float64)).values
    if a.numel() < 2:
        return 0.0
    steps = torch.diff(a)
    return float(a[-1] - a[0] + steps.median())


def fbp_view_weights(angles_rad: torch.Tensor) -> torch.Tensor:
    """Quadrature weights (rad) of each view for FBP's integral over directions in [0, pi).

    A direction's weight is half the angular distance to its two neighbouring directions
    (mod pi, cyclic). Views sharing a direction (e.g. opposite views of a 360 degree scan) split
    its weight, so 180 and 360 degree scans come out the same. A gap wider than 4x the median gap
    is a missing wedge and counts as one median gap, so a limited arc gets a plain Riemann sum
    instead of stretching its edge views across the wedge.
    """
    a = angles_rad.to(torch.float64).remainder(math.pi)
    a = torch.where(math.pi - a < _SAME_DIRECTION_RAD, torch.zeros_like(a), a)
    order = torch.argsort(a)
    new_direction = torch.diff(a[order]) > _SAME_DIRECTION_RAD
    group = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(new_direction.long(), 0)])
    directions = a[order][torch.cat([torch.ones(1, dtype=torch.bool), new_direction])]
    gaps = torch.diff(torch.cat([directions, directions[:1] + math.pi]))  # gap after each direction
    typical = gaps.median()
    gaps = torch.where(gaps > _WEDGE_GAP_RATIO * typical, typical, gaps)
    per_direction = 0.5 * (gaps + torch.roll(gaps, 1))
    per_view_sorted = (per_direction / torch.bincount(group).to(torch.float64))[group]
    weights = torch.empty_like(per_view_sorted)
    weights[order] = per_view_sorted
    return weights


def _ramp_response(n_padded: int, filter: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Frequency response (rfft bins) of the band-limited ramp in cycles per detector sample.

    Built from the spatial-domain ramp of Kak & Slaney (eq. 3.61) instead of sampling |nu|, so the
    zero-frequency term is right and a uniform object does not gain a DC offset.
    """
    n = torch.arange(n_padded, dtype=torch.float64, device=device)
    n = torch.minimum(n, n_padded - n)  # circular distance from sample 0
    kernel = torch.where(n % 2 == 1, -1.0 / (math.pi * n.clamp(min=1)) ** 2, torch.zeros_like(n))
    kernel[0] = 0.25
    response = torch.fft.rfft(kernel).real
    nu = torch.fft.rfftfreq(n_padded, dtype=torch.float64, device=device)
    if filter == "shepp-logan":
        response = response * torch.sinc(nu)
    elif filter == "hann":
        response = response * 0.5 * (1.0 + torch.cos(2 * math.pi * nu))
    elif filter != "ramp":
        raise ValueError(f"unknown FBP filter {filter!r}; choose one of {FILTERS}")
    return response.to(dtype)


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, op: "ParallelBeamCT") -> torch.Tensor:  # type: ignore[override]
        ctx.op = op
        return op._project(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _BackProject.apply(grad, ctx.op), None


class _BackProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, op: "ParallelBeamCT") -> torch.Tensor:  # type: ignore[override]
        ctx.op = op
        return op._transpose(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _Project.apply(grad, ctx.op), None


class ParallelBeamCT:
    """2-D parallel-beam CT operator on ``(B, C, H, W)`` images and ``(B, C, n_angles, n_detectors)`` sinograms.

    Images are attenuation in 1/mm; sinograms are dimensionless line integrals (mu times mm).
    ``A`` and ``A_adjoint`` are an exact adjoint pair and differentiable (each is the other's
    backward); ``A_dagger`` is FBP with the ramp filter. float32 and float64 inputs are
    supported. Sampling grids follow the input's device and dtype and are cached per
    (device, dtype) while they fit in ``cache_mb``, else rebuilt per chunk of views; the forward
    grid for ``device`` in float32 is built up front. Views are processed in chunks whose
    temporary buffers fit the CPU caches (or 256 MiB on a GPU).
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        angles_rad: torch.Tensor | np.ndarray,
        n_detectors: int | None = None,
        detector_spacing_mm: float | None = None,
        pixel_spacing_mm: float = 1.0,
        device: torch.device | str = "cpu",
        cache_mb: float = 512.0,
    ) -> None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
        if h < 2 or w < 2:
            raise ValueError(f"image_size must be at least 2 x 2, got {(h, w)}")
        angles = torch.as_tensor(angles_rad).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if angles.numel() == 0 or not bool(torch.isfinite(angles).all()):
            raise ValueError("angles_rad must be a non-empty 1-D array of finite angles")
        if not (math.isfinite(pixel_spacing_mm) and pixel_spacing_mm > 0):
            raise ValueError(f"pixel_spacing_mm must be positive, got {pixel_spacing_mm}")
        self.image_size: tuple[int, int] = (h, w)
        self.angles_rad = angles
        self.pixel_spacing_mm = float(pixel_spacing_mm)
        self.n_detectors = default_n_detectors((h, w)) if n_detectors is None else int(n_detectors)
        self.detector_spacing_mm = self.pixel_spacing_mm if detector_spacing_mm is None else float(detector_spacing_mm)
        if self.n_detectors < 2:
            raise ValueError(f"n_detectors must be at least 2, got {self.n_detectors}")
        if not (math.isfinite(self.detector_spacing_mm) and self.detector_spacing_mm > 0):
            raise ValueError(f"detector_spacing_mm must be positive, got {self.detector_spacing_mm}")
        # Ray samples span the image diagonal whatever the detector, one per pixel spacing.
        self.n_ray_samples = default_n_detectors((h, w))
        self.device = torch.device(device)
        self._cache_bytes = int(cache_mb * 2**20)
        self._grids: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self._filters: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self._view_weights = fbp_view_weights(angles)
        self._cached_grid("forward", self.device, torch.float32)

    # ---- geometry -------------------------------------------------------------------------

    @property
    def n_angles(self) -> int:
        return int(self.angles_rad.numel())

    @property
    def sinogram_shape(self) -> tuple[int, int]:
        return (self.n_angles, self.n_detectors)

    @property
    def arc_deg(self) -> float:
        return math.degrees(arc_rad(self.angles_rad))

    def describe(self) -> dict:
        """Geometry settings as plain JSON types, for provenance."""
        return {
            "geometry": "parallel-beam",
            "image_size": list(self.image_size),
            "pixel_spacing_mm": self.pixel_spacing_mm,
            "n_views": self.n_angles,
            "arc_deg": round(self.arc_deg, 9),
            "first_angle_deg": math.degrees(float(self.angles_rad[0])),
            "n_detectors": self.n_detectors,
            "detector_spacing_mm": self.detector_spacing_mm,
        }

    @functools.cached_property
    def geometry_key(self) -> tuple:
        """The grid, detector and exact angles as one hashable value, computed once (the geometry is fixed
        at construction): equal keys mean the same linear map."""
        described = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in self.describe().items()))
        return described, self.angles_rad.numpy().tobytes()

    def same_geometry(self, other: object) -> bool:
        """Whether `other` is a parallel-beam operator with this one's grid, angles and detector, so either
        one serves both (slices of one series share a geometry, and their chains share a batch)."""
        return other is self or (isinstance(other, ParallelBeamCT) and other.geometry_key == self.geometry_key)

    def _forward_grid(self, views: slice, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Normalised (x, y) sampling positions, shape (views, n_ray_samples, n_detectors, 2)."""
        h, w = self.image_size
        theta = self.angles_rad[views]
        cos, sin = torch.cos(theta), torch.sin(theta)
        # Pixel units: col = W//2 + cos*t + sin*s, row = H//2 - sin*t + cos*s, then normalised for
        # align_corners=True. Per view that is affine in (t, s): one term per detector, one per
        # ray sample, added by broadcasting in one contiguous pass.
        scale = torch.tensor([2.0 / (w - 1), 2.0 / (h - 1)], dtype=torch.float64)
        offset = scale * torch.tensor([w // 2, h // 2], dtype=torch.float64) - 1.0
        t = (torch.arange(self.n_detectors, dtype=torch.float64) - self.n_detectors // 2) * (self.detector_spacing_mm / self.pixel_spacing_mm)
        s = torch.arange(self.n_ray_samples, dtype=torch.float64) - self.n_ray_samples // 2
        along_t = torch.stack([cos, -sin], -1) * scale  # (views, 2)
        along_s = torch.stack([sin, cos], -1) * scale
        t_part = t[None, :, None] * along_t[:, None, :]  # (views, detectors, 2)
        s_part = s[None, :, None] * along_s[:, None, :] + offset  # (views, samples, 2)
        return self._outer_sum(t_part, s_part, device, dtype)

    def _backprojection_grid(self, views: slice, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """For each view and pixel, the normalised detector position it projects to: (views, H, W, 2).

        The y coordinate is 0: the back-projector samples each view's sinogram row as a
        1-pixel-high image.
        """
        h, w = self.image_size
        theta = self.angles_rad[views]
        per_pixel = self.pixel_spacing_mm / self.detector_spacing_mm
        scale = 2.0 / (self.n_detectors - 1)
        col = (torch.arange(w, dtype=torch.float64) - w // 2) * per_pixel
        row = (torch.arange(h, dtype=torch.float64) - h // 2) * per_pixel
        zeros = torch.zeros(theta.numel(), 1, 1, dtype=torch.float64)
        col_part = torch.cat([(scale * torch.cos(theta))[:, None, None] * col[None, :, None], zeros.expand(-1, w, 1)], -1)
        row_part = -(scale * torch.sin(theta))[:, None, None] * row[None, :, None] + (scale * (self.n_detectors // 2) - 1.0)
        return self._outer_sum(col_part, torch.cat([row_part, zeros.expand(-1, h, 1)], -1), device, dtype)

    @staticmethod
    def _outer_sum(inner: torch.Tensor, outer: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``grid[v, i, j] = outer[v, i] + inner[v, j]``: the terms in float64, the sum in the compute dtype."""
        inner, outer = inner.to(device=device, dtype=dtype), outer.to(device=device, dtype=dtype)
        return torch.add(outer[:, :, None, :], inner[:, None, :, :])

    def _cached_grid(self, kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The whole grid of ``kind`` for all views, built once, or None when it would exceed the cache budget."""
        key = (kind, device, dtype)
        if key not in self._grids:
            values_per_view = self.n_ray_samples * self.n_detectors if kind == "forward" else self.image_size[0] * self.image_size[1]
            nbytes = 2 * values_per_view * self.n_angles * torch.finfo(dtype).bits // 8
            if nbytes + sum(g.nbytes for g in self._grids.values()) > self._cache_bytes:
                return None
            build = self._forward_grid if kind == "forward" else self._backprojection_grid
            self._grids[key] = build(slice(None), device, dtype)
        return self._grids[key]

    def _grid(self, kind: str, views: slice, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        cached = self._cached_grid(kind, device, dtype)
        if cached is not None:
            return cached[views]
        build = self._forward_grid if kind == "forward" else self._backprojection_grid
        return build(views, device, dtype)

    def _view_chunks(self, stage: str, values_per_view: int, dtype: torch.dtype, device: torch.device) -> list[slice]:
        budget = _GPU_CHUNK_BYTES if device.type == "cuda" else _CPU_CHUNK_BYTES[stage]
        # On CPU the kernels parallelise over views only, so give every thread at least one.
        least = 1 if device.type == "cuda" else torch.get_num_threads()
        step = max(least, budget // max(1, values_per_view * (torch.finfo(dtype).bits // 8)))
        return [slice(i, min(i + step, self.n_angles)) for i in range(0, self.n_angles, step)]

    def _check(self, t: torch.Tensor, trailing: tuple[int, int], what: str) -> None:
        if t.ndim != 4 or tuple(t.shape[-2:]) != trailing:
            raise ValueError(f"{what} must have shape (B, C, {trailing[0]}, {trailing[1]}), got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{what} must be float32 or float64, got {t.dtype}")

    # ---- operators ------------------------------------------------------------------------

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """Line integrals of the attenuation image ``x`` (1/mm): ``(B, C, n_angles, n_detectors)``."""
        self._check(x, self.image_size, "image")
        return _Project.apply(x, self)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Exact transpose of ``A``: ``<A x, y> == <x, A_adjoint y>``."""
        self._check(y, self.sinogram_shape, "sinogram")
        return _BackProject.apply(y, self)

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        """Approximate inverse: ramp-filtered FBP."""
        return self.fbp(y)

    def fbp(self, y: torch.Tensor, filter: FilterName = "ramp") -> torch.Tensor:
        """Filtered back-projection of line integrals to attenuation (1/mm), shape (B, C, H, W).

        The filter is applied along the detector with zero-padding to at least twice its length;
        each view is weighted by ``fbp_view_weights`` (pi / n_views for an evenly sampled 180 or
        360 degree scan), and the filter is scaled by 1 / detector spacing so the result is per mm.
        """
        self._check(y, self.sinogram_shape, "sinogram")
        b, c, n_views, n_det = y.shape
        padded = max(64, 2 ** math.ceil(math.log2(2 * n_det)))  # zero-padding stops circular wrap
        key = (filter, y.device, y.dtype)
        if key not in self._filters:
            self._filters[key] = _ramp_response(padded, filter, y.dtype, y.device)
        spectrum = torch.fft.rfft(y, n=padded, dim=-1) * self._filters[key]
        filtered = torch.fft.irfft(spectrum, n=padded, dim=-1)[..., :n_det]
        weights = self._view_weights.to(device=y.device, dtype=y.dtype) / self.detector_spacing_mm
        filtered = filtered * weights[:, None]
        per_view = filtered.reshape(b * c, n_views, 1, n_det).transpose(0, 1)  # views in the batch dim
        h, w = self.image_size
        out = y.new_zeros(b * c, h, w)
        for views in self._view_chunks("fbp", b * c * h * w, y.dtype, y.device):
            grid = self._grid("backprojection", views, y.device, y.dtype)
            out = out + F.grid_sample(per_view[views], grid, mode="bilinear", padding_mode="zeros", align_corners=True).sum(0)
        return out.reshape(b, c, h, w)

    # ---- the linear map and its transpose (called through the autograd functions) -------

    def _matrices(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return projection_matrices(self, t.dtype) if t.device.type == "cpu" else None

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        matrices = self._matrices(x)
        if matrices is not None:
            sino = (matrices[0] @ x.reshape(b * c, h * w).T).T
            return sino.reshape(b, c, self.n_angles, self.n_detectors)
        image = x.reshape(1, b * c, h, w)
        chunks = []
        for views in self._view_chunks("forward", b * c * self.n_ray_samples * self.n_detectors, x.dtype, x.device):
            grid = self._grid("forward", views, x.device, x.dtype)
            n = grid.shape[0]
            samples = F.grid_sample(image.expand(n, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            chunks.append(samples.sum(2))  # (views, B*C, detectors)
        sino = torch.cat(chunks, 0) * self.pixel_spacing_mm
        return sino.permute(1, 0, 2).reshape(b, c, self.n_angles, self.n_detectors)

    def _transpose(self, y: torch.Tensor) -> torch.Tensor:
        b, c, n_views, n_det = y.shape
        h, w = self.image_size
        matrices = self._matrices(y)
        if matrices is not None:
            return (matrices[1] @ y.reshape(b * c, n_views * n_det).T).T.reshape(b, c, h, w)
        per_view = (y * self.pixel_spacing_mm).reshape(b * c, n_views, n_det).transpose(0, 1)
        out = y.new_zeros(b * c, h, w)
        for views in self._view_chunks("adjoint", b * c * h * w, y.dtype, y.device):
            grid = self._grid("forward", views, y.device, y.dtype)
            n = grid.shape[0]
            # Every sample on a ray receives the ray's value; the kernel scatters it back to pixels.
            spread = per_view[views][:, :, None, :].expand(n, b * c, self.n_ray_samples, n_det)
            shape_only = y.new_zeros(1, 1, 1, 1).expand(n, b * c, h, w)
            grad_image, _ = torch.ops.aten.grid_sampler_2d_backward(
                spread, shape_only, grid, _BILINEAR, _ZEROS, True, [True, False]
            )
            out = out + grad_image.sum(0)
        return out.reshape(b, c, h, w)
