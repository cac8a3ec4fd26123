"""Out-of-distribution variants of the abdominal phantom, each with a ground-truth pixel mask.

- lesion: focal liver lesions in an otherwise healthy patient (the same patient as the healthy
  phantom with the same seed, so the two differ only inside the mask);
- metal: titanium implants with streak artifacts from a simulated polychromatic, photon-limited scan;
- shift: a whole-image change of anatomy (a thoracic slice) or of contrast phase (portal-venous).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.transform import iradon, radon, resize

from klviewer.errors import KlviewerInputError
from klviewer.phantoms.abdomen import (
    Blob,
    Canvas,
    CanvasFactory,
    Landmarks,
    Tissue,
    Torso,
    capsule_sdf,
    cavity_sdf,
    circle_sdf,
    paint_bone,
    paint_rib,
    paint_spine,
    paint_torso,
    radial_sdf,
    random_harmonics,
    sample_spine,
    sample_torso,
    vessel_tree_sdf,
)
from klviewer.phantoms.phantom import FOV_MM

# Linear attenuation of water at about 70 keV, the effective energy of a 120 kVp spectrum.
MU_WATER_PER_MM = 0.0193
# Titanium at 70 keV: 0.32 cm^2/g x 4.5 g/cm^3 = 0.144 /mm, i.e. about +6500 HU. A reconstruction
# shows it clipped at +3071; the simulated scan sees the true value.
TITANIUM_HU = 6500.0
# Unattenuated photons per detector reading (Gaussian approximation of Poisson counts, floored
# at one photon); about 1000 get through a 30 cm abdomen, almost none along a screw.
PHOTONS_PER_RAY = 3.0e5
# Beam-hardening error (in line-integral units) per squared metal line integral: a
# water-calibrated scanner under-reads paths through metal, more than linearly.
BEAM_HARDENING = 0.05
STREAK_GRID = 256
FBP_FILTER = "hann"  # a smooth kernel, as for abdominal soft tissue; ramp leaves needle-thin streaks


def _range(name: str, value: float | tuple[float, float], low: float, high: float) -> tuple[float, float]:
    """A number or a (low, high) pair, checked against the allowed span."""
    pair = (value, value) if isinstance(value, numbers.Real) else tuple(value)
    if len(pair) != 2 or not all(isinstance(x, numbers.Real) and math.isfinite(x) for x in pair):
        raise KlviewerInputError(None, f"{name} must be a number or a (low, high) pair, got {value!r}")
    lo, hi = float(pair[0]), float(pair[1])
    if not low <= lo <= hi <= high:
        raise KlviewerInputError(None, f"{name} must lie within [{low}, {high}] with low <= high, got {value!r}")
    return lo, hi


# ---------------------------------------------------------------- lesions


@dataclass(frozen=True)
class LesionParams:
    """n_lesions: None draws 1-3. radius_mm is the smallest radius of each (irregular) lesion.
    contrast_hu is lesion minus liver, signed (negative = hypodense); None draws 40-80 HU of either sign."""

    n_lesions: int | None = None
    radius_mm: float | tuple[float, float] = (4.0, 12.0)
    contrast_hu: float | tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.n_lesions is not None and (not isinstance(self.n_lesions, numbers.Integral)
                                           or not 1 <= self.n_lesions <= 10):
            raise KlviewerInputError(None, f"n_lesions must be an integer from 1 to 10, got {self.n_lesions!r}")
        _range("radius_mm", self.radius_mm, 1.0, 40.0)
        if self.contrast_hu is not None:
            lo, hi = _range("contrast_hu", self.contrast_hu, -500.0, 500.0)
            if lo == hi == 0:
                raise KlviewerInputError(None, "contrast_hu of 0 makes an invisible lesion")


def _lesion_outline(radius: float, terms: list[tuple[int, float, float]]) -> Callable[[np.ndarray], np.ndarray]:
    """Outline that only bulges outward from ``radius``, so the stated radius is a true minimum."""

    def outline(theta: np.ndarray) -> np.ndarray:
        return radius * (1.0 + sum(a * (1 + np.cos(k * theta + p)) / 2 for k, a, p in terms))

    return outline


def _clearance(canvas: Canvas, depth: np.ndarray, placed: list[tuple[tuple[float, float], float]],
               margin: float) -> np.ndarray:
    """The largest lesion reach (mm) each pixel could centre: inside the liver by ``margin``, and
    3 mm clear of the lesions already placed, so that each one's contrast stays measurable."""
    room = depth - margin
    for other, other_reach in placed:
        room = np.minimum(room, circle_sdf(canvas.u, canvas.v, other, other_reach + 3.0))
    return room


