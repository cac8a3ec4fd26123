"""KL z-scores: how unusual a patch's KL is for healthy anatomy with the same structure in it.

A healthy slice does not carry its KL evenly. Bowel gas and the edges of vessels and organs
carry tens of times the KL of a liver lesion, because the prior cannot know where they lie
until the measurement says so; the largest patch KL of a healthy slice is therefore as large
as that of a slice with a lesion. A patch's KL says "out of distribution" only against healthy
patches that hold the same kind of structure.

The reference is fitted on healthy slices analysed with the same prior and settings. Its one
covariate is a patch's edge energy in the reconstruction (the sum of squared HU gradients),
binned at healthy quantiles; per bin it keeps the quantiles of healthy log patch KL at fixed
normal scores. A patch's z-score is the normal score of its log KL among its bin's healthy
patches: the healthy quantile function mapped onto a standard normal's, extended linearly past
the outermost quantiles. The bins of strong edges (bowel gas, organ rims) have long upper tails
that a mean and spread understate; standardising by them made the largest window of a healthy
slice as unusual as a lesion's (docs/screening.md). References written before keep a mean and
spread per bin, and are scored by them. Only patches touching the body count, because air
carries neither KL nor edges and would otherwise fill the smoothest bins.

Small patches are then pooled over windows of about POOL_PX pixels, the size of the smallest
lesions we look for: each window's z-score is Stouffer's combination of the z-scores of the
patches in it. A lesion raises the KL of every patch it covers, while a healthy outlier is
mostly one patch, so pooling lifts lesions above healthy outliers; standardising before
pooling keeps one bright edge from dominating a window as it would a larger patch's KL sum.
A slice's z-score is its largest window's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.special import ndtr

from klviewer.errors import KlviewerInputError
from klviewer.inference.energy import EnergyField, KLMap, patch_sums
from klviewer.io.json_input import Fields

BODY_HU = -500.0
"""Reconstructed pixels above this, with the holes (bowel gas) filled, are the body."""
KL_FLOOR = 1e-3
"""Nats added before the log, so that a patch without KL has a finite z-score."""
MIN_PATCHES_PER_BIN = 20
MAX_BINS = 10_000
NORMAL_SCORES = np.linspace(-3.5, 3.5, 71)
"""The standard normal scores at which a reference keeps each bin's healthy log-KL quantiles."""
TAIL_SCORES = 0.5
"""Past the outermost quantiles, a z-score follows the slope of the last TAIL_SCORES of normal scores."""
POOL_PX = 8
"""Side (pixels) of the windows small patches are pooled over: 12.5 mm at the shipped prior's
1.56 mm pixels, about the smallest lesion. Chosen on the detection benchmark's tuning split."""


def pool_for(patch: int) -> int:
    """Patches per window side, so that windows are about POOL_PX wide (1: no pooling)."""
    return max(1, round(POOL_PX / patch))


@dataclass
class HealthySlice:
    """What the reference needs of one analysed healthy slice."""

    energy: EnergyField
    recon_hu: np.ndarray


def body_mask(recon_hu: np.ndarray) -> np.ndarray:
    return ndimage.binary_fill_holes(recon_hu > BODY_HU)


def patch_statistics(energy: EnergyField, recon_hu: np.ndarray, patch: int,
                     sigma_window: tuple[float, float] | None) -> tuple[KLMap, np.ndarray, np.ndarray]:
    """(KL map, log edge energy per patch, which patches touch the body)."""
    kl = energy.kl_map(patch, sigma_window)
    gy, gx = np.gradient(recon_hu.astype(np.float64))
    edges = patch_sums(gy ** 2 + gx ** 2, patch).values
    inside = patch_sums(body_mask(recon_hu).astype(np.float64), patch).values > 0
    return kl, np.log1p(edges), inside


