"""scikit-learn's bundled handwritten digits written out as an image folder: the real-data rehearsal of the ``folder``
dataset path (config/digits.yaml, target ``digits``).

The source is ``sklearn.datasets.load_digits``: 1,797 greyscale 8 x 8 images of the digits 0-9 (the UCI "optical
recognition of handwritten digits" test set, 16 grey levels plus 0), shipped inside scikit-learn, so nothing is
downloaded. :func:`write_digits_folder` writes them as ``out/{train,val}/<digit>/<index>.png`` (RGB PNG, the
sklearn row index in the name), the layout :func:`varup.data.prepare.prepare_folder` reads as a released split;
``out/split.json`` records how the split was made.

* **Split.** Per class, a seeded permutation (``default_rng([SPLIT_SEED, digit])``) sends
  ``round_half_up(n * val_fraction)`` images to ``val`` (held out: the metrics' reference set and the digit
  classifier's test set) and the rest to ``train`` (the tokenizer, the VAR and the digit classifier learn from it):
  stratified, and fixed by :data:`SPLIT_SEED`, ``val_fraction`` and scikit-learn's data alone.
* **Pixels.** A digit's values 0-16 (ink high, so white strokes on black) are mapped to ``round(v * 255 / 16)``.
* **Resampling.** Nearest neighbour, by the integer factor ``resolution / 8`` (the resolution must be a multiple of
  8): every source pixel becomes a ``f x f`` block. Why: it invents no grey values and no blur, it is exactly
  invertible (the block mean gives the 8 x 8 digit back, which is what the digit classifier reads), and at 32 px
  with the toy tokenizer's downsampling of 4 the finest 8 x 8 token map lies on the digit's own pixel grid.
  A smooth filter (bilinear, LANCZOS) would instead spread each pixel over its neighbours' blocks and overshoot
  (LANCZOS) at the stroke edges, detail that is not in the data.
* **RGB.** The grey image repeated over the three channels (the pipeline and Inception read RGB).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from varup.base.utils import atomic_write_json, progress, replace_dir

log = logging.getLogger("varup.data.digits")

#: the seed of the stratified train / held-out split (fixed: the split is part of the dataset's definition)
SPLIT_SEED = 0
#: the digits' own side length and grey levels (sklearn.datasets.load_digits: 8 x 8, values 0..16)
SOURCE_SIDE = 8
SOURCE_MAX = 16
CLASSES = [str(d) for d in range(10)]


def load_source() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: uint8 images (1797, 8, 8) with values 0..16 and int labels 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.uint8), d.target.astype(np.int64)


def upscale_factor(resolution: int, key: str = "resolution") -> int:
    """``resolution / 8``; a ValueError naming ``key`` unless the resolution is a positive multiple of 8."""
    if int(resolution) != resolution or resolution < SOURCE_SIDE or resolution % SOURCE_SIDE:
        raise ValueError(f"{key}: {resolution} px, but the digits are {SOURCE_SIDE} x {SOURCE_SIDE} and are upscaled "
                         f"by whole pixels (nearest neighbour): use a multiple of {SOURCE_SIDE} (e.g. 32)")
    return int(resolution) // SOURCE_SIDE


def to_rgb(digits: np.ndarray, resolution: int) -> np.ndarray:
    """Digits (N, 8, 8), values 0..16 -> uint8 RGB (N, R, R, 3): ``round(v * 255 / 16)``, each pixel a
    ``R/8 x R/8`` block (nearest neighbour), the grey repeated over three channels."""
    f = upscale_factor(resolution)
    grey = np.rint(np.asarray(digits, dtype=np.float64) * (255.0 / SOURCE_MAX)).clip(0, 255).astype(np.uint8)
    big = grey.repeat(f, axis=1).repeat(f, axis=2)
    return np.repeat(big[..., None], 3, axis=3)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int = SPLIT_SEED) -> np.ndarray:
    """A bool mask, True for the held-out (val) images: per class, ``round_half_up(n * val_fraction)`` of a
    permutation drawn from ``default_rng([seed, class])`` (at least 1 and at most n - 1 of a class of n >= 2)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = min(max(1, int(len(idx) * val_fraction + 0.5)), len(idx) - 1) if len(idx) >= 2 else 0
        pick = np.random.default_rng([seed, int(c)]).permutation(len(idx))[:n_val]
        val[idx[pick]] = True
    return val


def cap_per_class(labels: np.ndarray, val: np.ndarray, max_per_class: int | None) -> np.ndarray:
    """A bool mask of the images kept: the first ``max_per_class`` (by index) of every class in each split; all
    when None."""
    keep = np.ones(len(labels), dtype=bool)
    if max_per_class is None:
        return keep
    if max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    for c in np.unique(labels):
        for in_val in (False, True):
            keep[np.flatnonzero((labels == c) & (val == in_val))[max_per_class:]] = False
    return keep


def write_digits_folder(out_dir: str | os.PathLike, *, resolution: int, val_fraction: float,
                        seed: int = SPLIT_SEED, max_per_class: int | None = None) -> dict[str, Any]:
    """Write the digits as ``out_dir/{train,val}/<digit>/<index:04d>.png`` at ``resolution`` px (see the module
    docstring) plus ``out_dir/split.json``; built in a hidden sibling and renamed onto ``out_dir`` when complete.
    ``max_per_class`` keeps only the first N digits of each class in each split (after the split: a reduced run).
    Returns the split record (counts per split and class)."""
    import sklearn

    images, labels = load_source()
    val = stratified_split(labels, val_fraction, seed)
    keep = cap_per_class(labels, val, max_per_class)
    images, labels, val = images[keep], labels[keep], val[keep]
    index = np.flatnonzero(keep)  # the sklearn row of each kept digit (the file name)
    rgb = to_rgb(images, resolution)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for split in ("train", "val"):
            for c in CLASSES:
                (tmp / split / c).mkdir(parents=True)
        for i in progress(range(len(labels)), desc="write digits", unit="img"):
            split = "val" if val[i] else "train"
            Image.fromarray(rgb[i], "RGB").save(tmp / split / CLASSES[labels[i]] / f"{index[i]:04d}.png")
        record = {"source": "sklearn.datasets.load_digits", "sklearn_version": sklearn.__version__,
                  "n_images": int(len(labels)), "resolution": int(resolution), "max_per_class": max_per_class,
                  "resampling": f"nearest neighbour x{upscale_factor(resolution)}",
                  "pixels": f"round(v * 255 / {SOURCE_MAX}), grey repeated over RGB",
                  "split": {"method": "stratified, seeded", "seed": int(seed), "val_fraction": float(val_fraction)},
                  "counts": {s: [int(((labels == k) & (val == (s == "val"))).sum()) for k in range(len(CLASSES))]
                             for s in ("train", "val")}}
        atomic_write_json(tmp / "split.json", record)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("digits: %d train + %d val images at %d px -> %s", int((~val).sum()), int(val.sum()), resolution,
             out_dir)
    return record


__all__ = ["SPLIT_SEED", "SOURCE_SIDE", "SOURCE_MAX", "CLASSES", "load_source", "upscale_factor", "to_rgb",
           "stratified_split", "cap_per_class", "write_digits_folder"]