def add_lesions(canvas: Canvas, rng: np.random.Generator, params: LesionParams) -> tuple[np.ndarray, list[dict]]:
    """Paint focal lesions into the liver; returns their pixel mask and a description of each.

    Each radius is drawn from ``params.radius_mm`` and reduced, never below the range's low end,
    when the liver has no room for it.
    """
    hepatic = (Tissue.LIVER, Tissue.LIVER_VESSEL)
    liver = np.isin(canvas.labels, [int(t) for t in hepatic])
    # Depth into the liver (mm). A lesion may displace intrahepatic vessels but stays inside the
    # liver outline; the half pixel is the gap between the last liver pixel centre and the edge.
    depth = (ndimage.distance_transform_edt(liver) - 0.5) * canvas.spacing
    radius_low, radius_high = _range("radius_mm", params.radius_mm, 1.0, 40.0)
    liver_hu = canvas.hu_table[Tissue.LIVER]
    mask = np.zeros_like(liver)
    placed: list[tuple[tuple[float, float], float]] = []
    lesions = []
    count = params.n_lesions if params.n_lesions is not None else int(rng.integers(1, 4))
    for _ in range(count):
        radius = rng.uniform(radius_low, radius_high)
        if params.contrast_hu is None:
            contrast = rng.choice([-1.0, 1.0]) * rng.uniform(40.0, 80.0)
        else:
            contrast = rng.uniform(*_range("contrast_hu", params.contrast_hu, -500.0, 500.0))
        edge_mm = rng.uniform(0.5, 2.5)
        terms = [(k, rng.uniform(0.0, 0.12) / k, rng.uniform(0, 2 * math.pi)) for k in range(2, 6)]
        bulge = 1.0 + sum(a for _, a, _ in terms)
        room = _clearance(canvas, depth, placed, 0.5 * edge_mm)
        reach = min(radius * bulge, float(room.max()))
        radius = reach / bulge
        if radius < radius_low - 1e-9:
            raise KlviewerInputError(None, f"no room in the liver for a lesion of radius {radius_low:.1f} mm "
                                           f"(size {canvas.size}); ask for fewer or smaller lesions")
        candidates = np.flatnonzero(room >= reach - 1e-9)
        # Centre on a pixel centre so that even a sub-pixel lesion covers at least one pixel.
        row, col = divmod(int(candidates[rng.integers(candidates.size)]), canvas.size)
        center = (float(canvas.u[row, col]), float(canvas.v[row, col]))
        sdf = radial_sdf(canvas.u, canvas.v, center, 0.0, _lesion_outline(radius, terms))
        inside = canvas.paint(sdf, Tissue.LIVER, hu=liver_hu + contrast, edge_mm=edge_mm, within=hepatic)
        mask |= inside
        placed.append((center, reach))
        lesions.append({
            "center_px": [row, col],
            "center_mm": canvas.image_mm(center),
            "radius_mm": round(radius, 3),
            "max_radius_mm": round(reach, 3),
            "contrast_hu": round(float(contrast), 2),
            "type": "hypodense" if contrast < 0 else "hyperdense",
            "edge_mm": round(edge_mm, 3),
            "area_px": int(inside.sum()),
        })
    return mask, lesions


# ---------------------------------------------------------------- metal


IMPLANTS = ("screws", "clips")


