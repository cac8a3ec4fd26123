"""What the viewer shows, as plain data: window/level, base images, and the KL overlay.

No Qt here: the viewer widgets render these values, and tests check them without a window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from klviewer.inference.energy import EnergyField, KLMap
from klviewer.inference.healthy_reference import ZCalibration, z_map_fits
from klviewer.inference.result import SliceResult
from klviewer.inference.scoring import MISMATCH, SliceScore, Verdict, score_slice
from klviewer.inference.verdict_text import VerdictText, describe, nats_are_calibrated, nats_meaning
from klviewer.io.study import Patient, Series, Study
from klviewer.overlay_rules import DISPLAY_FRACTION, OVERLAY_OPACITY, display_cut, overlay_levels
from klviewer.overlay_rules import colorbar_ticks as overlay_ticks
from klviewer.physics.grid import AIR_HU, GridTransform


def patient_label(patient: Patient) -> str:
    name = patient.name.replace("^", " ").strip()
    return f"{name} ({patient.patient_id})" if name and name != patient.patient_id else patient.patient_id or "Unknown"


def study_label(study: Study) -> str:
    date = study.date
    if len(date) == 8 and date.isdigit():
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    parts = [p for p in (study.description, date) if p]
    return " · ".join(parts) or study.uid


def series_label(series: Series) -> str:
    number = f"#{series.number} " if series.number is not None else ""
    return f"{number}{series.description or series.uid}"


@dataclass(frozen=True)
class WindowLevel:
    """A display window in HU: `width` wide, centred on `level`."""

    width: float
    level: float

    MIN_WIDTH = 1.0

    @property
    def levels(self) -> tuple[float, float]:
        return self.level - self.width / 2, self.level + self.width / 2

    def dragged(self, dx: float, dy: float) -> WindowLevel:
        """Left-drag by (dx, dy) screen pixels: right widens, down raises the level (as in OHIF).

        The step grows with the width so a bone window and a brain window both take a few
        hundred pixels of drag to change noticeably.
        """
        step = max(self.width, 20.0) / 250.0
        return WindowLevel(max(self.MIN_WIDTH, self.width + dx * step), self.level + dy * step)

    def label(self) -> str:
        return f"W {self.width:.0f}  L {self.level:.0f}"


@dataclass(frozen=True)
class Preset:
    name: str
    window: WindowLevel


PRESETS: tuple[Preset, ...] = (
    Preset("Soft tissue", WindowLevel(400, 40)),
    Preset("Lung", WindowLevel(1500, -600)),
    Preset("Liver", WindowLevel(150, 90)),
    Preset("Bone", WindowLevel(2500, 480)),
    Preset("Brain", WindowLevel(80, 40)),
)
"""Keys 1-5, in this order (OHIF's defaults)."""


def initial_window(series: Series | None) -> WindowLevel:
    """The series' own DICOM window when it has one, else soft tissue."""
    if series is not None and series.window is not None:
        center, width = series.window
        if math.isfinite(center) and math.isfinite(width) and width > 0:
            return WindowLevel(float(width), float(center))
    return PRESETS[0].window


BASE_IMAGES: dict[str, str] = {
    "original": "Original",
    "fbp": "FBP",
    "mean": "Posterior mean",
    "std": "Posterior std",
}
"""Base image keys and their labels; all but `original` exist only once a slice is analysed."""


def base_image(kind: str, series: Series, index: int, result: SliceResult | None) -> np.ndarray | None:
    """The (H, W) HU image to show on the source grid, or None when this kind is not available for the slice.

    The original is the native slice; the analysis' images, made on the prior's grid, are mapped
    back onto the source grid (see `frame_on_source`, which does the same for the overlay).
    """
    native = series.slices[index].hu if series.slices and 0 <= index < len(series.slices) else None
    if kind == "original":
        return native
    if result is None:
        return None
    if kind == "std" and result.settings.samples < 2:
        return None  # one sample has no spread: an all-zero image would read as black tissue
    image = {"fbp": result.fbp_hu, "mean": result.recon_hu, "std": result.posterior_std_hu}.get(kind)
    if image is None:
        return None
    grid = result.grid_for(source_shape(series, index))
    if grid.is_identity():
        return image
    return grid.resample_to_source(image, fill=0.0 if kind == "std" else AIR_HU)


def source_shape(series: Series, index: int) -> tuple[int, int]:
    """The pixel grid results are shown on: the slice's own, or a sinogram's reconstruction grid."""
    if series.slices and 0 <= index < len(series.slices):
        return series.slices[index].shape
    if series.sinogram is not None:
        return tuple(series.sinogram.grid_size)  # type: ignore[return-value]
    raise ValueError(f"series {series.uid} has no slice {index}")


def frame_on_source(frame: OverlayFrame, grid: GridTransform) -> OverlayFrame:
    """The overlay on the source grid: each source pixel shows its nearest prior-grid patch value (no value is
    invented between patches), and outlines are the same patches' edges in source pixels."""
    if grid.is_identity():
        return frame
    return replace(frame, pixels=grid.resample_to_source(frame.pixels, nearest=True),
                   raw_pixels=grid.resample_to_source(frame.raw_pixels, nearest=True),
                   boxes=[grid.box_to_source(box) for box in frame.boxes])


def available_bases(series: Series, index: int, result: SliceResult | None) -> list[str]:
    return [k for k in BASE_IMAGES if base_image(k, series, index, result) is not None]


def unavailable_reason(kind: str, result: SliceResult | None) -> str:
    """Why a base image cannot be shown for a slice (for tooltips and the side-by-side pane)."""
    if result is None:
        return "run the analysis to see it"
    if kind == "std" and result.settings.samples < 2:
        return f"needs 2 or more posterior samples (this run had {result.settings.samples})"
    return "not available for this slice"


def matching_preset(window: WindowLevel) -> int | None:
    """The index in PRESETS of the preset `window` is, or None for a custom window."""
    return next((n for n, p in enumerate(PRESETS) if p.window == window), None)


@dataclass(frozen=True)
class MapSettings:
    """The KL-map sliders: none of them needs a new sampling run."""

    patch: int = 8
    sigma_window: tuple[float, float] = (0.01, 0.5)
    threshold_fraction: float = DISPLAY_FRACTION
    """Patches below this fraction of the slice's largest patch are transparent."""
    opacity: float = OVERLAY_OPACITY
    visible: bool = True
    show_z: bool = False
    """Colour the KL z-scores instead of KL, where the prior has a healthy reference for the map settings."""

    def clamped(self, image_shape: tuple[int, int]) -> MapSettings:
        """Patch no larger than the image, and a window with low <= high."""
        lo, hi = sorted(self.sigma_window)
        return replace(self, patch=int(min(max(self.patch, 1), max(image_shape))), sigma_window=(lo, hi))


def nearest_calibrated(settings: MapSettings, maps: list[tuple[int, tuple[float, float]]]) -> MapSettings | None:
    """`settings` moved to the calibrated (patch, sigma window) nearest to them: the same patch where one
    is calibrated, then the window closest on a log scale (None without calibrated settings)."""
    if not maps:
        return None

    def distance(m: tuple[int, tuple[float, float]]) -> tuple[bool, float]:
        patch, (lo, hi) = m
        lo_now, hi_now = settings.sigma_window
        return patch != settings.patch, abs(math.log(lo / lo_now)) + abs(math.log(hi / hi_now))

    patch, window = min(maps, key=distance)
    return replace(settings, patch=patch, sigma_window=window)


@dataclass
class OverlayFrame:
    """One rendering of the KL overlay for a slice, and the verdict it shows."""

    scored: SliceScore
    pixels: np.ndarray
    """(H, W) float32 KL per covering patch, NaN where below the display threshold."""
    raw_pixels: np.ndarray
    """(H, W) float32, unmasked: what the probe reports."""
    levels: tuple[float, float]
    display_threshold: float
    boxes: list[tuple[float, float, float, float]]
    """(r0, r1, c0, c1) edges of the outlined patches, in the pixels of `pixels`: exactly those the flag rule flags."""
    shows_z: bool = False
    """`pixels`, `raw_pixels`, `levels`, `peak` and `display_threshold` are KL z-scores, not nats."""
    verdict: Verdict | None = None
    """The slice's verdict with its prior fit (which the frame's scores alone cannot tell)."""
    peak: float = 0.0
    """The slice's largest value of the shown quantity (marked on the colour bar)."""
    threshold_mark: float | None = None
    """The flag rule's threshold when the shown quantity is the one the rule compares (marked on the colour bar)."""
    guidance: str | None = None
    """The run's guidance, which decides what its nats are (`nats_meaning`)."""

    @property
    def kl_map(self) -> KLMap:
        return self.scored.kl_map

    @property
    def flag_threshold(self) -> float | None:
        return self.scored.nats_threshold

    @property
    def z_map(self) -> KLMap | None:
        """KL z-scores against the prior's healthy reference, when it has one for these map settings."""
        return self.scored.z_map

    @property
    def z_threshold(self) -> float | None:
        return self.scored.z_threshold

    @property
    def score(self) -> float:
        return self.scored.score

    @property
    def z_score(self) -> float | None:
        return self.scored.z_score

    @property
    def flagged(self) -> bool:
        return self.scored.flagged

    @property
    def verdict_text(self) -> VerdictText:
        """The verdict in the words every view uses: the prior-fit mismatch when `verdict` says so, else the flag rule's."""
        s = self.scored
        mismatch = self.verdict.rule if self.verdict is not None and self.verdict.status == MISMATCH else None
        return describe(s.flagged, s.rule, s.score, s.z_score, s.nats_threshold, s.z_threshold, s.forced_nats is not None,
                        mismatch)

    @property
    def fixed_scale(self) -> bool:
        """Whether the colours follow a calibrated range (else they run to the slice's own maximum)."""
        threshold = self.z_threshold if self.shows_z else self.flag_threshold
        return threshold is not None

    def scale_label(self) -> str:
        """The colour bar's title: the quantity, its unit, and whether the range is calibrated."""
        if self.shows_z:
            quantity = "KL z-score vs healthy"
        else:
            quantity = "KL per patch (nats)" if nats_are_calibrated(self.guidance) else "KL energy per patch (relative nats)"
        return quantity if self.fixed_scale else f"{quantity}, relative to this slice"

    def scale_tooltip(self) -> str:
        """What the colours measure, for the colour bar's tooltip."""
        meaning = nats_meaning(self.guidance)
        if self.shows_z:
            return f"KL z-score of each window against healthy patches with the same edge content. {meaning}"
        return meaning


def flagged_patches(kl_map: KLMap, threshold: float) -> list[tuple[int, int, int, int]]:
    """Boxes of the patches (or z windows) of `kl_map` above `threshold`."""
    rows, cols = np.nonzero(kl_map.values > threshold)
    return [kl_map.patch_box(int(r), int(c)) for r, c in zip(rows, cols)]


def rule_boxes(scored: SliceScore) -> list[tuple[int, int, int, int]]:
    """What the flag rule flags, and nothing else: z windows above the z threshold, or patches above
    the nats threshold; no outline where no rule applies."""
    if scored.rule == "z":
        return flagged_patches(scored.z_map, scored.z_threshold)
    if scored.rule == "nats":
        return flagged_patches(scored.kl_map, scored.nats_threshold)
    return []


def overlay_frame(energy: EnergyField, settings: MapSettings, flag_threshold: float | None,
                  z: tuple[ZCalibration, np.ndarray] | None = None) -> OverlayFrame:
    """Score the energy field under the slider settings (no sampling) and render it; `z` is the healthy
    reference for these settings with the slice's reconstruction in HU."""
    m = settings.clamped(energy.image_shape)
    calibration, recon_hu = z if z is not None else (None, None)
    return frame_of(score_slice(energy, recon_hu, m.patch, m.sigma_window, nats_threshold=flag_threshold,
                                z_calibration=calibration), m)


def frame_of(scored: SliceScore, settings: MapSettings) -> OverlayFrame:
    """Render a scored slice, coloured by `klviewer.overlay_rules` and outlined where the flag rule flags."""
    kl_map = scored.kl_map
    raw = kl_map.to_pixels().astype(np.float32)
    peak = float(kl_map.values.max()) if kl_map.values.size else 0.0
    cut = display_cut(peak, settings.threshold_fraction)
    pixels = raw.copy()
    pixels[(raw < cut) | (raw <= 0)] = np.nan
    threshold = scored.nats_threshold
    frame = OverlayFrame(scored=scored, pixels=pixels, raw_pixels=raw, levels=overlay_levels(peak, threshold),
                         display_threshold=cut, boxes=rule_boxes(scored), peak=peak,
                         threshold_mark=threshold if scored.rule == "nats" else None)
    if scored.z_map is not None and settings.show_z:
        _show_z(frame, settings.threshold_fraction)
    return frame


def with_result_z(frame: OverlayFrame, result: SliceResult) -> OverlayFrame:
    """`frame` flagged and outlined by the result's own KL z-scores, while the frame is cut with
    the patch and window they were computed for (a comparison side keeps no reference to redo them)."""
    z = result.z_map
    if z is None or result.z_threshold is None or not z_map_fits(z, frame.kl_map):
        return frame
    return replace(frame, scored=replace(frame.scored, z_map=z, z_threshold=result.z_threshold),
                   boxes=flagged_patches(z, result.z_threshold), threshold_mark=None)


def _show_z(frame: OverlayFrame, fraction: float) -> None:
    """Colour the z-scores: off the body and at or below zero (as usual as healthy, or less) nothing shows."""
    raw = frame.z_map.to_pixels().astype(np.float32)
    raw[~np.isfinite(raw)] = np.nan
    peak = float(np.nanmax(raw)) if np.isfinite(raw).any() else 0.0
    cut = display_cut(peak, fraction)
    pixels = raw.copy()
    with np.errstate(invalid="ignore"):
        pixels[~(raw >= cut) | ~(raw > 0)] = np.nan
    frame.raw_pixels, frame.pixels, frame.display_threshold = raw, pixels, cut
    frame.levels = overlay_levels(peak, frame.z_threshold)
    frame.peak = peak
    frame.threshold_mark = frame.z_threshold if frame.scored.rule == "z" else None
    frame.shows_z = True


@dataclass(frozen=True)
class LogScale:
    """Integer slider positions 0..steps mapped log-uniformly onto [low, high]."""

    low: float
    high: float
    steps: int = 1000

    def value(self, position: int) -> float:
        t = min(max(position, 0), self.steps) / self.steps
        return float(math.exp(math.log(self.low) + t * (math.log(self.high) - math.log(self.low))))

    def position(self, value: float) -> int:
        v = min(max(value, self.low), self.high)
        t = (math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return int(round(t * self.steps))


def summary_html(result: SliceResult) -> str:
    """The Analysis panel's line about the last analysed slice: its score and verdict at the run's settings."""
    notes = "".join(f"<br>• {n}" for n in result.notes)
    verdict = result_verdict(result)
    return (f"Last slice: {verdict.status}, {verdict.value} at the run's settings ({verdict.rule_text}), "
            f"{result.seconds:.1f} s.{notes}")


def result_verdict(result: SliceResult) -> VerdictText:
    """The verdict a result was stored with, at the run's own map settings, prior fit first."""
    decided = result.verdict()
    return describe(result.flagged, result.flag_rule, result.score, result.z_score, result.flag_threshold,
                    result.z_threshold, result.settings.flag_threshold is not None,
                    decided.rule if decided.status == MISMATCH else None)


def round_sig(value: float, digits: int = 3) -> float:
    """Slider values shown and used with `digits` significant digits, so what is shown is what is used."""
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")



def colorbar_ticks(frame: OverlayFrame) -> list[tuple[float, str]]:
    """The colour bar's ticks for `frame` (see klviewer.overlay_rules.colorbar_ticks)."""
    return overlay_ticks(frame.levels, frame.peak, frame.threshold_mark)
