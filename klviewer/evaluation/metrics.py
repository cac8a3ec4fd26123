"""ROC/AUROC without extra dependencies, and image-quality metrics."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half.

    NaN when only one class is present.
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks handle ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[distinct]
    fp = np.cumsum(~y)[distinct]
    tpr = np.r_[0.0, tp / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fp / max(int((~y).sum()), 1)]
    return fpr, tpr


def psnr_hu(reference_hu: np.ndarray, image_hu: np.ndarray, data_range: float = 2000.0) -> float:
    """PSNR in dB over a fixed HU range (default -1000..1000), so numbers compare across images."""
    lo = -1000.0
    ref = np.clip(reference_hu, lo, lo + data_range)
    img = np.clip(image_hu, lo, lo + data_range)
    return float(peak_signal_noise_ratio(ref, img, data_range=data_range))


def ssim_hu(reference_hu: np.ndarray, image_hu: np.ndarray, data_range: float = 2000.0) -> float:
    lo = -1000.0
    ref = np.clip(reference_hu, lo, lo + data_range)
    img = np.clip(image_hu, lo, lo + data_range)
    return float(structural_similarity(ref, img, data_range=data_range))
