"""Healthy abdominal CT phantoms: one axial slice at the level of the liver, spleen and kidneys.

Shapes are signed distance functions in millimetres (negative inside) in a patient frame:
``u`` points to the image right (the patient's left, radiological convention) and ``v`` points
posterior (image down). A whole-patient pose (small rotation, offset) maps the image grid into
that frame. Tissues are painted back to front through a one-pixel ramp on the distance, which
anti-aliases every edge at any matrix size; texture and noise are added once at the end.

The in-distribution contrast phase is **unenhanced**: no iodine anywhere. A contrast-enhanced
(portal-venous) version of the same patient is one of the shifts (see ``ENHANCED_HU``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import IntEnum

import numpy as np
from scipy import ndimage

from klviewer.phantoms.phantom import FOV_MM, HU_MAX, HU_MIN


class Tissue(IntEnum):
    """Label codes of the tissue map each phantom carries."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    LIVER = 3
    SPLEEN = 4
    KIDNEY_CORTEX = 5
    KIDNEY_MEDULLA = 6
    PANCREAS = 7
    BLOOD = 8
    FLUID = 9
    BOWEL_WALL = 10
    BOWEL_CONTENT = 11
    GAS = 12
    CORTICAL_BONE = 13
    CANCELLOUS_BONE = 14
    CSF = 15
    CARTILAGE = 16
    LUNG = 17
    HEART = 18
    METAL = 19
    LIVER_VESSEL = 20  # painted with the BLOOD value; separate so lesions may grow over it


# Unenhanced HU as (typical value, half-range of the patient-to-patient variation). Sources are
# the usual radiology reference values: fat -90..-110, muscle 40-60, liver 55-65 (always above
# spleen without contrast), spleen 45-50, kidney 30-35 (cortex and medulla look alike without
# contrast), blood 40-45, bile/urine 0-20, cortical bone 700-1000, cancellous bone 200-300.
UNENHANCED_HU: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1000.0, 0.0),
    Tissue.FAT: (-100.0, 8.0),
    Tissue.MUSCLE: (50.0, 5.0),
    Tissue.LIVER: (60.0, 5.0),
    Tissue.SPLEEN: (48.0, 3.0),
    Tissue.KIDNEY_CORTEX: (32.0, 3.0),
    Tissue.KIDNEY_MEDULLA: (30.0, 3.0),
    Tissue.PANCREAS: (40.0, 5.0),
    Tissue.BLOOD: (42.0, 3.0),
    Tissue.FLUID: (10.0, 6.0),
    Tissue.BOWEL_WALL: (40.0, 5.0),
    Tissue.BOWEL_CONTENT: (15.0, 10.0),
    Tissue.GAS: (-960.0, 30.0),
    Tissue.CORTICAL_BONE: (850.0, 120.0),
    Tissue.CANCELLOUS_BONE: (250.0, 40.0),
    Tissue.CSF: (20.0, 5.0),
    Tissue.CARTILAGE: (120.0, 30.0),
    Tissue.LUNG: (-850.0, 30.0),
    Tissue.HEART: (42.0, 3.0),
    Tissue.METAL: (0.0, 0.0),  # metal is painted with its physical value, see ood.py
}

# Portal-venous phase (about 70 s after iodine): parenchyma and blood light up, fat and bone do
# not. Same keys in the same order as UNENHANCED_HU, so one seed draws the same anatomy in both.
ENHANCED_HU: dict[Tissue, tuple[float, float]] = {
    **UNENHANCED_HU,
    Tissue.MUSCLE: (60.0, 5.0),
    Tissue.LIVER: (110.0, 10.0),
    Tissue.SPLEEN: (120.0, 10.0),
    Tissue.KIDNEY_CORTEX: (190.0, 15.0),
    Tissue.KIDNEY_MEDULLA: (150.0, 15.0),
    Tissue.PANCREAS: (100.0, 10.0),
    Tissue.BLOOD: (160.0, 15.0),
    Tissue.BOWEL_WALL: (90.0, 10.0),
    Tissue.HEART: (150.0, 15.0),
}

# Standard deviation (HU) of the correlated texture inside each tissue: parenchyma is smooth,
# stool and trabecular bone are mottled, lung carries unresolved vessels and septa.
TEXTURE_HU: dict[Tissue, float] = {
    Tissue.AIR: 0.0, Tissue.FAT: 6.0, Tissue.MUSCLE: 7.0, Tissue.LIVER: 6.0, Tissue.SPLEEN: 6.0,
    Tissue.KIDNEY_CORTEX: 7.0, Tissue.KIDNEY_MEDULLA: 7.0, Tissue.PANCREAS: 12.0, Tissue.BLOOD: 4.0,
    Tissue.FLUID: 3.0, Tissue.BOWEL_WALL: 8.0, Tissue.BOWEL_CONTENT: 30.0, Tissue.GAS: 15.0,
    Tissue.CORTICAL_BONE: 60.0, Tissue.CANCELLOUS_BONE: 35.0, Tissue.CSF: 4.0, Tissue.CARTILAGE: 20.0,
    Tissue.LUNG: 25.0, Tissue.HEART: 5.0, Tissue.METAL: 0.0, Tissue.LIVER_VESSEL: 4.0,
}

