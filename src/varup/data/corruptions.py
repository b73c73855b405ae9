"""ImageNet-C corruptions (Table 3's mCE) of held-out images, with the maintained ``imagecorruptions`` package
(Michaelis et al., 15 benchmark corruptions x 5 severities, plus its 4 validation corruptions).

The corrupted set is a dataset directory (the format of :mod:`varup.data.prepare`, so ``varup encode`` tokenizes it
unchanged, in one job)::

    out_dir/images/<corruption>/s<severity>/<k:05d>.png   uint8 R x R RGB, lossless; ``clean/s0`` = the uncorrupted
                                                          images (the same preprocessing, no corruption)
    out_dir/manifest.csv    every image in split ``val``, set-major (clean first, then corruption x severity in the
                            configured order), image order inside a set = the source rows' order; label and
                            class_name of the source image; paths relative to out_dir
    out_dir/dataset.json    classes, resolution, counts, manifest_sha256 and ``corruptions``: {sets: [{corruption,
                            severity, start, stop}] (manifest rows [start, stop)), source, source_split, source_rows,
                            seed, package}

Images are preprocessed as the dataset's own held-out split is encoded (shorter-side resize to mid_reso x R, centre
crop R x R), corrupted at R x R, and stored at R x R, so the encode step needs no resize (mid_reso 1.0).

Randomness: imagecorruptions draws from numpy's GLOBAL RNG. :func:`corrupt_image` seeds it for each call with
``derive_seed(seed, 'corruption', name, severity, row) mod 2**32`` (``row`` = the source image's row in its split) and
restores the caller's RNG state afterwards, so an image's corruption does not depend on the other images, their order
or ``max_images``.

Compatibility (:func:`compat`): imagecorruptions 1.1.2 predates numpy 2 and scikit-image 0.19+. ``fog`` (through
``plasma_fractal``) uses ``np.float_``, removed in numpy 2.0; ``glass_blur`` and ``gaussian_blur`` call
``skimage.filters.gaussian(..., multichannel=True)``, an argument removed in scikit-image 0.19 (its replacement is
``channel_axis=-1``). For the duration of a call we supply ``np.float_ = np.float64`` and replace the ``gaussian``
name inside ``imagecorruptions.corruptions`` by an adapter mapping ``multichannel=True/False`` to
``channel_axis=-1/None``; both are undone on exit. The numerics are those of the old call: the adapter changes the
argument's spelling only.

Sizes: imagecorruptions refuses images under 32 px. All 19 corruptions run at 32 px and at 256 px (tests). Their
parameters are ImageNet's (224 px). Nine of the 15 degrade a toy scene drawn at 32 px as much as the same scene drawn
at 256 px (pixel correlation with the clean image within 0.05 at severities 1, 3, 5): the three noises, zoom blur,
snow, frost, fog, brightness and contrast. The other six are sized in pixels (defocus, glass and motion blur kernels,
elastic_transform's displacement smoothing, pixelate's output grid, JPEG's 8 x 8 blocks) and are far stronger at
32 px (severity 5: correlation 0.58-0.91 at 32 px vs 0.91-0.99 at 256 px); the toy config keeps the nine
(tests/test_corruptions.py checks the split; README "Where the paper is ambiguous").
"""
from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

log = logging.getLogger("varup.data.corruptions")

#: the ImageNet-C benchmark corruptions (imagecorruptions' 'common' subset), in its order
BENCHMARK = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
             "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
#: imagecorruptions' held-out validation corruptions
VALIDATION = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIZE = 32  # imagecorruptions refuses smaller images
CLEAN = "clean"


