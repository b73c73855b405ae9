"""The embedded toy experiment's dataset: coloured shapes on muted backgrounds, generated from a seed.

Every image shows one object. Its **class** is the object's SHAPE; its **mode** is the tuple
``(shape, colour, size, background)``, so with the defaults there are 4 classes x 16 modes per class
= 64 modes. Within a mode the images still vary (position, small rotation / aspect jitter, small
colour jitter, the background's tint, stripe phase / period / orientation; no pixel noise), so a
generator can show real diversity -- or collapse onto few modes, which the mode-coverage metrics
measure by classifying generated images into these modes.

Mode assignment is exactly balanced and uniform by default: the ``j``-th image of a class (``j`` counted
within the class and split) gets ``mode_in_class = j % n_modes_per_class``. With ``mode_zipf`` = s > 0 (the
claim study's collapse regime) the modes of each class are long-tailed instead: the mode of frequency rank r
(a seeded permutation per class, so the rare modes differ between classes) gets a share ∝ (r + 1)^-s of the
class's images in each split (s = 1, 16 modes: 30 % for the most frequent, 1.8 % for the rarest). Everything else about image ``i``
of split ``s`` (``i`` counted over the whole split, ``s`` = 0 for train, 1 for val) is drawn from
``np.random.default_rng([seed, s, i])``; hence the same seed gives byte-identical files regardless of
generation order, and another seed gives other images.

Rendering: the object mask is drawn with PIL at 4x supersampling, downsampled with LANCZOS and used as
an antialiasing alpha over a background computed at the final resolution; the stored object mask is
that alpha thresholded at 0.5.

File format (stable; later stages read it)::

    out_dir/images/{split}/{class_name}/{i:05d}.png   RGB, resolution x resolution
    out_dir/masks/{split}/{class_name}/{i:05d}.png    mode "L", 0 = background, 255 = object
    out_dir/manifest.csv   one row per image; columns
        path           image path relative to out_dir (POSIX separators)
        mask_path      mask path relative to out_dir
        split          train | val
        label          int class index (index into dataset.json "classes")
        class_name     the shape
        colour, size, background   the other mode factors (names)
        mode           int global mode index = index into dataset.json "modes"
        mode_in_class  int index of the mode among its class's modes
    out_dir/dataset.json   {name: "toy", seed, resolution, classes: [...],
                            modes: [{index, shape, colour, size, background}, ...],
                            counts: {train, val}, generator_version, manifest_sha256,
                            colours, sizes, backgrounds, n_train_per_class, n_val_per_class}

Global modes are ordered as ``itertools.product(shapes, colours, sizes, backgrounds)``, so
``mode = label * n_modes_per_class + mode_in_class``. ``i`` in the file names counts over the whole
split (class-major: class ``c`` holds ``i`` in ``[c * n, (c + 1) * n)``).

The whole directory is written atomically: it is built in a hidden temporary sibling and renamed onto
``out_dir`` only after success (an existing ``out_dir`` is replaced only then).
"""
from __future__ import annotations

import csv
import itertools
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from varup.base.utils import atomic_write_json, read_json, replace_dir, sha256_file
from varup.base.utils import progress as _progress

GENERATOR_VERSION = "toy-shapes-v3"
SUPERSAMPLE = 4
SPLITS = ("train", "val")
MANIFEST_COLUMNS = ("path", "mask_path", "split", "label", "class_name", "colour", "size", "background", "mode",
                    "mode_in_class")

# Saturated object colours (RGB); backgrounds stay near gray so colour identifies the object.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 175, 55),
    "blue": (40, 75, 215),
    "yellow": (225, 205, 35),
    "magenta": (205, 40, 200),
    "cyan": (35, 195, 210),
}
# Object extent (longest side of its unrotated bounding box) as a fraction of the image side. A small object spans
# 16 px at 32 px, 4 latent cells of the toy tokenizer (4 px each): at 11 px (v2) its reconstructions lost the shape.
SIZES: dict[str, float] = {"small": 0.5, "medium": 0.62, "large": 0.75}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = ("plain", "stripes")

_COLOUR_JITTER = 8.0        # std of per-channel object colour jitter (0..255 scale)
_SIZE_JITTER = 0.06         # relative size jitter (uniform +-)
_ASPECT_JITTER = 0.10       # log-aspect jitter (uniform +-)
_MAX_ROT_DEG = 20.0         # rotation jitter of the non-circular shapes
_NOISE_STD = 0.0            # final pixel noise (none: unlearnable detail for a 4x4-token tokenizer)
_MARGIN_PX = 1.0            # the object's bounding box stays this far inside the image


