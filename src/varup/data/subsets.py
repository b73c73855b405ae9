"""Class-balanced subsets of a dataset split: the real reference sets every metric, study and classifier reads.
Kept in the data layer so that a study taking real images does not take in the metric code."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _split_rows(data_dir: str | os.PathLike, split: str):
    from varup.data.toy import read_manifest

    rows = read_manifest(data_dir, split)
    if not rows:
        raise ValueError(f"{data_dir}: split {split!r} has no images")
    return rows


def balanced_subset(labels: np.ndarray, n: int | None) -> np.ndarray:
    """Indices of at most ``n`` items, as equal per class as possible, deterministic (first items of each class)."""
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    per = [np.flatnonzero(labels == c) for c in classes]
    out, k = [], 0
    while len(out) < n:
        for idx in per:
            if k < len(idx) and len(out) < n:
                out.append(idx[k])
        k += 1
    return np.sort(np.array(out))


def real_subset(data_dir, split: str, max_images: int | None) -> tuple[list[dict], np.ndarray]:
    """The manifest rows of ``split`` and the indices (into them) of the metrics' real set: the class-balanced
    :func:`balanced_subset` of at most ``max_images``."""
    rows = _split_rows(data_dir, split)
    return rows, balanced_subset(np.array([r["label"] for r in rows]), max_images)


def load_rows(data_dir, rows: list[dict], keep: np.ndarray, resolution: int,
              mid_reso: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, R, R, 3) images and labels of ``rows[keep]`` (resize + centre crop as every reference set)."""
    from varup.data.folder import load_uint8_images

    paths = [Path(data_dir) / rows[i]["path"] for i in keep]
    return load_uint8_images(paths, resolution, mid_reso=mid_reso), np.array([rows[i]["label"] for i in keep])


def real_images(data_dir, split: str, resolution: int, max_images: int | None, mid_reso: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of the metrics' real set (:func:`real_subset`)."""
    rows, keep = real_subset(data_dir, split, max_images)
    return load_rows(data_dir, rows, keep, resolution, mid_reso)