@dataclass(frozen=True)
class HealthyReference:
    """Mean and spread of healthy log patch KL per edge-energy bin, for one patch size and sigma window."""

    patch: int
    sigma_window: tuple[float, float] | None
    bin_edges: np.ndarray
    """(bins - 1,) inner edges on log(1 + edge energy in HU^2)."""
    mean: np.ndarray
    """(bins,) mean log(KL + KL_FLOOR) of healthy patches in each bin."""
    std: np.ndarray
    n_slices: int
    pool: int = 1
    """Patches per side of the windows the z-scores are pooled over (1: each patch stands alone)."""
    quantiles: np.ndarray | None = None
    """(bins, scores) healthy log(KL + KL_FLOOR) of each bin at `normal_scores`, non-decreasing; None in
    references written before, which standardise by `mean` and `std`."""
    normal_scores: np.ndarray | None = None

    def z_map(self, energy: EnergyField, recon_hu: np.ndarray) -> KLMap:
        """Pooled z-scores, one per window of `pool` x `pool` patches stepping by one patch.
        Windows off the body get -inf, so they never set the slice's score."""
        kl, log_edges, inside = patch_statistics(energy, recon_hu, self.patch, self.sigma_window)
        return self.z_of(kl, np.log(kl.values + KL_FLOOR), log_edges, inside)

    def z_of(self, kl: KLMap, log_kl: np.ndarray, log_edges: np.ndarray, inside: np.ndarray) -> KLMap:
        """Pooled z-scores of per-patch log KL values on the patch grid of `kl` (`patch_statistics`).
        `z_map` scores the chains' mean KL; benchmarks score other statistics of the chains with it."""
        k = np.digitize(log_edges, self.bin_edges, right=True)
        if self.quantiles is None:
            z = (log_kl - self.mean[k]) / self.std[k]
        else:
            z = np.empty(log_kl.shape)
            for j in np.unique(k):
                in_bin = k == j
                z[in_bin] = _normal_scores(log_kl[in_bin], self.quantiles[j], self.normal_scores, self.std[j])
        z = np.where(inside, z, -np.inf)
        pool = min(self.pool, *z.shape)
        if pool == 1:
            return replace(kl, values=z)
        return KLMap(values=_stouffer(z, pool), row_starts=kl.row_starts[:z.shape[0] - pool + 1],
                     col_starts=kl.col_starts[:z.shape[1] - pool + 1], patch=pool * self.patch, stride=self.patch,
                     image_shape=kl.image_shape, sigma_window=kl.sigma_window)

    def to_dict(self) -> dict[str, Any]:
        d = {"patch": self.patch, "pool": self.pool,
             "sigma_window": None if self.sigma_window is None else list(self.sigma_window),
             "bin_edges": self.bin_edges.tolist(), "mean": self.mean.tolist(), "std": self.std.tolist(),
             "n_slices": self.n_slices}
        if self.quantiles is not None:
            d |= {"normal_scores": self.normal_scores.tolist(), "quantiles": self.quantiles.ravel().tolist()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: Any = None) -> HealthyReference:
        """Checked, because it is read from a calibration file anyone may have edited."""
        fields = Fields(d, source, "healthy_reference.", what="calibration field")
        edges, mean, std = (np.asarray(fields.numbers(k, max_items=MAX_BINS), dtype=np.float64)
                            for k in ("bin_edges", "mean", "std"))
        window = fields.get("sigma_window")
        # References written before pooling have no "pool"; their thresholds are for single patches.
        ref = cls(patch=fields.integer("patch", lo=1, hi=4096),
                  sigma_window=None if window is None else tuple(fields.numbers("sigma_window", length=2, positive=True)),
                  bin_edges=edges, mean=mean, std=std, n_slices=fields.integer("n_slices", lo=1),
                  pool=fields.integer("pool", 1, lo=1, hi=1024))
        if (mean.ndim != 1 or mean.size < 1 or std.shape != mean.shape or edges.shape != (mean.size - 1,)
                or not np.isfinite(np.concatenate([edges, mean, std])).all() or (std <= 0).any()
                or (np.diff(edges) < 0).any() or ref.patch < 1 or ref.pool < 1):
            raise KlviewerInputError(source, "healthy reference has inconsistent bins (need finite, sorted edges, "
                                             "one mean and one positive spread per bin)")
        if "quantiles" not in fields and "normal_scores" not in fields:
            return ref
        scores = np.asarray(fields.numbers("normal_scores", max_items=1000), dtype=np.float64)
        quantiles = np.asarray(fields.numbers("quantiles", length=mean.size * scores.size,
                                              max_items=MAX_BINS * 1000), dtype=np.float64).reshape(mean.size, -1)
        if scores.size < 2 or (np.diff(scores) <= 0).any() or (np.diff(quantiles, axis=1) < 0).any():
            raise KlviewerInputError(source, "healthy reference has inconsistent quantiles (need at least two increasing "
                                             "normal scores and, per bin, one non-decreasing quantile for each)")
        return replace(ref, quantiles=quantiles, normal_scores=scores)


def _stouffer(z: np.ndarray, pool: int) -> np.ndarray:
    """Sum of the body patches' z-scores over every pool x pool block, over the square root of
    their number: a standard normal again when the patches are independent healthy ones."""
    body = np.isfinite(z)

    def block_sums(a: np.ndarray) -> np.ndarray:
        return np.lib.stride_tricks.sliding_window_view(a, (pool, pool)).sum(axis=(-2, -1))

    n = block_sums(body.astype(np.float64))
    return np.where(n > 0, block_sums(np.where(body, z, 0.0)) / np.sqrt(np.maximum(n, 1.0)), -np.inf)


def slice_z_score(z_map: KLMap | None) -> float | None:
    """A slice's KL z-score: its most unusual window (None without z-scores, or when none touches the body)."""
    return None if z_map is None or not np.isfinite(z_map.score) else z_map.score


def z_map_fits(z_map: KLMap, kl_map: KLMap) -> bool:
    """Whether `z_map` was computed for the patch size and sigma window `kl_map` is cut with
    (its windows step by the reference's patch)."""
    return (z_map.stride, tuple(z_map.sigma_window)) == (kl_map.patch, tuple(kl_map.sigma_window))


@dataclass(frozen=True)
class ZCalibration:
    """A prior's healthy reference for one set of settings, with the z-score that at most the
    calibrated fraction of healthy slices exceed."""

    reference: HealthyReference
    threshold: float