# ------------------------------------------------------------------------------------------ modes
def build_modes(shapes: Sequence[str], colours: Sequence[str], sizes: Sequence[str],
                backgrounds: Sequence[str]) -> list[dict[str, Any]]:
    """All modes in their fixed global order ``product(shapes, colours, sizes, backgrounds)``."""
    _check_names("shape", shapes, SHAPES)
    _check_names("colour", colours, COLOURS)
    _check_names("size", sizes, SIZES)
    _check_names("background", backgrounds, BACKGROUNDS)
    return [{"index": k, "shape": s, "colour": c, "size": z, "background": b}
            for k, (s, c, z, b) in enumerate(itertools.product(shapes, colours, sizes, backgrounds))]


def _check_names(kind: str, names: Sequence[str], known: Iterable[str]) -> None:
    known = list(known)
    if not names:
        raise ValueError(f"toy dataset: no {kind}s given")
    if len(set(names)) != len(names):
        raise ValueError(f"toy dataset: duplicate {kind} names in {list(names)}")
    for n in names:
        if n not in known:
            raise KeyError(f"toy dataset: unknown {kind} {n!r} (known: {', '.join(known)})")


# -------------------------------------------------------------------------------------- rendering
def _unit_polygon(shape: str) -> np.ndarray:
    """Outline of ``shape`` centred on 0 with a bounding box of side 1, as a (K, 2) array of (x, y)."""
    if shape == "circle":
        t = np.linspace(0.0, 2 * math.pi, 64, endpoint=False)
        return 0.5 * np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "square":
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if shape == "triangle":  # isosceles, apex up (image y grows downwards)
        return np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if shape == "cross":  # plus sign with arms 1/3 of the extent wide
        a, b = 0.5, 0.5 / 3
        return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                         [-a, -b], [-b, -b]])
    raise KeyError(f"toy dataset: unknown shape {shape!r}")


_UNIT_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}