def _import_library():
    """``imagecorruptions`` and its corruption module (their import warns about pkg_resources and SciPy's
    deprecated ``scipy.ndimage.interpolation``: silenced here, nothing we can change)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import imagecorruptions
        import imagecorruptions.corruptions as icc
    return imagecorruptions, icc


def _gaussian_adapter(gaussian):
    """``skimage.filters.gaussian`` accepting the removed ``multichannel`` argument (True -> channel_axis=-1)."""
    def adapted(image, *args, multichannel=None, **kw):
        if multichannel is not None and "channel_axis" not in kw:
            kw["channel_axis"] = -1 if multichannel else None
        return gaussian(image, *args, **kw)

    adapted.__wrapped__ = gaussian
    return adapted


@contextlib.contextmanager
def compat() -> Iterator[None]:
    """Run imagecorruptions 1.1.2 under numpy 2 / scikit-image >= 0.19 (module docstring): ``np.float_`` and the
    ``gaussian(multichannel=...)`` adapter exist inside the block only."""
    _, icc = _import_library()
    added_float = "float_" not in np.__dict__
    if added_float:
        np.float_ = np.float64
    original = icc.gaussian
    icc.gaussian = _gaussian_adapter(original)
    try:
        yield
    finally:
        icc.gaussian = original
        if added_float:
            del np.float_


def image_seed(seed: int, name: str, severity: int, row: int) -> int:
    """The numpy global seed (< 2**32) of one corrupted image: from the config seed, the corruption, the severity and
    the source image's row in its split."""
    from varup.base.seeding import derive_seed

    return derive_seed(int(seed), "corruption", name, int(severity), int(row)) % (1 << 32)


def check_names(names: Sequence[str], severities: Sequence[int], key: str = "experiments.ood.corruptions") -> None:
    unknown = [n for n in names if n not in BENCHMARK + VALIDATION]
    if unknown:
        raise ValueError(f"{key}.names: unknown corruption(s) {unknown}; known: {', '.join(BENCHMARK + VALIDATION)}")
    bad = [s for s in severities if s not in SEVERITIES]
    if bad:
        raise ValueError(f"{key}.severities: {bad} not in 1..5")


