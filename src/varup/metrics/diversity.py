"""Within-class sample diversity: mean pairwise SSIM over pairs of images that share a class label.

SSIM is scikit-image's ``structural_similarity`` with Wang et al. (2004) settings (Gaussian window, sigma 1.5,
population covariance) on uint8 RGB images (``data_range=255``, channels averaged). Images smaller than the
11-pixel Gaussian window fall back to a uniform window of the largest odd size that fits (at least 3).
Lower mean SSIM means more diverse samples; ``ssim_diversity = 1 - mean``.
"""
from __future__ import annotations

import numpy as np

GAUSSIAN_WIN = 11  # skimage's window for sigma=1.5, truncate=3.5


def ssim_settings(height: int, width: int) -> dict:
    """Keyword arguments for ``skimage.metrics.structural_similarity`` valid for ``height x width`` images."""
    side = min(height, width)
    if side >= GAUSSIAN_WIN:
        return {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
    win = side if side % 2 else side - 1
    if win < 3:
        raise ValueError(f"images of {height}x{width} are too small for SSIM (need at least 3x3)")
    return {"gaussian_weights": False, "win_size": win, "use_sample_covariance": False}


def ssim_pair(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 (H, W, 3) images."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=255, **ssim_settings(*a.shape[:2])))


def _sample_pairs(n: int, max_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """All index pairs i < j of ``n`` items, or ``max_pairs`` of them drawn without replacement."""
    i, j = np.triu_indices(n, k=1)
    pairs = np.stack([i, j], axis=1)
    if len(pairs) > max_pairs:
        pairs = pairs[np.sort(rng.choice(len(pairs), size=max_pairs, replace=False))]
    return pairs


def mean_pairwise_ssim(images: np.ndarray, labels: np.ndarray, max_pairs_per_class: int = 100,
                       seed: int = 0) -> dict:
    """Mean SSIM over same-class image pairs.

    ``images``: uint8 (N, H, W, 3); ``labels``: (N,) ints. Per class with at least two images, all pairs are used,
    or ``max_pairs_per_class`` pairs drawn uniformly without replacement (``seed``). Returns
    ``per_class`` {label: mean SSIM}, ``pairs_per_class``, ``mean`` (average of the per-class means, so every class
    weighs the same), ``ssim_diversity`` = 1 - mean, ``pairs`` (total), and the SSIM ``settings`` used.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N,H,W,3), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
    rng = np.random.default_rng(seed)
    per_class, counts = {}, {}
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        if len(idx) < 2:
            continue
        pairs = idx[_sample_pairs(len(idx), max_pairs_per_class, rng)]
        per_class[label.item()] = float(np.mean([ssim_pair(images[a], images[b]) for a, b in pairs]))
        counts[label.item()] = len(pairs)
    if not per_class:
        raise ValueError("no class has two or more images: SSIM diversity is undefined")
    mean = float(np.mean(list(per_class.values())))
    return {"per_class": per_class, "pairs_per_class": counts, "mean": mean, "ssim_diversity": 1.0 - mean,
            "pairs": int(sum(counts.values())), "settings": ssim_settings(*images.shape[1:3])}