@dataclass(frozen=True)
class MetalParams:
    """implant: "screws" (bilateral pedicle screws), "clips" (surgical clips at the liver hilum) or None
    (drawn). The mask is the metal plus every body pixel the implant moves by more than
    artifact_threshold_hu from the same patient without it."""

    implant: str | None = None
    artifact_threshold_hu: float = 100.0

    def __post_init__(self) -> None:
        if self.implant is not None and self.implant not in IMPLANTS:
            raise KlviewerInputError(None, f"implant must be one of {IMPLANTS} or None, got {self.implant!r}")
        if not (isinstance(self.artifact_threshold_hu, numbers.Real) and self.artifact_threshold_hu > 0):
            raise KlviewerInputError(None, f"artifact_threshold_hu must be a positive number, "
                                           f"got {self.artifact_threshold_hu!r}")


def _pedicle_screws(canvas: Canvas, rng: np.random.Generator, marks: Landmarks) -> tuple[np.ndarray, list[dict]]:
    """Screws through both pedicles into the vertebral body, converging, with their tulip heads behind."""
    spine = marks.spine
    s = spine.scale
    v0 = spine.body.center[1]
    sides = (-1, 1) if rng.random() > 0.15 else (int(rng.choice([-1, 1])),)
    sdf = np.full(canvas.u.shape, np.inf)
    pieces = []
    for side in sides:
        convergence = math.radians(rng.uniform(12, 25))
        direction = (-side * math.sin(convergence), -math.cos(convergence))
        entry = (spine.canal_center[0] + side * (spine.canal_radius + 8 * s), spine.canal_center[1] + 3 * s)
        length = (entry[1] - (v0 - 0.5 * spine.body.b)) / math.cos(convergence)
        tip = (entry[0] + length * direction[0], entry[1] + length * direction[1])
        head = (entry[0] - 8 * direction[0], entry[1] - 8 * direction[1])
        radius = max(rng.uniform(2.8, 3.4), 0.5 * canvas.spacing)
        sdf = np.minimum(sdf, capsule_sdf(canvas.u, canvas.v, entry, tip, radius))
        sdf = np.minimum(sdf, circle_sdf(canvas.u, canvas.v, head, max(6.0, 0.5 * canvas.spacing)))
        pieces.append({"type": "pedicle_screw", "entry_mm": canvas.image_mm(entry), "tip_mm": canvas.image_mm(tip),
                       "radius_mm": round(radius, 3)})
    return sdf, pieces


def _surgical_clips(canvas: Canvas, rng: np.random.Generator, marks: Landmarks) -> tuple[np.ndarray, list[dict]]:
    """A few cholecystectomy clips near the liver hilum."""
    base = marks.gallbladder if marks.gallbladder is not None else marks.portal_vein.center
    sdf = np.full(canvas.u.shape, np.inf)
    pieces = []
    for _ in range(rng.integers(2, 5)):
        center = (base[0] + rng.uniform(-15, 15), base[1] + rng.uniform(-15, 15))
        half, angle = rng.uniform(3.5, 5.0), rng.uniform(0, math.pi)
        p0 = (center[0] - half * math.cos(angle), center[1] - half * math.sin(angle))
        p1 = (center[0] + half * math.cos(angle), center[1] + half * math.sin(angle))
        # A clip is thinner than a pixel at coarse sizes; being metal it still saturates the pixel.
        radius = max(0.8, 0.5 * canvas.spacing)
        sdf = np.minimum(sdf, capsule_sdf(canvas.u, canvas.v, p0, p1, radius))
        pieces.append({"type": "surgical_clip", "center_mm": canvas.image_mm(center), "length_mm": round(2 * half, 3),
                       "radius_mm": round(radius, 3)})
    return sdf, pieces