RESOLUTION_MM = 0.6  # Gaussian sigma of the scanner's in-plane blur (partial volume)
FINE_TEXTURE_MM = 1.0
COARSE_TEXTURE_MM = 6.0
QUANTUM_NOISE_HU = 5.0  # mild: the acquisition simulation adds its own measurement noise
BOUNDARY_NOISE_MM = 8.0  # correlation length of the wobble added to organ outlines
# Distances beyond this are only bounded, not exact; every inset or outset used is smaller.
FAR_MM = 20.0


def sample_hu_table(rng: np.random.Generator, table: dict[Tissue, tuple[float, float]]) -> dict[Tissue, float]:
    """One patient's HU per tissue, rounded to whole HU."""
    return {tissue: float(round(mean + rng.uniform(-half, half))) for tissue, (mean, half) in table.items()}


# ---------------------------------------------------------------- signed distance primitives


def superellipse_radius(theta: np.ndarray, a: float, b: float, power: float = 2.0) -> np.ndarray:
    """Boundary radius of |x/a|^p + |y/b|^p = 1 along direction theta (p = 2: an ellipse)."""
    c = np.abs(np.cos(theta)) / a
    s = np.abs(np.sin(theta)) / b
    return (c**power + s**power) ** (-1.0 / power)


def random_harmonics(rng: np.random.Generator, amplitude: float, kmax: int = 5) -> tuple[tuple[int, float, float], ...]:
    """Fourier terms (k, relative amplitude, phase) that make an outline irregular; higher k wobble less."""
    return tuple((k, float(rng.uniform(-amplitude, amplitude) / (k - 1)), float(rng.uniform(0, 2 * math.pi)))
                 for k in range(2, kmax + 1))


def harmonic_factor(theta: np.ndarray, harmonics: tuple[tuple[int, float, float], ...]) -> np.ndarray:
    out = np.ones_like(theta)
    for k, amp, phase in harmonics:
        out += amp * np.cos(k * theta + phase)
    return out


