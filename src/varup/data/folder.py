"""Real image folders (``root/<class>/<image>``) with VAR's preprocessing, and strict image loading.

Preprocessing follows the official VAR ``build_dataset``: resize the shorter side to
``round(mid_reso * R)`` with LANCZOS (official ``mid_reso = 1.125``; the resize is skipped when the
shorter side already has that length, e.g. ``mid_reso = 1.0`` on R x R images), crop R x R (centre, or
random for training), optional horizontal flip, ``ToTensor`` and ``2x - 1`` into [-1, 1].

Random crops / flips are drawn from ``np.random.default_rng([seed, epoch, index])``, so they are
deterministic per item and independent of DataLoader workers and iteration order.

Unreadable images are never silently patched (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off): they
raise :class:`CorruptImageError` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from varup.base.utils import progress as _progress

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
OFFICIAL_MID_RESO = 1.125


class CorruptImageError(ValueError):
    """An image file that PIL cannot fully decode (truncated, not an image, ...); the message names it."""


# -------------------------------------------------------------------------------------------- loading
def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open ``path``, decode it fully and convert to RGB (from L, RGBA, P, ... as PIL's ``convert``).

    Raises FileNotFoundError for a missing file and :class:`CorruptImageError` ("corrupt or unreadable
    image: {path}: {reason}") for anything PIL cannot decode, including truncated files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file is missing: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"corrupt or unreadable image: {path}: {type(e).__name__}: {e}") from e


def verify_images(paths: Sequence[str | os.PathLike], progress: bool = True) -> int:
    """Fully decode every image in ``paths``; return how many were checked.

    Raises :class:`CorruptImageError` on the first bad file, naming it and how many files were fine.
    """
    it = _progress(paths, desc="verify images", unit="img") if progress else paths
    for k, p in enumerate(it):
        try:
            load_rgb(p)
        except CorruptImageError as e:
            raise CorruptImageError(f"{e} (file {k + 1} of {len(paths)}; {k} checked OK before it)") from e
    return len(paths)


# ---------------------------------------------------------------------------------------- scanning
def scan_image_folder(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS,
                      classes: Sequence[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """Scan a ``root/<class>/.../<image>`` tree; return ``(paths, labels, class_names)``.

    Classes are the sorted non-hidden sub-directories (or ``classes`` in the given order); label =
    index in ``class_names``. Images are matched by extension (case-insensitive), searched
    recursively, sorted by their path relative to the class directory; hidden files are skipped.
    Raises FileNotFoundError / ValueError naming the missing root, a missing class directory or a
    class directory without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder does not exist: {root}")
    if classes is None:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise ValueError(f"image folder has no class sub-directories (expected root/<class>/<image>): {root}")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = _class_images(root / name, exts)
        paths += files
        labels += [label] * len(files)
    return paths, labels, list(classes)


def _class_images(class_dir: Path, exts: set[str]) -> list[str]:
    if not class_dir.is_dir():
        raise FileNotFoundError(f"class directory does not exist: {class_dir}")
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts:
                found.append(os.path.join(dirpath, f))
    if not found:
        raise ValueError(f"class directory has no images ({', '.join(sorted(exts))}): {class_dir}")
    return sorted(found, key=lambda p: Path(p).relative_to(class_dir).as_posix())


# ------------------------------------------------------------------------------------ preprocessing
def preprocess(img: Image.Image, resolution: int, mid_reso: float = OFFICIAL_MID_RESO, *,
               crop: str = "center", flip: bool = False, rng: np.random.Generator | None = None) -> Image.Image:
    """VAR preprocessing up to (not including) ToTensor: LANCZOS shorter-side resize to
    ``round(mid_reso * resolution)``, R x R crop (``"center"`` or ``"random"`` using ``rng``), flip."""
    target = round(mid_reso * resolution)
    if target < resolution:
        raise ValueError(f"mid_reso * resolution = {target} is smaller than the crop {resolution}")
    if min(img.size) != target:
        img = TF.resize(img, target, interpolation=InterpolationMode.LANCZOS)
    if crop == "center":
        img = TF.center_crop(img, [resolution, resolution])
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng")
        w, h = img.size
        top, left = int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))
        img = TF.crop(img, top, left, resolution, resolution)
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    return TF.hflip(img) if flip else img


def to_pm1(img: Image.Image) -> torch.Tensor:
    """ToTensor then ``2x - 1``: float32 (3, H, W) in [-1, 1]."""
    x = TF.to_tensor(img)
    return x.add(x).sub_(1)