def fit_reference(slices: Sequence[HealthySlice], patch: int, sigma_window: tuple[float, float] | None,
                  bins: int = 20, pool: int | None = None) -> HealthyReference:
    """Fit on healthy slices. Bins are healthy quantiles, and fewer of them are used when there are
    too few patches for each to hold MIN_PATCHES_PER_BIN, so no bin's spread rests on a handful.
    `pool` defaults to `pool_for(patch)`."""
    log_kl, log_edges = [], []
    for s in slices:
        kl, edges, inside = patch_statistics(s.energy, s.recon_hu, patch, sigma_window)
        log_kl.append(np.log(kl.values[inside] + KL_FLOOR))
        log_edges.append(edges[inside])
    y, x = np.concatenate(log_kl) if log_kl else np.empty(0), np.concatenate(log_edges) if log_edges else np.empty(0)
    return reference_of_patches(y, x, patch, sigma_window, len(slices), bins, pool)


def reference_of_patches(y: np.ndarray, x: np.ndarray, patch: int, sigma_window: tuple[float, float] | None,
                         n_slices: int, bins: int = 20, pool: int | None = None) -> HealthyReference:
    """`fit_reference` on healthy body patches' log KL `y` and log edge energy `x`, however the KL was taken."""
    bins = min(bins, x.size // MIN_PATCHES_PER_BIN)
    if bins < 1:
        raise KlviewerInputError(None, f"a healthy reference needs at least {MIN_PATCHES_PER_BIN} body patches, "
                                       f"got {x.size}")
    inner = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1]))
    # Closed on the right, so that many patches tied at one edge value (flat tissue) make a bin
    # of their own instead of sharing one with the patches just above them.
    k = np.digitize(x, inner, right=True)
    counts = np.bincount(k, minlength=inner.size + 1)
    mean = np.full(inner.size + 1, np.nan)
    std = np.full(inner.size + 1, np.nan)
    quantiles = np.full((inner.size + 1, NORMAL_SCORES.size), np.nan)
    levels = ndtr(NORMAL_SCORES)
    for j in np.flatnonzero(counts > 1):
        mean[j], std[j] = y[k == j].mean(), y[k == j].std()
        quantiles[j] = np.quantile(y[k == j], levels)
    # A bin that ties left (nearly) empty borrows its nearest neighbour's statistics.
    mean, std, quantiles = _fill_empty(mean), _fill_empty(std), _fill_empty(quantiles)
    return HealthyReference(patch, sigma_window, inner, mean, np.maximum(std, 1e-6), n_slices,
                            pool_for(patch) if pool is None else pool, quantiles, NORMAL_SCORES.copy())


def _fill_empty(values: np.ndarray) -> np.ndarray:
    """Rows (bins) holding NaN take their nearest good row."""
    good = np.flatnonzero(np.isfinite(values.reshape(len(values), -1)).all(axis=1))
    nearest = good[np.abs(np.arange(len(values))[:, None] - good[None, :]).argmin(axis=1)]
    return values[nearest]


def _normal_scores(values: np.ndarray, quantiles: np.ndarray, scores: np.ndarray, std: float) -> np.ndarray:
    """The normal score of each value among one bin's healthy quantiles (at `scores`): interpolated between
    them, and past either end along the outermost TAIL_SCORES' slope, so a value far above every healthy
    patch keeps rising instead of stopping at the last score. That slope is at least the bin's spread
    `std`: the outermost quantiles of a bin with few patches rest on a handful, and a steep guess there
    would give healthy patches just past them huge scores; past the quantiles a score never rises
    faster than standardising by the spread would make it."""
    z = np.interp(values, quantiles, scores)
    tail = max(1, int(np.searchsorted(scores, scores[0] + TAIL_SCORES + 1e-9)) - 1)
    for end, inner, beyond in ((-1, -1 - tail, values > quantiles[-1]), (0, tail, values < quantiles[0])):
        slope = max(abs(quantiles[end] - quantiles[inner]) / abs(scores[end] - scores[inner]), std)
        z[beyond] = scores[end] + (values[beyond] - quantiles[end]) / slope
    return z


def cross_fitted_scores(slices: Sequence[HealthySlice], patch: int, sigma_window: tuple[float, float] | None,
                        folds: int = 2) -> np.ndarray:
    """Each healthy slice's z-score under a reference fitted without it.

    Scored in-sample, the slices that set the bins would look more typical than new healthy
    slices do, and a threshold taken from them would flag more than its false-positive rate.
    """
    if len(slices) < folds:
        raise KlviewerInputError(None, f"cross-fitting needs at least {folds} healthy slices, got {len(slices)}")
    scores = np.empty(len(slices))
    fold_of = np.arange(len(slices)) % folds
    for f in range(folds):
        ref = fit_reference([s for s, g in zip(slices, fold_of) if g != f], patch, sigma_window)
        for i in np.flatnonzero(fold_of == f):
            scores[i] = ref.z_map(slices[i].energy, slices[i].recon_hu).score
    return scores