def metal_streaks(canvas: Canvas, metal_fraction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The reconstruction error (HU) that the metal causes, from a simulated polychromatic scan.

    Rays through metal are (1) under-read by beam hardening, an error growing with the square of
    the metal path, and (2) photon-starved: few photons arrive, so their log-transformed reading is
    noisy, and below one photon the reading saturates. The same scan without the metal would
    have had ordinary quantum noise; using the same noise draw for both and keeping only the
    difference isolates what the metal adds (the phantom carries its own quantum noise).
    Filtered back-projection of that sinogram difference spreads it along the rays, giving dark
    bands between implants and streaks radiating from them.
    """
    # Radon/FBP cost grows as n^3; above STREAK_GRID the smooth streak image is computed on a
    # coarser grid (area-averaged, so thin metal keeps its line integral) and interpolated back.
    n = min(canvas.size, STREAK_GRID)
    spacing = FOV_MM / n
    hu, fraction = canvas.hu, metal_fraction
    if n < canvas.size:
        hu = resize(hu, (n, n), order=1, anti_aliasing=True)
        fraction = resize(fraction, (n, n), order=1, anti_aliasing=True)
    theta = np.linspace(0.0, 180.0, n, endpoint=False)
    fov = np.hypot(*np.meshgrid(np.arange(n) - (n - 1) / 2, np.arange(n) - (n - 1) / 2)) <= n / 2
    mu = np.clip(MU_WATER_PER_MM * (1.0 + hu / 1000.0), 0.0, None) * fov
    mu_metal = fraction * MU_WATER_PER_MM * (1.0 + TITANIUM_HU / 1000.0) * fov
    with_metal = radon(mu, theta, circle=True) * spacing
    through_metal = radon(mu_metal, theta, circle=True) * spacing
    without_metal = with_metal - through_metal
    draw = rng.standard_normal(with_metal.shape)

    def reading(line_integral: np.ndarray) -> np.ndarray:
        expected = PHOTONS_PER_RAY * np.exp(-line_integral)
        counts = np.maximum(expected + draw * np.sqrt(expected), 1.0)
        return np.log(PHOTONS_PER_RAY / counts)

    hardened = with_metal - BEAM_HARDENING * through_metal**2
    error = (reading(hardened) - with_metal) - (reading(without_metal) - without_metal)
    error = np.where(through_metal > 1e-3, error, 0.0)
    error_mu = iradon(error / spacing, theta, output_size=n, filter_name=FBP_FILTER, circle=True)
    streaks = error_mu / MU_WATER_PER_MM * 1000.0
    return streaks if n == canvas.size else resize(streaks, (canvas.size, canvas.size), order=1)


def add_metal(canvas: Canvas, rng: np.random.Generator, marks: Landmarks,
              params: MetalParams) -> tuple[np.ndarray, np.ndarray, dict]:
    """Paint implants. Returns the streak image (HU, added after texture), the pixels holding any
    metal (partial-volume ones included: titanium saturates even a half-filled pixel) and a description."""
    implant = params.implant or str(rng.choice(IMPLANTS, p=[0.6, 0.4]))
    place = _pedicle_screws if implant == "screws" else _surgical_clips
    sdf, pieces = place(canvas, rng, marks)
    canvas.paint(sdf, Tissue.METAL, hu=TITANIUM_HU)
    fraction = np.clip(0.5 - sdf / canvas.spacing, 0.0, 1.0)
    artifact = metal_streaks(canvas, fraction, rng)
    description = {"implant": implant, "pieces": pieces, "material": "titanium", "true_hu": TITANIUM_HU,
                   "artifact_threshold_hu": params.artifact_threshold_hu}
    return artifact, fraction > 0, description


def metal_ood_mask(image: np.ndarray, reference: np.ndarray, metal: np.ndarray, body: np.ndarray,
                   threshold_hu: float) -> tuple[np.ndarray, dict]:
    """Metal pixels plus body pixels that the implant moved more than ``threshold_hu`` away from
    ``reference``, the same patient rendered without it (streaks, blooming, partial volume)."""
    changed = body & (np.abs(image - reference) > threshold_hu)
    outside = body & ~metal
    stats = {
        "metal_px": int(metal.sum()),
        "artifact_px": int((changed & ~metal).sum()),
        "max_abs_artifact_hu": float(np.abs(image - reference)[outside].max(initial=0.0)),
    }
    return metal | changed, stats


# ---------------------------------------------------------------- whole-image shifts


SHIFT_ANATOMIES = ("thorax", "enhanced")


@dataclass(frozen=True)
class ShiftParams:
    """anatomy: "thorax" (a chest slice at the level of the heart) or "enhanced" (the same abdomen in
    the portal-venous phase). Either way the whole body is out of distribution."""

    anatomy: str = "thorax"

    def __post_init__(self) -> None:
        if self.anatomy not in SHIFT_ANATOMIES:
            raise KlviewerInputError(None, f"anatomy must be one of {SHIFT_ANATOMIES}, got {self.anatomy!r}")


@dataclass
class ThoraxLayout:
    """The main draws that fix one chest, recorded in the phantom's meta."""

    rotation_deg: float
    offset_mm: tuple[float, float]
    torso: Torso
    scale: float
    vertebra_center_mm: tuple[float, float]


def sample_thorax_layout(rng: np.random.Generator) -> ThoraxLayout:
    torso = sample_torso(rng, width=(148.0, 178.0), depth_ratio=(0.62, 0.74), fat_scale=0.6)
    torso.wall_posterior_extra_mm = rng.uniform(12, 20)
    scale = rng.uniform(0.9, 1.1)
    skin_back = float(torso.skin_radius(np.array(math.pi / 2)))
    return ThoraxLayout(
        rotation_deg=rng.uniform(-4, 4),
        offset_mm=(rng.uniform(-10, 10), rng.uniform(-10, 10)),
        torso=torso,
        scale=scale,
        vertebra_center_mm=(rng.uniform(-3, 3), skin_back - torso.fat_posterior_mm - 58 * scale),
    )


def _paint_lungs(canvas: Canvas, lay: ThoraxLayout) -> np.ndarray:
    cavity = cavity_sdf(canvas, lay.torso)
    front, back = lay.torso.extent(-90), lay.torso.extent(90)
    # Supine lungs are denser at the back, where gravity compresses them.
    dependent = np.clip((canvas.v + front) / (front + back), 0.0, 1.0)
    canvas.paint(cavity, Tissue.LUNG, hu=canvas.hu_table[Tissue.LUNG] + 60.0 * dependent)
    return cavity


def _paint_chest_wall_bones(canvas: Canvas, rng: np.random.Generator, lay: ThoraxLayout) -> None:
    torso = lay.torso
    theta = -60.0 + rng.uniform(-8, 8)
    while theta < 240.0:
        near_spine, near_sternum = abs(theta - 90.0) < 28, abs(theta - 270.0) < 22 or abs(theta + 90.0) < 22
        if not (near_spine or near_sternum):
            paint_rib(canvas, rng, torso.wall_point(theta, 0.75), theta, rng.uniform(7, 12))
        theta += rng.uniform(18, 26)
    paint_bone(canvas, Blob(torso.wall_point(-90.0, 0.55), rng.uniform(11, 15), 6.0).sdf(canvas.u, canvas.v), 1.5)
    for side in (-1, 1):  # scapulae, behind the ribs
        start = torso.wall_point(90 - side * rng.uniform(22, 30), 0.2)
        end = torso.wall_point(90 - side * rng.uniform(52, 62), 0.25)
        canvas.paint(capsule_sdf(canvas.u, canvas.v, start, end, 1.8), Tissue.CORTICAL_BONE)


def _paint_mediastinum(canvas: Canvas, rng: np.random.Generator, lay: ThoraxLayout, cavity: np.ndarray) -> None:
    s = lay.scale
    front = lay.torso.extent(-90)
    u0, v0 = lay.vertebra_center_mm
    column = Blob((u0 + 3, (v0 - front) / 2), rng.uniform(28, 36) * s, (v0 + front) / 2 + 4, rng.uniform(-5, 5))
    canvas.paint_blob(column, Tissue.FAT)
    heart = Blob((u0 + rng.uniform(18, 32) * s, -0.3 * front + rng.uniform(-8, 8)), rng.uniform(46, 56) * s,
                 rng.uniform(36, 43) * s, rng.uniform(-45, -25), harmonics=random_harmonics(rng, 0.03))
    heart_sdf = np.maximum(heart.sdf(canvas.u, canvas.v), cavity + 3.0)
    canvas.paint(heart_sdf - rng.uniform(2, 5), Tissue.FAT)  # pericardial fat
    canvas.paint(heart_sdf, Tissue.HEART)


def _paint_posterior_mediastinum(canvas: Canvas, rng: np.random.Generator, lay: ThoraxLayout) -> None:
    s = lay.scale
    spine = sample_spine(rng, lay.vertebra_center_mm, 0.85 * s, spinous_mm=30.0)
    u0, v0 = spine.body.center
    fascia = radial_sdf(canvas.u, canvas.v, (0.0, 0.0), 0.0, lay.torso.fascia_radius)
    for side in (-1, 1):
        erector = Blob((u0 + side * 27 * s, v0 + 36 * s), 22 * s, 20 * s, side * rng.uniform(0, 15))
        canvas.paint(np.maximum(erector.sdf(canvas.u, canvas.v), fascia), Tissue.MUSCLE)
    paint_spine(canvas, spine)
    aorta_r = rng.uniform(10, 13)
    aorta = (u0 + spine.body.a + aorta_r - 6, v0 - rng.uniform(4, 10))
    canvas.paint(circle_sdf(canvas.u, canvas.v, aorta, aorta_r), Tissue.BLOOD)
    esophagus = (u0 + rng.uniform(-2, 6), spine.front_v - rng.uniform(7, 10))
    canvas.paint(circle_sdf(canvas.u, canvas.v, esophagus, rng.uniform(5, 7)), Tissue.MUSCLE)
    if rng.random() < 0.5:
        canvas.paint(circle_sdf(canvas.u, canvas.v, esophagus, rng.uniform(1.5, 3)), Tissue.GAS)
    canvas.paint(circle_sdf(canvas.u, canvas.v, (u0 - 11, spine.front_v - 4), 3.5), Tissue.BLOOD)  # azygos


def _paint_lung_vessels(canvas: Canvas, rng: np.random.Generator, lay: ThoraxLayout) -> None:
    u0, v0 = lay.vertebra_center_mm
    mid_v = (v0 - lay.torso.extent(-90)) / 2 + 10
    for side, hilum_u in ((-1, u0 - 38), (1, u0 + 48)):
        hilum = (hilum_u, mid_v)
        for _ in range(rng.integers(5, 9)):
            heading = rng.uniform(-80, 80) if side > 0 else rng.uniform(100, 260)
            tree = vessel_tree_sdf(canvas, rng, hilum, heading, rng.uniform(15, 35), rng.uniform(2.0, 3.5), 3)
            canvas.paint(tree, Tissue.BLOOD, within=(Tissue.LUNG,))
        for _ in range(2):  # lobar bronchi: a soft-tissue ring around air
            c = (hilum[0] + side * rng.uniform(5, 18), hilum[1] + rng.uniform(-15, 15))
            canvas.paint(circle_sdf(canvas.u, canvas.v, c, rng.uniform(4.5, 6)), Tissue.MUSCLE, within=(Tissue.LUNG,))
            canvas.paint(circle_sdf(canvas.u, canvas.v, c, rng.uniform(2.5, 3.5)), Tissue.GAS, within=(Tissue.MUSCLE,))
    lung = np.flatnonzero(canvas.labels == Tissue.LUNG)
    for k in rng.choice(lung, size=min(lung.size, int(rng.integers(25, 50))), replace=False):
        center = (float(canvas.u.flat[k]), float(canvas.v.flat[k]))
        canvas.paint(circle_sdf(canvas.u, canvas.v, center, rng.uniform(1.0, 2.5)), Tissue.BLOOD, within=(Tissue.LUNG,))


def build_thorax(canvas_factory: CanvasFactory, rng: np.random.Generator) -> tuple[Canvas, dict]:
    """Paint an axial chest slice through the heart: the anatomy shift."""
    lay = sample_thorax_layout(rng)
    canvas = canvas_factory(lay.rotation_deg, lay.offset_mm)
    paint_torso(canvas, lay.torso)
    cavity = _paint_lungs(canvas, lay)
    _paint_chest_wall_bones(canvas, rng, lay)
    _paint_mediastinum(canvas, rng, lay, cavity)
    _paint_posterior_mediastinum(canvas, rng, lay)
    _paint_lung_vessels(canvas, rng, lay)
    return canvas, {"region": "thorax", "layout": asdict(lay)}