class ImageDataset(Dataset):
    """Images with labels, VAR-preprocessed; ``ds[i] -> (float32 tensor (3, R, R) in [-1, 1], int label)``.

    Build it from ``(paths, labels)``, :meth:`from_folder` or :meth:`from_toy`.
    ``hflip``: ``False`` (never), ``True`` (random, p = 0.5) or a per-item sequence of bools (fixed flips,
    e.g. for deterministic token caches). ``crop``: ``"center"`` or ``"random"``. Random decisions use
    ``default_rng([seed, epoch, index])``; call :meth:`set_epoch` to vary them across epochs.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Sequence[int], *, resolution: int,
                 mid_reso: float = OFFICIAL_MID_RESO, crop: str = "center", hflip: bool | Sequence[bool] = False,
                 seed: int = 0, class_names: Sequence[str] | None = None):
        if len(paths) != len(labels):
            raise ValueError(f"ImageDataset: {len(paths)} paths but {len(labels)} labels")
        if crop not in ("center", "random"):
            raise ValueError(f"ImageDataset: crop must be 'center' or 'random', got {crop!r}")
        if not isinstance(hflip, bool) and len(hflip) != len(paths):
            raise ValueError(f"ImageDataset: hflip has {len(hflip)} flags for {len(paths)} images")
        if round(mid_reso * resolution) < resolution:
            raise ValueError(f"ImageDataset: mid_reso {mid_reso} < 1 would make images smaller than the crop")
        self.paths = [str(p) for p in paths]
        self.labels = [int(x) for x in labels]
        self.resolution, self.mid_reso, self.crop, self.seed = int(resolution), float(mid_reso), crop, int(seed)
        self.hflip = hflip if isinstance(hflip, bool) else [bool(f) for f in hflip]
        self.class_names = list(class_names) if class_names is not None else None
        self.epoch = 0
        self.records: list[dict[str, Any]] | None = None  # manifest rows for toy datasets

    @classmethod
    def from_folder(cls, root: str | os.PathLike, *, resolution: int, classes: Sequence[str] | None = None,
                    extensions: Sequence[str] = IMG_EXTENSIONS, **kw) -> "ImageDataset":
        """Dataset over a ``root/<class>/<image>`` tree (see :func:`scan_image_folder`)."""
        paths, labels, names = scan_image_folder(root, extensions, classes)
        return cls(paths, labels, resolution=resolution, class_names=names, **kw)

    @classmethod
    def from_toy(cls, dataset_dir: str | os.PathLike, split: str, *, resolution: int | None = None,
                 mid_reso: float = 1.0, **kw) -> "ImageDataset":
        """Dataset over one split of a toy dataset (:mod:`varup.data.toy`); default resolution is the
        dataset's own and ``mid_reso = 1.0`` (no resize). Manifest rows are kept in ``records``."""
        from varup.base.utils import read_json
        from varup.data.toy import read_manifest

        dataset_dir = Path(dataset_dir)
        info = read_json(dataset_dir / "dataset.json")
        rows = read_manifest(dataset_dir, split)
        if not rows:
            raise ValueError(f"toy dataset {dataset_dir} has no images in split {split!r}")
        ds = cls([dataset_dir / r["path"] for r in rows], [r["label"] for r in rows],
                 resolution=resolution or info["resolution"], mid_reso=mid_reso, class_names=info["classes"], **kw)
        ds.records = rows
        return ds

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops / flips are used."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def _draw(self, index: int) -> tuple[bool, np.random.Generator]:
        """Flip decision and the generator (already advanced past it) for the random crop of ``index``."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        coin = rng.random() < 0.5  # always drawn, so the crop stream does not depend on hflip
        flip = (self.hflip and bool(coin)) if isinstance(self.hflip, bool) else self.hflip[index]
        return flip, rng

    def flip_for(self, index: int) -> bool:
        """Whether item ``index`` is flipped in the current epoch."""
        return self._draw(index)[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        flip, rng = self._draw(index)
        img = preprocess(load_rgb(self.paths[index]), self.resolution, self.mid_reso, crop=self.crop, flip=flip,
                         rng=rng)
        return to_pm1(img), self.labels[index]


# ----------------------------------------------------------------------------------- uint8 helpers
def load_uint8_images(paths: Sequence[str | os.PathLike], resolution: int, mid_reso: float = 1.0,
                      progress: bool = True) -> np.ndarray:
    """Load images for a metric reference set: same resize + centre crop, no [-1, 1] scaling.

    Returns uint8 (N, R, R, 3).
    """
    out = np.empty((len(paths), resolution, resolution, 3), dtype=np.uint8)
    it = _progress(paths, desc="load images", unit="img") if progress else paths
    for k, p in enumerate(it):
        out[k] = np.asarray(preprocess(load_rgb(p), resolution, mid_reso, crop="center"), dtype=np.uint8)
    return out


def open_split(data_dir: str | os.PathLike, split: str, resolution: int, preprocess: dict | None = None,
               hflip: bool = False) -> "ImageDataset":
    """The ImageDataset of one split of a prepared dataset directory, with the config's ``preprocess`` settings."""
    pre = dict(preprocess or {})
    return ImageDataset.from_toy(data_dir, split, resolution=resolution, mid_reso=pre.get("mid_reso", 1.0),
                                 crop=pre.get("crop", "center"), hflip=hflip)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images (B, 3, H, W) in [0, 1] -> uint8 numpy (B, H, W, 3) via ``clamp(x * 255 + 0.5)``.

    We round to nearest. The official VAR demo truncates (``x.mul(255).cpu().numpy().astype(uint8)``-style),
    which is biased down by half a level; users in VAR issues #45 / #83 round, as here.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"to_uint8 expects (B, 3, H, W), got {tuple(images.shape)}")
    x = images.detach().float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
