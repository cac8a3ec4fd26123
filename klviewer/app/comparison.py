"""The before/after comparison as plain data: images, the difference, paired overlays, the numbers.

No Qt here. It reads a `klviewer.evaluation.compare.Comparison` (cases with a `before` and an
`after` SliceResult of the same measurement, and per-case metrics) and says what the
comparison view draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from klviewer.app.display import MapSettings, OverlayFrame, WindowLevel, overlay_frame, with_result_z
from klviewer.errors import KlviewerError
from klviewer.inference.verdict_text import format_nats

SIDES = ("before", "after")

COMPARED_IMAGES: dict[str, str] = {"mean": "Reconstruction (posterior mean)", "std": "Posterior std"}
"""What both panes can show; FBP and the original do not depend on the prior, so they are left out."""

DIFFERENCE_FLOOR_HU = 1.0
"""Smallest half-width of the difference window, so two identical reconstructions show flat grey."""


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int


METRICS: tuple[Metric, ...] = (
    Metric("dc_residual", "DC residual", "", False, 3),
    Metric("score", "KLIP score", "nats", False, 3),
    Metric("total_kl", "Total KL", "nats", False, 3),
    Metric("psnr", "PSNR", "dB", True, 2),
    Metric("ssim", "SSIM", "", True, 3),
)


def case_image(result: Any, kind: str) -> np.ndarray:
    images = {"mean": result.recon_hu, "std": result.posterior_std_hu}
    return np.asarray(images[kind], dtype=np.float32)


def difference_image(case: Any, kind: str = "mean") -> np.ndarray:
    """after − before in HU, pixel by pixel (both are on the prior's grid)."""
    before, after = case_image(case.before, kind), case_image(case.after, kind)
    if before.shape != after.shape:
        raise KlviewerError(f"case {case.case} slice {case.index}: before {before.shape} and after {after.shape} "
                            "reconstructions are on different grids")
    return after - before


def difference_window(diff: np.ndarray) -> WindowLevel:
    """A window centred on 0 HU that spans the 99.5th percentile of |difference| either way."""
    finite = np.abs(diff[np.isfinite(diff)])
    half = float(np.percentile(finite, 99.5)) if finite.size else 0.0
    half = max(half, DIFFERENCE_FLOOR_HU)
    return WindowLevel(2.0 * half, 0.0)


def paired_overlays(case: Any, settings: MapSettings) -> tuple[OverlayFrame, OverlayFrame]:
    """Both sides' KL maps cut with the same settings and drawn on one colour scale.

    A shared scale is what makes the two overlays comparable: the side with less KL looks
    darker instead of being stretched to its own maximum.
    """
    frames = [with_result_z(overlay_frame(side.energy, settings, side.flag_threshold), side)
              for side in (case.before, case.after)]
    upper = max(frame.levels[1] for frame in frames)
    shared = [replace(frame, levels=(0.0, upper), guidance=side.settings.guidance)
              for frame, side in zip(frames, (case.before, case.after))]
    return shared[0], shared[1]


def metric_value(case: Any, side: str, key: str) -> float | None:
    value = case.metrics.get(side, {}).get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def improved(metric: Metric, before: float | None, after: float | None) -> bool | None:
    """True when after is better than before, False when worse, None when equal or unknown."""
    if before is None or after is None or before == after:
        return None
    return (after > before) == metric.higher_is_better


def format_value(metric: Metric, value: float | None) -> str:
    if value is None:
        return "—"
    if metric.unit == "nats":
        return format_nats(value)
    return f"{value:.{metric.digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def format_pair(metric: Metric, before: float | None, after: float | None) -> str:
    return f"{format_value(metric, before)} → {format_value(metric, after)}"


def mean_metric(cases: list[Any], side: str, key: str) -> float | None:
    values = [v for v in (metric_value(c, side, key) for c in cases) if v is not None]
    return float(np.mean(values)) if values else None


def summary_text(comparison: Any) -> str:
    """One line for the top of the view: the means over cases and the shift KL before and after."""
    cases = list(comparison.cases)
    parts = [f"{len(cases)} case(s)"]
    for key in ("psnr", "score"):
        metric = next(m for m in METRICS if m.key == key)
        b, a = mean_metric(cases, "before", key), mean_metric(cases, "after", key)
        if b is not None or a is not None:
            unit = f" {metric.unit}" if metric.unit else ""
            parts.append(f"mean {metric.label} {format_pair(metric, b, a)}{unit}")
    before, after = comparison.shift_before, comparison.shift_after
    if before is not None and after is not None:
        parts.append(f"measurement-domain KL {format_nats(before.total)} → {format_nats(after.total)} nats")
    return " · ".join(parts)


@dataclass
class ComparisonModel:
    """Which case is shown, and what each pane draws for it."""

    comparison: Any
    index: int = 0
    kind: str = "mean"

    def __post_init__(self) -> None:
        if not self.comparison.cases:
            raise KlviewerError("the comparison has no cases: nothing was analysed")

    def __len__(self) -> int:
        return len(self.comparison.cases)

    @property
    def case(self) -> Any:
        return self.comparison.cases[self.index]

    def set_index(self, index: int) -> bool:
        """Show case `index` (clamped); True when it changed."""
        index = min(max(index, 0), len(self) - 1)
        changed = index != self.index
        self.index = index
        return changed

    def image(self, side: str) -> np.ndarray:
        return case_image(getattr(self.case, side), self.kind)

    def difference(self) -> np.ndarray:
        return difference_image(self.case, self.kind)

    def overlays(self, settings: MapSettings) -> tuple[OverlayFrame, OverlayFrame]:
        return paired_overlays(self.case, settings)

    def title(self) -> str:
        case = self.case
        return f"{case.case} · slice {case.index} (case {self.index + 1} / {len(self)})"