def corrupt_image(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """``image`` (H, W, 3) uint8, H and W >= 32, corrupted by ``name`` at ``severity`` (1..5) with numpy's global RNG
    seeded to ``seed`` for the call (the caller's RNG state is restored); uint8 (H, W, 3)."""
    check_names([name], [severity])
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"corrupt_image: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_SIZE:
        raise ValueError(f"corrupt_image: imagecorruptions needs images of at least {MIN_SIZE} px, got "
                         f"{image.shape[0]}x{image.shape[1]}; raise the dataset's resolution or drop the corruption "
                         f"study (experiments.ood.corruptions.enabled: false)")
    lib, _ = _import_library()
    state = np.random.get_state()
    try:
        np.random.seed(int(seed))
        with compat(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = lib.corrupt(np.ascontiguousarray(image), severity=int(severity), corruption_name=name)
    finally:
        np.random.set_state(state)
    out = np.asarray(out)
    if out.shape != image.shape:
        raise RuntimeError(f"imagecorruptions {name} severity {severity} returned shape {out.shape} for an image of "
                           f"shape {image.shape}")
    return out.astype(np.uint8, copy=False)


def corruption_sets(names: Sequence[str], severities: Sequence[int]) -> list[tuple[str, int]]:
    """The sets of a corrupted directory in order: the clean set, then every (corruption, severity)."""
    return [(CLEAN, 0)] + [(n, int(s)) for n in names for s in severities]


_SHARED: dict = {}  # the images of a pool's tasks, inherited by forked workers (not pickled per task)


def _share(images: np.ndarray, rows: np.ndarray) -> None:
    _SHARED.update(images=images, rows=rows)


def _write_set(tmp: Path, name: str, sev: int, seed: int) -> int:
    """One set's PNGs, tmp/images/<name>/s<sev>/<k>.png, from the shared images; returns how many."""
    from PIL import Image

    folder = tmp / "images" / name / f"s{sev}"
    folder.mkdir(parents=True)
    for k, (img, row) in enumerate(zip(_SHARED["images"], _SHARED["rows"])):
        out = img if name == CLEAN else corrupt_image(img, name, sev, image_seed(seed, name, sev, row))
        Image.fromarray(out).save(folder / f"{k:05d}.png")
    return len(_SHARED["images"])


def _write_images(tmp: Path, images: np.ndarray, rows: np.ndarray, sets: list[tuple[str, int]], seed: int,
                  workers: int) -> None:
    """Write every set's images under tmp/images, one set per task on ``workers`` forked processes (each image is
    seeded by itself, so the files do not depend on the number of workers)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from varup.base.utils import progress

    _share(images, rows)
    bar = progress(total=len(sets) * len(images), desc="corrupt images", unit="img")
    if workers <= 1:
        done = (_write_set(tmp, name, sev, seed) for name, sev in sets)
        for n in done:
            bar.update(n)
    else:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_share, initargs=(images, rows)) as pool:
            for n in pool.map(_write_set, [tmp] * len(sets), *zip(*sets), [seed] * len(sets)):
                bar.update(n)
    bar.close()


def _manifest(images: np.ndarray, labels: np.ndarray, class_names: list[str],
              sets: list[tuple[str, int]]) -> tuple[list[dict], list[dict]]:
    """(manifest rows, set index) of the files :func:`_write_images` writes, in set order."""
    manifest, index = [], []
    for name, sev in sets:
        start = len(manifest)
        for k, label in enumerate(labels):
            manifest.append({"path": f"images/{name}/s{sev}/{k:05d}.png", "mask_path": "", "split": "val",
                             "label": int(label), "class_name": class_names[int(label)], "colour": "", "size": "",
                             "background": "", "mode": -1, "mode_in_class": -1})
        index.append({"corruption": name, "severity": sev, "start": start, "stop": len(manifest)})
    return manifest, index


def write_corrupted_set(data_dir: str | os.PathLike, out_dir: str | os.PathLike, *, resolution: int,
                        names: Sequence[str], severities: Sequence[int], max_images: int | None, seed: int,
                        mid_reso: float = 1.0, split: str = "val", workers: int = 1) -> dict:
    """The corrupted held-out set of a prepared dataset (module docstring): the class-balanced first ``max_images``
    images of ``split`` (:func:`varup.data.subsets.real_subset`), clean and under every (corruption, severity).
    Built in a hidden sibling directory and renamed onto ``out_dir`` when complete, the sets spread over ``workers``
    processes (the files are the same for any number); returns dataset.json's dict."""
    from importlib.metadata import version

    from varup.base.utils import atomic_write_json, read_json, replace_dir, sha256_file
    from varup.data.subsets import load_rows, real_subset
    from varup.data.toy import MANIFEST_COLUMNS

    check_names(names, severities)
    if resolution < MIN_SIZE:
        raise ValueError(f"the corruption study needs images of at least {MIN_SIZE} px (imagecorruptions), but the "
                         f"dataset's resolution is {resolution}: set experiments.ood.corruptions.enabled: false")
    info = read_json(Path(data_dir) / "dataset.json")
    rows, keep = real_subset(data_dir, split, max_images)
    images, labels = load_rows(data_dir, rows, keep, resolution, mid_reso)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        sets = corruption_sets(names, severities)
        _write_images(tmp, images, keep, sets, seed, workers)
        manifest, index = _manifest(images, labels, list(info["classes"]), sets)
        with open(tmp / "manifest.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(manifest)
        n_classes = len(info["classes"])
        counts = np.bincount([m["label"] for m in manifest], minlength=n_classes).tolist()
        meta = {"name": f"{info.get('name', Path(data_dir).name)}-corrupted", "kind": "corruptions",
                "classes": list(info["classes"]), "resolution": int(resolution),
                "counts": {"train": 0, "val": len(manifest)},
                "class_counts": {"train": [0] * n_classes, "val": counts},
                "manifest_sha256": sha256_file(tmp / "manifest.csv"), "verified": True,
                "corruptions": {"sets": index, "source": str(data_dir), "source_split": split,
                                "source_rows": [int(r) for r in keep], "seed": int(seed), "mid_reso": float(mid_reso),
                                "package": f"imagecorruptions {version('imagecorruptions')}",
                                "seeding": "numpy global RNG seeded per image: derive_seed(seed, 'corruption', "
                                           "name, severity, source row) mod 2**32"}}
        atomic_write_json(tmp / "dataset.json", meta)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("corrupted set: %d images x %d sets -> %s", len(images), len(sets), out_dir)
    return meta