def _object_alpha(shape: str, size: str, resolution: int, rng: np.random.Generator,
                  position_jitter: float = 1.0) -> np.ndarray:
    """Antialiased object coverage in [0, 1], shape (R, R): the polygon drawn at 4x, LANCZOS-downsampled.
    ``position_jitter`` is the fraction of the free range (bounding box inside the image) the centre is drawn
    from, around the middle: 1 = anywhere, 0 = always centred."""
    extent = SIZES[size] * resolution * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER))
    aspect = math.exp(rng.uniform(-_ASPECT_JITTER, _ASPECT_JITTER))
    if shape == "circle":
        theta = rng.uniform(0, math.pi)  # orientation of the (slightly elliptic) circle
    else:
        theta = math.radians(rng.uniform(-_MAX_ROT_DEG, _MAX_ROT_DEG))
    pts = _UNIT_POLYGONS[shape] * (extent * aspect, extent / aspect)
    c, s = math.cos(theta), math.sin(theta)
    pts = pts @ np.array([[c, s], [-s, c]])
    lo, hi = pts.min(0), pts.max(0)
    # Uniform position in the middle `position_jitter` of the range that keeps the (rotated) bounding box inside.
    centre = []
    for d in range(2):
        a = _MARGIN_PX - lo[d]
        b = max(a, resolution - _MARGIN_PX - hi[d])
        centre.append(a + (b - a) * rng.uniform(0.5 - position_jitter / 2, 0.5 + position_jitter / 2))
    pts = (pts + centre) * SUPERSAMPLE - 0.5  # continuous coords -> supersampled pixel-centre coords
    big = Image.new("L", (resolution * SUPERSAMPLE,) * 2, 0)
    ImageDraw.Draw(big).polygon([tuple(p) for p in pts.tolist()], fill=255)
    small = big.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(kind: str, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Muted background (R, R, 3) float on the 0..255 scale: tinted mid-gray, plain or striped."""
    grey = rng.uniform(105, 150)
    tint = rng.uniform(-10, 10, size=3)
    base = np.full((resolution, resolution, 3), grey, dtype=np.float32) + tint.astype(np.float32)
    if kind == "plain":
        return base
    if kind == "stripes":
        angle = math.radians(rng.choice([0.0, 45.0, 135.0]) + rng.uniform(-8, 8))  # horizontal or diagonal
        period = rng.uniform(12.0, 16.0) * resolution / 32  # 2-3 stripes: representable by 8 px tokens
        phase = rng.uniform(0, 2 * math.pi)
        amp = rng.uniform(22, 32)
        y, x = np.mgrid[0:resolution, 0:resolution].astype(np.float32) + 0.5
        u = -x * math.sin(angle) + y * math.cos(angle)
        wave = np.clip(1.5 * np.sin(2 * math.pi * u / period + phase), -1, 1)  # soft square wave
        return base + (amp * wave)[..., None]
    raise KeyError(f"toy dataset: unknown background {kind!r}")


def render_toy_image(mode: dict[str, Any], resolution: int, rng: np.random.Generator,
                     position_jitter: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of ``mode``; returns (RGB uint8 (R, R, 3), mask uint8 (R, R) with 0/255)."""
    alpha = _object_alpha(mode["shape"], mode["size"], resolution, rng, position_jitter)
    colour = np.asarray(COLOURS[mode["colour"]], np.float32) + rng.normal(0, _COLOUR_JITTER, 3).astype(np.float32)
    bg = _background(mode["background"], resolution, rng)
    a = alpha[..., None]
    img = bg * (1 - a) + np.clip(colour, 0, 255) * a
    if _NOISE_STD > 0:
        img += rng.normal(0, _NOISE_STD, size=img.shape).astype(np.float32)
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    mask = np.where(alpha >= 0.5, 255, 0).astype(np.uint8)
    return rgb, mask


# --------------------------------------------------------------------------------------- generation
def _plan(split_id: int, n_per_class: int, n_classes: int, n_modes_per_class: int, mode_zipf: float = 0.0,
          seed: int = 0) -> list[tuple[int, int, int]]:
    """(i, label, mode_in_class) for every image of a split, class-major: balanced modes (``mode_zipf`` 0), else
    the long-tailed counts of :func:`mode_counts` (each class's modes in their own seeded rank order), cycled."""
    if mode_zipf == 0:
        return [(c * n_per_class + j, c, j % n_modes_per_class) for c in range(n_classes) for j in range(n_per_class)]
    out = []
    for c in range(n_classes):
        ranks = np.random.default_rng([seed, 7, c]).permutation(n_modes_per_class)  # rank r -> mode ranks[r]
        left = dict(zip(ranks.tolist(), mode_counts(n_per_class, n_modes_per_class, mode_zipf).tolist()))
        seq = []
        while len(seq) < n_per_class:  # round-robin over the modes with images left: no mode bunched at one end
            for m in range(n_modes_per_class):
                if left[m]:
                    seq.append(m)
                    left[m] -= 1
        out += [(c * n_per_class + j, c, m) for j, m in enumerate(seq)]
    return out


def mode_counts(n: int, n_modes: int, exponent: float) -> np.ndarray:
    """Images of each frequency rank among ``n`` of one class: proportional to ``(rank + 1) ** -exponent`` (Zipf;
    0 = uniform), rounded by largest remainder so that they sum to ``n``, and at least 1 each where ``n`` allows
    (a mode with no image would not be a mode of the data)."""
    w = np.arange(1, n_modes + 1, dtype=np.float64) ** -float(exponent)
    share = n * w / w.sum()
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(-(share - counts), kind="stable")[:n - counts.sum()]] += 1
    while n >= n_modes and (counts == 0).any():  # lend an image from the most frequent rank to an empty one
        counts[np.argmax(counts)] -= 1
        counts[np.flatnonzero(counts == 0)[0]] += 1
    return counts


def _render_one(seed: int, split_id: int, i: int, mode: dict[str, Any], resolution: int,
                position_jitter: float) -> tuple[np.ndarray, np.ndarray]:
    return render_toy_image(mode, resolution, np.random.default_rng([seed, split_id, i]), position_jitter)