def radial_sdf(u: np.ndarray, v: np.ndarray, center: tuple[float, float], angle_deg: float,
               radius_fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Approximate signed distance to a star-shaped outline r = R(theta) (theta in the shape's own frame).

    The radial gap r - R is divided by |grad(r - R)| taken on the outline, which turns it into a
    first-order Euclidean distance, so edge ramps and insets have the same width all round.
    Far from the outline only a positive lower bound is computed (most organs are small).
    """
    du, dv = u - center[0], v - center[1]
    cos_a, sin_a = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    lu, lv = du * cos_a + dv * sin_a, -du * sin_a + dv * cos_a
    r = np.hypot(lu, lv)
    r_max = float(radius_fn(np.linspace(-math.pi, math.pi, 361)).max()) * 1.05
    out = r - r_max
    near = out < FAR_MM
    lu, lv, r = lu[near], lv[near], r[near]
    theta = np.arctan2(lv, lu)
    step = 1e-3
    big_r = radius_fn(theta)
    slope = (radius_fn(theta + step) - radius_fn(theta - step)) / (2 * step)
    out[near] = (r - big_r) / np.sqrt(1.0 + (slope / big_r) ** 2)
    return out


@dataclass(frozen=True)
class Blob:
    """An irregular superellipse: the building block of organs."""

    center: tuple[float, float]
    a: float
    b: float
    angle_deg: float = 0.0
    power: float = 2.0
    harmonics: tuple[tuple[int, float, float], ...] = ()

    def radius(self, theta: np.ndarray) -> np.ndarray:
        return superellipse_radius(theta, self.a, self.b, self.power) * harmonic_factor(theta, self.harmonics)

    def sdf(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return radial_sdf(u, v, self.center, self.angle_deg, self.radius)


def capsule_sdf(u: np.ndarray, v: np.ndarray, p0: tuple[float, float], p1: tuple[float, float],
                radius: float) -> np.ndarray:
    """Exact signed distance to a segment thickened by ``radius`` (screws, vessels, processes)."""
    pu, pv = u - p0[0], v - p0[1]
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip((pu * du + pv * dv) / max(du * du + dv * dv, 1e-12), 0.0, 1.0)
    return np.hypot(pu - t * du, pv - t * dv) - radius


def circle_sdf(u: np.ndarray, v: np.ndarray, center: tuple[float, float], radius: float) -> np.ndarray:
    return np.hypot(u - center[0], v - center[1]) - radius


def smooth_union(d1: np.ndarray, d2: np.ndarray, k: float) -> np.ndarray:
    """Union that rounds the crease over about ``k`` mm, so joined lobes look like one organ."""
    h = np.clip(0.5 + 0.5 * (d2 - d1) / k, 0.0, 1.0)
    return d2 * (1 - h) + d1 * h - k * h * (1 - h)


def subtract(d: np.ndarray, cut: np.ndarray) -> np.ndarray:
    return np.maximum(d, -cut)


# ---------------------------------------------------------------- canvas


@dataclass
class Canvas:
    """The image being painted, its tissue labels, and the patient-frame coordinates of each pixel."""

    size: int
    spacing: float
    u: np.ndarray
    v: np.ndarray
    hu_table: dict[Tissue, float]
    boundary_noise: np.ndarray
    hu: np.ndarray = field(init=False)
    labels: np.ndarray = field(init=False)
    body_sdf: np.ndarray | None = None
    rotation_deg: float = 0.0
    offset_mm: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        self.hu = np.full((self.size, self.size), self.hu_table[Tissue.AIR], dtype=np.float64)
        self.labels = np.zeros((self.size, self.size), dtype=np.uint8)

    @classmethod
    def create(cls, size: int, rotation_deg: float, offset_mm: tuple[float, float],
               hu_table: dict[Tissue, float], boundary_rng: np.random.Generator) -> Canvas:
        spacing = FOV_MM / size
        centres = (np.arange(size) + 0.5 - size / 2) * spacing
        y, x = np.meshgrid(centres, centres, indexing="ij")
        cos_r, sin_r = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
        px, py = x - offset_mm[0], y - offset_mm[1]
        u, v = px * cos_r + py * sin_r, -px * sin_r + py * cos_r
        return cls(size, spacing, u, v, hu_table, _boundary_noise(boundary_rng, u, v),
                   rotation_deg=rotation_deg, offset_mm=offset_mm)

    def image_mm(self, point: tuple[float, float]) -> list[float]:
        """A patient-frame point in image millimetres: x to the right, y down, from the image centre."""
        cos_r, sin_r = math.cos(math.radians(self.rotation_deg)), math.sin(math.radians(self.rotation_deg))
        u, v = point
        x, y = u * cos_r - v * sin_r + self.offset_mm[0], u * sin_r + v * cos_r + self.offset_mm[1]
        return [round(x, 3), round(y, 3)]

    def copy(self) -> Canvas:
        twin = replace(self)
        twin.hu, twin.labels = self.hu.copy(), self.labels.copy()
        return twin

    def paint(self, sdf: np.ndarray, tissue: Tissue, hu: float | np.ndarray | None = None,
              edge_mm: float = 0.0, within: tuple[Tissue, ...] | None = None) -> np.ndarray:
        """Composite ``tissue`` over the image where ``sdf < 0``; returns the pixels now labelled with it.

        The ramp is one pixel wide (or ``edge_mm`` if wider), so an edge that cuts a pixel gives a
        partial-volume mix instead of a staircase.
        """
        width = max(self.spacing, edge_mm)
        weight = np.clip(0.5 - sdf / width, 0.0, 1.0)
        inside = sdf < 0
        if within is not None:
            allowed = np.isin(self.labels, [int(t) for t in within])
            weight = weight * allowed
            inside &= allowed
        value = self.hu_table[tissue] if hu is None else hu
        self.hu += weight * (value - self.hu)
        self.labels[inside] = int(tissue)
        return inside

    def paint_blob(self, blob: Blob, tissue: Tissue, **kwargs) -> np.ndarray:
        return self.paint(blob.sdf(self.u, self.v), tissue, **kwargs)


# Builds the canvas once the patient's pose (rotation in degrees, offset in mm) is drawn.
CanvasFactory = Callable[[float, tuple[float, float]], Canvas]


def _boundary_noise(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A smooth unit-variance field over the patient frame, sampled at each pixel.

    It is drawn on a fixed 4 mm grid and interpolated, so one seed gives the same organ outlines
    at every matrix size.
    """
    cell_mm, n = 4.0, int(FOV_MM / 4.0) + 1
    field_ = ndimage.gaussian_filter(rng.standard_normal((n, n)), BOUNDARY_NOISE_MM / cell_mm, mode="wrap")
    field_ /= field_.std()
    rows = np.clip((v + FOV_MM / 2) / cell_mm, 0, n - 1)
    cols = np.clip((u + FOV_MM / 2) / cell_mm, 0, n - 1)
    return ndimage.map_coordinates(field_, [rows, cols], order=1)


def _unit_field(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma_px, mode="wrap")
    return noise / noise.std()


def finish(canvas: Canvas, rng: np.random.Generator, artifact_hu: np.ndarray | None = None) -> np.ndarray:
    """Scanner blur, tissue texture and quantum noise; returns integer-valued, clipped HU (float32).

    ``artifact_hu`` (metal streaks) is added after the blur because it comes from the
    reconstruction, not from the object.
    """
    hu = ndimage.gaussian_filter(canvas.hu, RESOLUTION_MM / canvas.spacing, mode="nearest")
    lut = np.array([TEXTURE_HU[Tissue(code)] for code in range(len(Tissue))])
    # Blurred so that texture strength changes smoothly across a tissue border, as partial volume does.
    amplitude = ndimage.gaussian_filter(lut[canvas.labels], 0.7)
    texture = 0.8 * _unit_field(rng, canvas.size, FINE_TEXTURE_MM / canvas.spacing) \
        + 0.6 * _unit_field(rng, canvas.size, COARSE_TEXTURE_MM / canvas.spacing)
    hu += amplitude * texture + rng.normal(0.0, QUANTUM_NOISE_HU, hu.shape)
    if artifact_hu is not None:
        hu += artifact_hu
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.float32)


# ---------------------------------------------------------------- body wall


@dataclass
class Torso:
    """Outline of the trunk and its wall, shared by the abdomen and the thorax."""

    half_width_mm: float
    half_depth_mm: float
    power: float
    harmonics: tuple[tuple[int, float, float], ...]
    fat_anterior_mm: float
    fat_posterior_mm: float
    fat_lateral_mm: float
    wall_mm: float
    wall_posterior_extra_mm: float = 0.0  # ribs, scapulae and their muscles in the thorax

    def skin_radius(self, theta: np.ndarray) -> np.ndarray:
        return superellipse_radius(theta, self.half_width_mm, self.half_depth_mm, self.power) \
            * harmonic_factor(theta, self.harmonics)

    def fat_thickness(self, theta: np.ndarray) -> np.ndarray:
        # Subcutaneous fat piles up anteriorly and over the flanks, and is thin over the back.
        front_back = self.fat_posterior_mm + (self.fat_anterior_mm - self.fat_posterior_mm) * (1 - np.sin(theta)) / 2
        return front_back + self.fat_lateral_mm * np.cos(theta) ** 2

    def wall_thickness(self, theta: np.ndarray) -> np.ndarray:
        # Flank muscles (obliques) are thicker than the rectus sheath.
        lateral = self.wall_mm * (1.0 + 0.3 * np.cos(theta) ** 2)
        return lateral + self.wall_posterior_extra_mm * np.clip(np.sin(theta), 0.0, None) ** 2

    def fascia_radius(self, theta: np.ndarray) -> np.ndarray:
        return self.skin_radius(theta) - self.fat_thickness(theta)

    def cavity_radius(self, theta: np.ndarray) -> np.ndarray:
        return self.fascia_radius(theta) - self.wall_thickness(theta)

    def extent(self, theta_deg: float) -> float:
        """Distance from the centre to the cavity edge in one direction (0 = image right, 90 = posterior)."""
        return float(self.cavity_radius(np.array(math.radians(theta_deg))))

    def wall_point(self, theta_deg: float, depth: float) -> tuple[float, float]:
        """A point inside the muscle wall; depth 0 = fascia, 1 = cavity edge."""
        theta = np.array(math.radians(theta_deg))
        r = float(self.fascia_radius(theta) - depth * self.wall_thickness(theta))
        return r * math.cos(math.radians(theta_deg)), r * math.sin(math.radians(theta_deg))


def sample_torso(rng: np.random.Generator, width: tuple[float, float], depth_ratio: tuple[float, float],
                 fat_scale: float) -> Torso:
    half_width = rng.uniform(*width)
    # Larger patients carry more fat: tie subcutaneous fat to the sampled width.
    girth = (half_width - width[0]) / (width[1] - width[0])
    return Torso(
        half_width_mm=half_width,
        half_depth_mm=min(half_width * rng.uniform(*depth_ratio), 140.0),
        power=rng.uniform(2.1, 2.6),
        harmonics=random_harmonics(rng, 0.025, 4),
        fat_anterior_mm=fat_scale * (10 + 25 * girth + rng.uniform(0, 10)),
        fat_posterior_mm=fat_scale * (6 + 10 * girth + rng.uniform(0, 5)),
        fat_lateral_mm=fat_scale * (5 + 15 * girth) * rng.uniform(0.5, 1.0),
        wall_mm=rng.uniform(8, 12),
    )


def paint_torso(canvas: Canvas, torso: Torso) -> None:
    canvas.body_sdf = radial_sdf(canvas.u, canvas.v, (0.0, 0.0), 0.0, torso.skin_radius)
    canvas.paint(canvas.body_sdf, Tissue.FAT)
    canvas.paint(radial_sdf(canvas.u, canvas.v, (0.0, 0.0), 0.0, torso.fascia_radius), Tissue.MUSCLE)


def cavity_sdf(canvas: Canvas, torso: Torso) -> np.ndarray:
    return radial_sdf(canvas.u, canvas.v, (0.0, 0.0), 0.0, torso.cavity_radius)


def paint_bone(canvas: Canvas, outer: np.ndarray, cortex_mm: float) -> None:
    """Cortical shell around a cancellous core."""
    canvas.paint(outer, Tissue.CORTICAL_BONE)
    canvas.paint(outer + cortex_mm, Tissue.CANCELLOUS_BONE)


def paint_rib(canvas: Canvas, rng: np.random.Generator, center: tuple[float, float], theta_deg: float,
              length_mm: float) -> None:
    rib = Blob(center, length_mm, rng.uniform(3.5, 5.0), theta_deg + 90 + rng.uniform(-15, 15))
    paint_bone(canvas, rib.sdf(canvas.u, canvas.v), cortex_mm=1.5)


@dataclass
class Spine:
    """One vertebra; pedicle screws are placed from these numbers."""

    body: Blob
    canal_center: tuple[float, float]
    canal_radius: float
    spinous_tip: tuple[float, float]
    transverse_tips: tuple[tuple[float, float], tuple[float, float]]
    scale: float

    @property
    def front_v(self) -> float:
        return self.body.center[1] - self.body.b


def sample_spine(rng: np.random.Generator, center: tuple[float, float], scale: float,
                 spinous_mm: float = 24.0) -> Spine:
    u0, v0 = center
    half_w, half_d = 21 * scale * rng.uniform(0.92, 1.08), 16 * scale * rng.uniform(0.92, 1.08)
    body = Blob(center, half_w, half_d, rng.uniform(-3, 3), power=2.4, harmonics=random_harmonics(rng, 0.02, 3))
    canal_r = 9 * scale
    canal_c = (u0, v0 + half_d + canal_r + 1)
    tip = (u0 + rng.uniform(-3, 3), canal_c[1] + canal_r + spinous_mm * scale)
    transverse = tuple((u0 + side * 30 * scale, canal_c[1] + rng.uniform(2, 8)) for side in (-1, 1))
    return Spine(body, canal_c, canal_r, tip, transverse, scale)


def paint_spine(canvas: Canvas, spine: Spine) -> None:
    """Vertebral body, posterior arch, spinous and transverse processes, canal."""
    u, v, s = canvas.u, canvas.v, spine.scale
    arch = Blob(spine.canal_center, spine.canal_radius + 6 * s, spine.canal_radius + 5 * s)
    canal_back = (spine.canal_center[0], spine.canal_center[1] + spine.canal_radius)
    posterior = np.minimum(arch.sdf(u, v), capsule_sdf(u, v, canal_back, spine.spinous_tip, 3 * s))
    for tip in spine.transverse_tips:
        cu, cv = spine.canal_center
        root = (cu + math.copysign(10 * s, tip[0] - cu), cv - 2)
        posterior = np.minimum(posterior, capsule_sdf(u, v, root, tip, 2.8 * s))
    paint_bone(canvas, posterior, cortex_mm=2.0)
    paint_bone(canvas, spine.body.sdf(u, v), cortex_mm=2.0)
    canvas.paint(Blob(spine.canal_center, spine.canal_radius, spine.canal_radius * 0.85).sdf(u, v), Tissue.CSF)


# ---------------------------------------------------------------- abdominal organs


@dataclass
class AbdomenLayout:
    """The main draws that fix one patient, recorded in the phantom's meta."""

    rotation_deg: float
    offset_mm: tuple[float, float]
    torso: Torso
    scale: float
    vertebra_center_mm: tuple[float, float]
    liver_scale: float
    kidney_scale: float


def sample_abdomen_layout(rng: np.random.Generator) -> AbdomenLayout:
    torso = sample_torso(rng, width=(135.0, 172.0), depth_ratio=(0.68, 0.82), fat_scale=1.0)
    scale = rng.uniform(0.9, 1.1)
    skin_back = float(torso.skin_radius(np.array(math.pi / 2)))
    vertebra_v = skin_back - torso.fat_posterior_mm - 68 * scale
    return AbdomenLayout(
        rotation_deg=rng.uniform(-4, 4),
        offset_mm=(rng.uniform(-10, 10), rng.uniform(-12, 8)),
        torso=torso,
        scale=scale,
        vertebra_center_mm=(rng.uniform(-3, 3), vertebra_v),
        liver_scale=rng.uniform(0.85, 1.12),
        kidney_scale=rng.uniform(0.88, 1.1),
    )


@dataclass
class Landmarks:
    """Where structures sit, drawn before painting so that later organs can refer to them."""

    spine: Spine
    aorta: tuple[float, float]
    aorta_radius: float
    ivc: Blob
    sma: tuple[float, float]
    smv: tuple[float, float]
    smv_radius: float
    portal_vein: Blob
    spleen_hilum: tuple[float, float] = (0.0, 0.0)
    gallbladder: tuple[float, float] | None = None


def sample_landmarks(rng: np.random.Generator, lay: AbdomenLayout) -> Landmarks:
    spine = sample_spine(rng, lay.vertebra_center_mm, lay.scale)
    u0 = spine.body.center[0]
    aorta_r = rng.uniform(9.5, 12.5)
    aorta = (u0 + rng.uniform(4, 14) * lay.scale, spine.front_v - aorta_r - 2)
    ivc = Blob((u0 - rng.uniform(20, 28) * lay.scale, spine.front_v - rng.uniform(10, 16)),
               rng.uniform(12, 16), rng.uniform(8, 11), rng.uniform(-20, 20))
    sma = (aorta[0] + rng.uniform(-3, 3), aorta[1] - aorta_r - rng.uniform(10, 16))
    smv = (sma[0] - rng.uniform(10, 14), sma[1] + rng.uniform(-4, 2))
    portal = Blob((-0.2 * lay.torso.extent(180) + rng.uniform(-6, 6), -0.1 * lay.torso.extent(-90)),
                  rng.uniform(8, 11), rng.uniform(6, 8), rng.uniform(-40, 0))
    return Landmarks(spine, aorta, aorta_r, ivc, sma, smv, rng.uniform(4, 6), portal)


def paint_liver(canvas: Canvas, rng: np.random.Generator, lay: AbdomenLayout, cavity: np.ndarray) -> None:
    right_extent, front = lay.torso.extent(180), lay.torso.extent(-90)
    s = lay.liver_scale
    right_lobe = Blob((-0.5 * right_extent, -0.05 * front), 0.55 * right_extent * s, 0.9 * front * s,
                      rng.uniform(-12, 6), power=2.2, harmonics=random_harmonics(rng, 0.05))
    left_lobe = Blob((-0.12 * right_extent + rng.uniform(-8, 8), -0.6 * front), 0.36 * right_extent * s,
                     0.2 * front * rng.uniform(0.85, 1.2), rng.uniform(-4, 14), harmonics=random_harmonics(rng, 0.06))
    liver = smooth_union(right_lobe.sdf(canvas.u, canvas.v), left_lobe.sdf(canvas.u, canvas.v), 15.0)
    # The liver fills the right upper quadrant up to the wall.
    canvas.paint(np.maximum(liver + 1.5 * canvas.boundary_noise, cavity + 1.0), Tissue.LIVER)
    hilum = (-0.2 * right_extent, -0.15 * front)
    for _ in range(rng.integers(3, 7)):
        tree = vessel_tree_sdf(canvas, rng, hilum, rng.uniform(100, 260), rng.uniform(20, 40), rng.uniform(2.5, 4.5), 1)
        canvas.paint(tree, Tissue.LIVER_VESSEL, hu=canvas.hu_table[Tissue.BLOOD], within=(Tissue.LIVER,))


def vessel_tree_sdf(canvas: Canvas, rng: np.random.Generator, start: tuple[float, float], heading_deg: float,
                    length: float, radius: float, forks: int) -> np.ndarray:
    """A vessel segment that forks ``forks`` more times, each generation shorter and thinner:
    the in-plane look of hepatic and pulmonary vessels."""
    rad = math.radians(heading_deg)
    end = (start[0] + length * math.cos(rad), start[1] + length * math.sin(rad))
    sdf = capsule_sdf(canvas.u, canvas.v, start, end, radius)
    if forks > 0:
        for turn in (-1, 1):
            heading = heading_deg + turn * rng.uniform(15, 35)
            child = vessel_tree_sdf(canvas, rng, end, heading, length * rng.uniform(0.6, 0.9), radius * 0.65, forks - 1)
            sdf = np.minimum(sdf, child)
    return sdf


def paint_gallbladder(canvas: Canvas, rng: np.random.Generator, lay: AbdomenLayout) -> tuple[float, float] | None:
    if rng.random() < 0.25:  # above its fundus, or removed
        return None
    center = (-0.3 * lay.torso.extent(180) + rng.uniform(-10, 10), -0.5 * lay.torso.extent(-90) + rng.uniform(-8, 8))
    blob = Blob(center, rng.uniform(14, 22), rng.uniform(9, 14), rng.uniform(30, 80),
                harmonics=random_harmonics(rng, 0.03))
    canvas.paint_blob(blob, Tissue.FLUID)
    return center


def paint_spleen(canvas: Canvas, rng: np.random.Generator, lay: AbdomenLayout,
                 cavity: np.ndarray) -> tuple[float, float]:
    """A crescent along the left posterolateral wall; returns its hilum, where the pancreatic tail ends."""
    theta_deg = rng.uniform(5, 32)
    theta = math.radians(theta_deg)
    thick, length = rng.uniform(16, 24) * lay.scale, rng.uniform(40, 55) * lay.scale
    r = lay.torso.extent(theta_deg) - thick - 1.0
    center = (r * math.cos(theta), r * math.sin(theta))
    spleen = Blob(center, length, thick, theta_deg + 90, harmonics=random_harmonics(rng, 0.05)).sdf(canvas.u, canvas.v)
    # The medial face is concave where the splenic vessels enter.
    hollow = (center[0] - 2.2 * thick * math.cos(theta), center[1] - 2.2 * thick * math.sin(theta))
    spleen = subtract(spleen, circle_sdf(canvas.u, canvas.v, hollow, 1.8 * thick))
    canvas.paint(np.maximum(spleen + 1.0 * canvas.boundary_noise, cavity + 1.0), Tissue.SPLEEN)
    return (center[0] - 1.3 * thick * math.cos(theta), center[1] - 1.3 * thick * math.sin(theta))


def paint_stomach(canvas: Canvas, rng: np.random.Generator, lay: AbdomenLayout, cavity: np.ndarray) -> None:
    size = rng.uniform(0.55, 1.1)
    center = (0.35 * lay.torso.extent(0) + rng.uniform(-10, 10), -0.45 * lay.torso.extent(-90) + rng.uniform(-8, 8))
    blob = Blob(center, 48 * size, 36 * size, rng.uniform(-30, 30), harmonics=random_harmonics(rng, 0.07))
    outer = np.maximum(blob.sdf(canvas.u, canvas.v), cavity + 2.0)
    paint_hollow_viscus(canvas, rng, outer, wall_mm=rng.uniform(3, 5), gas_fraction=rng.uniform(0.0, 0.5))


def paint_hollow_viscus(canvas: Canvas, rng: np.random.Generator, outer: np.ndarray, wall_mm: float,
                        gas_fraction: float, content: Tissue = Tissue.FLUID, bubbles: int = 0) -> None:
    """Wall, liquid content and gas. Gas floats anteriorly (the patient lies supine): a flat air-fluid level."""
    canvas.paint(outer, Tissue.BOWEL_WALL)
    lumen = outer + wall_mm
    inside = lumen < 0
    if not inside.any():
        return
    canvas.paint(lumen, content)
    top, bottom = canvas.v[inside].min(), canvas.v[inside].max()
    level = top + gas_fraction * (bottom - top)
    if gas_fraction > 0:
        canvas.paint(np.maximum(lumen, canvas.v - level), Tissue.GAS)
    lumen_u, lumen_v = canvas.u[inside], canvas.v[inside]
    for _ in range(bubbles):
        k = rng.integers(lumen_u.size)
        canvas.paint(circle_sdf(canvas.u, canvas.v, (lumen_u[k], lumen_v[k]), rng.uniform(1.5, 4.0)), Tissue.GAS,
                     within=(content, Tissue.GAS))


def paint_kidney(canvas: Canvas, rng: np.random.Generator, lay: AbdomenLayout, side: int) -> None:
    """side -1 = patient's right (image left). The hilum faces anteromedially."""
    s = lay.kidney_scale * lay.scale
    u_v, v_v = lay.vertebra_center_mm
    # Upper poles: smaller than the mid-kidney section, and tucked against the back muscles.
    center = (u_v + side * rng.uniform(56, 66) * s, v_v + rng.uniform(2, 12) * s)
    a, b = rng.uniform(21, 26) * s, rng.uniform(15, 19) * s
    angle = -side * rng.uniform(22, 40)
    axis = (math.cos(math.radians(angle)), math.sin(math.radians(angle)))
    medial = (-side * axis[0], -side * axis[1])

    def along(frac: float) -> tuple[float, float]:
        return center[0] + frac * a * medial[0], center[1] + frac * a * medial[1]

    kidney = Blob(center, a, b, angle, harmonics=random_harmonics(rng, 0.03))
    canvas.paint(kidney.sdf(canvas.u, canvas.v) - rng.uniform(3, 7), Tissue.FAT)  # perirenal fat
    sdf = subtract(kidney.sdf(canvas.u, canvas.v), circle_sdf(canvas.u, canvas.v, along(1.0), 0.5 * b))
    canvas.paint(sdf, Tissue.KIDNEY_CORTEX)
    # Medullary pyramids fan out around the sinus, away from the hilum.
    lateral_deg = angle + (180.0 if side < 0 else 0.0)
    for phi in np.radians(lateral_deg + np.linspace(-100, 100, 4) + rng.uniform(-10, 10)):
        spot = (center[0] + 0.5 * a * math.cos(phi), center[1] + 0.5 * a * math.sin(phi))
        canvas.paint(Blob(spot, 5.5 * s, 4 * s, math.degrees(phi)).sdf(canvas.u, canvas.v), Tissue.KIDNEY_MEDULLA,
                     within=(Tissue.KIDNEY_CORTEX,))
    canvas.paint(Blob(along(0.45), 0.32 * a, 0.3 * b, angle).sdf(canvas.u, canvas.v), Tissue.FAT)  # renal sinus
    canvas.paint(circle_sdf(canvas.u, canvas.v, along(0.65), rng.uniform(3, 6) * s), Tissue.FLUID)  # pelvis
    canvas.paint(capsule_sdf(canvas.u, canvas.v, along(0.8), along(2.0), 4.0), Tissue.BLOOD, within=(Tissue.FAT,))


def paint_pancreas(canvas: Canvas, rng: np.random.Generator, marks: Landmarks) -> None:
    tail = marks.spleen_hilum
    body = (marks.sma[0] + 5 + rng.uniform(-5, 5), marks.sma[1] - 9)
    head = (marks.smv[0] - rng.uniform(15, 25), marks.smv[1] + rng.uniform(0, 10))
    sdf = np.minimum(capsule_sdf(canvas.u, canvas.v, tail, body, rng.uniform(8, 11)),
                     capsule_sdf(canvas.u, canvas.v, body, head, rng.uniform(10, 14)))
    # Fatty lobulation makes the pancreatic outline bumpy.
    canvas.paint(sdf + 2.5 * canvas.boundary_noise, Tissue.PANCREAS)
    behind = 5.0  # the splenic vein runs along the back of the pancreas
    canvas.paint(capsule_sdf(canvas.u, canvas.v, (tail[0], tail[1] + behind), (body[0], body[1] + behind), 3.5),
                 Tissue.BLOOD, within=(Tissue.PANCREAS, Tissue.FAT))


def paint_great_vessels(canvas: Canvas, marks: Landmarks) -> None:
    canvas.paint(circle_sdf(canvas.u, canvas.v, marks.aorta, marks.aorta_radius), Tissue.BLOOD)
    canvas.paint_blob(marks.ivc, Tissue.BLOOD)
    canvas.paint(circle_sdf(canvas.u, canvas.v, marks.sma, 8.0), Tissue.FAT)  # the SMA's fat collar
    canvas.paint(circle_sdf(canvas.u, canvas.v, marks.sma, 3.5), Tissue.BLOOD)
    canvas.paint(circle_sdf(canvas.u, canvas.v, marks.smv, marks.smv_radius), Tissue.BLOOD)
    canvas.paint_blob(marks.portal_vein, Tissue.BLOOD)


def paint_back_muscles(canvas: Canvas, rng: np.random.Generator, lay: AbdomenLayout) -> None:
    u_v, v_v = lay.vertebra_center_mm
    s = lay.scale
    fascia = radial_sdf(canvas.u, canvas.v, (0.0, 0.0), 0.0, lay.torso.fascia_radius)
    for side in (-1, 1):
        erector = Blob((u_v + side * 33 * s, v_v + 48 * s), 30 * s, 26 * s, side * rng.uniform(0, 15),
                       harmonics=random_harmonics(rng, 0.05))
        canvas.paint(np.maximum(erector.sdf(canvas.u, canvas.v), fascia), Tissue.MUSCLE)
        quadratus = Blob((u_v + side * 62 * s, v_v + 28 * s), 20 * s, 10 * s, side * 30)
        canvas.paint(np.maximum(quadratus.sdf(canvas.u, canvas.v), fascia), Tissue.MUSCLE)
        psoas = Blob((u_v + side * 31 * s, v_v + rng.uniform(-4, 2)), 10 * s, 9 * s, side * 20)
        canvas.paint_blob(psoas, Tissue.MUSCLE)


def paint_abdominal_ribs(canvas: Canvas, rng: np.random.Generator, torso: Torso) -> None:
    """Lower ribs sit in the lateral and posterolateral wall; costal cartilage anterolaterally."""
    for base in (125.0, 152.0, 180.0, 206.0):
        for mirrored in (base, 180.0 - base):
            if rng.random() < 0.25:
                continue
            theta = mirrored + rng.uniform(-6, 6)
            paint_rib(canvas, rng, torso.wall_point(theta, 0.5), theta, rng.uniform(6, 10))
    for theta in (-120.0, -60.0):
        if rng.random() < 0.6:
            t = theta + rng.uniform(-8, 8)
            cartilage = Blob(torso.wall_point(t, 0.5), rng.uniform(6, 9), 4.0, t + 90)
            canvas.paint_blob(cartilage, Tissue.CARTILAGE)


def place_in_fat(canvas: Canvas, rng: np.random.Generator, cavity: np.ndarray, radius: float,
                 min_fat: float, tries: int = 60) -> tuple[float, float] | None:
    """A centre whose disc of ``radius`` is mostly visceral fat: free space for a bowel loop or vessel."""
    is_fat = canvas.labels == Tissue.FAT
    candidates = np.flatnonzero(is_fat & (cavity < -radius))
    if candidates.size == 0:
        return None
    reach = int(math.ceil(radius / canvas.spacing))
    offsets = np.arange(-reach, reach + 1)
    disc = np.hypot(offsets[:, None], offsets[None, :]) * canvas.spacing < radius
    padded = np.pad(is_fat, reach)
    for _ in range(tries):
        k = candidates[rng.integers(candidates.size)]
        i, j = divmod(int(k), canvas.size)
        window = padded[i:i + 2 * reach + 1, j:j + 2 * reach + 1]
        if window[disc].mean() >= min_fat:
            return float(canvas.u.flat[k]), float(canvas.v.flat[k])
    return None


def paint_bowel(canvas: Canvas, rng: np.random.Generator, cavity: np.ndarray) -> None:
    for _ in range(rng.integers(1, 4)):  # colon: wide, stool with bubbles, often a gas cap
        radius = rng.uniform(13, 22)
        center = place_in_fat(canvas, rng, cavity, radius, 0.85)
        if center is not None:
            blob = Blob(center, radius, radius * rng.uniform(0.7, 1.0), rng.uniform(0, 180),
                        harmonics=random_harmonics(rng, 0.08))
            paint_hollow_viscus(canvas, rng, blob.sdf(canvas.u, canvas.v), wall_mm=2.5,
                                gas_fraction=rng.choice([0.0, rng.uniform(0.1, 0.7)]), content=Tissue.BOWEL_CONTENT,
                                bubbles=rng.integers(0, 7))
    for _ in range(rng.integers(2, 9)):  # small bowel: narrow, fluid-filled or collapsed
        radius = rng.uniform(7, 13)
        center = place_in_fat(canvas, rng, cavity, radius, 0.7)
        if center is None:
            continue
        blob = Blob(center, radius, radius * rng.uniform(0.6, 1.0), rng.uniform(0, 180),
                    harmonics=random_harmonics(rng, 0.06))
        collapsed = rng.random() < 0.3
        paint_hollow_viscus(canvas, rng, blob.sdf(canvas.u, canvas.v), wall_mm=radius if collapsed else 2.5,
                            gas_fraction=rng.uniform(0.1, 0.4) if rng.random() < 0.2 else 0.0)
    for _ in range(rng.integers(4, 12)):  # mesenteric vessels
        radius = rng.uniform(1.5, 3.0)
        center = place_in_fat(canvas, rng, cavity, radius + 2, 0.9)
        if center is not None:
            canvas.paint(circle_sdf(canvas.u, canvas.v, center, radius), Tissue.BLOOD)


def build_abdomen(canvas_factory: CanvasFactory, rng: np.random.Generator) -> tuple[Canvas, Landmarks, dict]:
    """Paint a healthy abdomen: the canvas (before texture), its landmarks, and a JSON-able description."""
    lay = sample_abdomen_layout(rng)
    marks = sample_landmarks(rng, lay)
    canvas = canvas_factory(lay.rotation_deg, lay.offset_mm)
    paint_torso(canvas, lay.torso)
    cavity = cavity_sdf(canvas, lay.torso)
    canvas.paint(cavity, Tissue.FAT)
    paint_liver(canvas, rng, lay, cavity)
    marks.gallbladder = paint_gallbladder(canvas, rng, lay)
    paint_stomach(canvas, rng, lay, cavity)
    marks.spleen_hilum = paint_spleen(canvas, rng, lay, cavity)
    for side in (-1, 1):
        paint_kidney(canvas, rng, lay, side)
    paint_pancreas(canvas, rng, marks)
    paint_great_vessels(canvas, marks)
    paint_back_muscles(canvas, rng, lay)
    paint_abdominal_ribs(canvas, rng, lay.torso)
    paint_spine(canvas, marks.spine)
    paint_bowel(canvas, rng, cavity)
    anatomy = {"region": "abdomen", "layout": asdict(lay), "landmarks_mm": asdict(marks)}
    return canvas, marks, anatomy
