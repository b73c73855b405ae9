"""Inception feature extraction for uint8 image arrays, and an atomic .npz format for the results.

Inception passes are the scarcest resource on CPU (about 6 images/s on 2 cores), so features are extracted once
per image set and saved; FID, KID, precision/recall and PRDC are then all computed from the saved features.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from varup.base.utils import atomic_npz_save, json_default, progress

FEATURE_KEYS = ("pool", "logits_unbiased")
_META_KEY = "meta_json"


def extract_features(images: np.ndarray, extractor, batch_size: int = 50,
                     desc: str = "inception features") -> dict[str, np.ndarray | None]:
    """Run ``extractor`` (a :class:`varup.metrics.inception.InceptionExtractor`) over ``images``, a uint8 array
    (N, H, W, 3) of any H, W (torch-fidelity resizes to 299x299 internally, TF1-bilinear).

    Returns ``{'pool': (N, 2048) float64, 'logits_unbiased': (N, 1008) float64 or None}``, rows in input order.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N,H,W,3), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError("no images to extract features from")
    parts: dict[str, list] = {k: [] for k in FEATURE_KEYS}
    with progress(total=len(images), desc=desc, unit="img") as bar:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
            out = extractor.extract(batch.contiguous())
            for k in FEATURE_KEYS:
                parts[k].append(out.get(k))
            bar.update(len(batch))
    return {k: (None if any(p is None for p in v) else np.concatenate(v).astype(np.float64))
            for k, v in parts.items()}


def save_features(path: str | os.PathLike, feats: dict[str, np.ndarray | None], meta: dict[str, Any]) -> Path:
    """Atomically write ``feats`` (None entries are omitted) and ``meta`` (JSON, stored inside the .npz) to ``path``."""
    path = Path(path)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in feats.items() if v is not None}
    if "pool" not in arrays:
        raise KeyError(f"refusing to save features without 'pool' to {path}")
    arrays[_META_KEY] = np.array(json.dumps(meta, sort_keys=True, default=json_default))
    atomic_npz_save(path, **arrays)
    return path


def load_features(path: str | os.PathLike) -> tuple[dict[str, np.ndarray | None], dict[str, Any]]:
    """Read a file written by :func:`save_features`: ``(feats, meta)``, with ``feats['logits_unbiased']`` None when
    it was not saved."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "pool" not in z.files or _META_KEY not in z.files:
                raise KeyError(f"{path}: not a varup features file (keys {z.files}, need 'pool' and '{_META_KEY}')")
            feats = {k: (z[k] if k in z.files else None) for k in FEATURE_KEYS}
            meta = json.loads(str(z[_META_KEY]))
    except FileNotFoundError:
        raise FileNotFoundError(f"features file is missing: {path}") from None
    return feats, meta