def generate_toy_dataset(out_dir: str | os.PathLike, *, seed: int = 0, resolution: int = 32,
                         shapes: Sequence[str] = ("circle", "square", "triangle", "cross"),
                         colours: Sequence[str] = ("red", "green", "blue", "yellow"),
                         sizes: Sequence[str] = ("small", "large"),
                         backgrounds: Sequence[str] = ("plain", "stripes"),
                         n_train_per_class: int = 512, n_val_per_class: int = 64,
                         position_jitter: float = 1.0, mode_zipf: float = 0.0,
                         progress: bool = True) -> dict[str, Any]:
    """Generate the toy dataset into ``out_dir`` (atomically; see the module docstring for the layout).
    ``mode_zipf`` > 0 makes the modes of each class long-tailed (:func:`mode_counts`) in both splits.

    Returns the dict written to ``dataset.json``.
    """
    if resolution < 8:
        raise ValueError(f"toy dataset: resolution must be >= 8, got {resolution}")
    if n_train_per_class < 0 or n_val_per_class < 0:
        raise ValueError("toy dataset: image counts per class must be >= 0")
    if mode_zipf < 0:
        raise ValueError(f"toy dataset: mode_zipf must be >= 0, got {mode_zipf}")
    if not 0.0 <= position_jitter <= 1.0:
        raise ValueError(f"toy dataset: position_jitter must be in [0, 1], got {position_jitter}")
    shapes, colours, sizes, backgrounds = (list(x) for x in (shapes, colours, sizes, backgrounds))
    modes = build_modes(shapes, colours, sizes, backgrounds)
    per_class = len(modes) // len(shapes)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        rows = _write_images(tmp, seed, resolution, shapes, modes, per_class,
                             {"train": n_train_per_class, "val": n_val_per_class}, position_jitter, progress,
                             mode_zipf)
        _write_manifest(tmp / "manifest.csv", rows)
        info = {
            "name": "toy", "seed": seed, "resolution": resolution, "classes": shapes, "modes": modes,
            "counts": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
            "generator_version": GENERATOR_VERSION, "manifest_sha256": sha256_file(tmp / "manifest.csv"),
            "colours": colours, "sizes": sizes, "backgrounds": backgrounds,
            "n_train_per_class": n_train_per_class, "n_val_per_class": n_val_per_class,
            "position_jitter": position_jitter, **({"mode_zipf": mode_zipf} if mode_zipf else {}),
        }
        atomic_write_json(tmp / "dataset.json", info)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _write_images(root: Path, seed: int, resolution: int, shapes: list[str], modes: list[dict[str, Any]],
                  per_class: int, n_per_class: dict[str, int], position_jitter: float,
                  show_progress: bool, mode_zipf: float = 0.0) -> list[dict[str, Any]]:
    """Render and save every image and mask under ``root``; return the manifest rows."""
    jobs = [(split, split_id, i, label, m) for split_id, split in enumerate(SPLITS)
            for i, label, m in _plan(split_id, n_per_class[split], len(shapes), per_class, mode_zipf, seed)]
    for split in SPLITS:
        for name in shapes:
            (root / "images" / split / name).mkdir(parents=True)
            (root / "masks" / split / name).mkdir(parents=True)
    it = _progress(jobs, desc="toy dataset", unit="img") if show_progress else jobs
    rows = []
    for split, split_id, i, label, m in it:
        mode = modes[label * per_class + m]
        rgb, mask = _render_one(seed, split_id, i, mode, resolution, position_jitter)
        rel_img = f"images/{split}/{shapes[label]}/{i:05d}.png"
        rel_mask = f"masks/{split}/{shapes[label]}/{i:05d}.png"
        Image.fromarray(rgb, "RGB").save(root / rel_img, format="PNG")
        Image.fromarray(mask, "L").save(root / rel_mask, format="PNG")
        rows.append({"path": rel_img, "mask_path": rel_mask, "split": split, "label": label,
                     "class_name": shapes[label], "colour": mode["colour"], "size": mode["size"],
                     "background": mode["background"], "mode": mode["index"], "mode_in_class": m})
    return rows


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


# ------------------------------------------------------------------------------------------ readers
_INT_COLUMNS = ("label", "mode", "mode_in_class")


def read_manifest(dataset_dir: str | os.PathLike, split: str | None = None, *,
                  verify: bool = False) -> list[dict[str, Any]]:
    """Rows of ``dataset_dir/manifest.csv`` as dicts (``label``, ``mode``, ``mode_in_class`` as int).

    ``split`` keeps only that split. ``verify`` checks the file against ``dataset.json``'s
    ``manifest_sha256``. Paths stay relative to ``dataset_dir``.
    """
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"toy manifest is missing: {path}")
    if verify:
        want = read_json(dataset_dir / "dataset.json").get("manifest_sha256")
        got = sha256_file(path)
        if want != got:
            raise ValueError(f"{path}: sha256 {got} does not match dataset.json manifest_sha256 {want}")
    if split is not None and split not in SPLITS:
        raise KeyError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        rows = []
        for r in reader:
            if split is not None and r["split"] != split:
                continue
            for k in _INT_COLUMNS:
                r[k] = int(r[k])
            rows.append(r)
    return rows


def mode_table(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The dataset's modes in global order: dicts ``{index, shape, colour, size, background, label,
    mode_in_class}`` (``label`` = class index of the shape)."""
    path = Path(dataset_dir) / "dataset.json"
    info = read_json(path)
    try:
        classes, modes = info["classes"], info["modes"]
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e}") from None
    per_class = len(modes) // len(classes)
    out = []
    for m in modes:
        label = classes.index(m["shape"])
        out.append({**m, "label": label, "mode_in_class": m["index"] - label * per_class})
    return out
