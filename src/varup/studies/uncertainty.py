"""MC-Dropout studies (the paper's companion study): pixel-wise σ maps, region σ, a DropPath-rate sweep and class
entanglement, all seeded and deterministic.

Definitions
-----------
* **MC pass** (:func:`mc_passes`). For a fixed condition (a class or a class mix) and a sampling seed ``seed``,
  pass ``t = 0..T-1`` samples ONE image with

  - the sampling generator seeded, under the σ reading ``dropout``, ``derive_seed(seed, 'sample')`` -- the SAME for
    every pass (common random numbers: the sampling noise is held fixed, so the spread over passes is due to the
    dropped sub-networks only) -- or, under the reading ``samples``, ``derive_seed(seed, 'sample', t)``: every pass
    its own sampling noise, so σ is the sample-to-sample spread (with DropPath on). ``uncertainty.sigma_reading``
    picks one or ``both`` (records: ``mean_sigma`` / ``mean_sigma_samples``, :func:`sigma_key`); and
  - DropPath kept active at inference (:func:`varup.sampling.sampler.mc_dropout`, the official per-block schedule
    ``linspace(0, rate, depth)``), its mask generator seeded ``derive_seed(seed, 'mc', t)``. ``masks``
    (``uncertainty.droppath_masks``): ``per_call`` (default, as the official VAR / VAR-CLIP) draws a fresh mask on
    every DropPath call -- per branch, per scale, per row of the CFG-doubled batch; ``per_pass`` one mask per pass,
    held for every scale and both branches and shared by both CFG halves (the former behaviour, bit for bit).

  On a GPU the passes run in batches (``batch_size``, default :data:`MC_GPU_BATCH`: T = 50 is one batch) with one
  generator per pass for each kind of noise (:func:`varup.sampling.sampler.sample` and ``mc_dropout`` take a list
  of generators, one per image): pass t draws its masks from its own mask generator and its tokens from its own
  copy of the sampling generator, the same random numbers it draws alone. One generator for the whole batch would
  not do: ``torch.multinomial`` draws different noise for every row of a batch, so the passes would mix sampling
  noise into σ (and rate 0 would no longer give σ = 0). The arithmetic is not the same, though: a matmul or conv
  over a batch rounds differently from one over a single image (on the CPU ~1e-6 in the logits and pixels of the
  tiny test model, same tokens), so batched passes equal the passes made one at a time to float rounding only --
  unless a rounding moves a token across a sampling boundary. On the CPU the default therefore stays one pass at
  a time (``batch_size=1``, the former path, whose numbers the toy's tests compare bit for bit); at 32 px with the
  toy model a pass takes ~40 ms on one CPU thread (T = 50: ~2 s).
* **σ map** (:func:`sigma_map`). Images in [0, 1]; σ(y, x) = mean over the 3 channels of the population standard
  deviation (ddof = 0) over the T passes: ``images.std(axis=0).mean(axis=0)``. The "mean σ" of a map is its average
  over all pixels.
* **Object region** (:func:`object_mask`). σ maps are of GENERATED images, so the object region comes from the mean
  image over the passes: the toy's backgrounds are tinted grey (chroma = max - min over RGB <= ~0.1) and its objects
  saturated (chroma >= ~0.5); a pixel is "object" when its chroma exceeds Otsu's threshold on the image's chroma
  histogram, provided the upper class looks like an object (mean chroma >= 0.3; otherwise the mask is empty). On the
  toy's real validation images this agrees with the exact masks at mean IoU ~0.99 (min ~0.83, small thin crosses)
  -- :func:`segmentation_check` measures it and :func:`run_mc_dropout` records it. Real datasets (no grey
  backgrounds; the companion study used SAM) take masks of the mean images from a folder
  (``uncertainty.mask_dirs``, :func:`mask_files`) when present; otherwise region σ is "absent" with the reason.
* **DropPath sweep** (:func:`droppath_sweep`). For each rate an evaluation set (class-major labels, batches of
  ``batch_size``) with DropPath active: batch ``b`` uses the sampling seed ``derive_seed(seed, 'sample', b)`` (the
  same as :func:`varup.sampling.sampler.sample_shard`, so rate 0 reproduces the ordinary sample set bit for bit) and the mask
  seed ``derive_seed(seed, 'droppath', b)`` (masks as ``uncertainty.droppath_masks``). Plus the mean σ of MC passes of a few
  (class, seed) pairs at that rate.
* **Entanglement** (:func:`entanglement_sets`). Conditioning on the equal-weight mix of 1, 2 or 3 class embeddings
  (``sample(..., class_weights=...)``, the unconditional CFG half keeps the null class); a one-class mix reproduces
  label conditioning exactly. Sampling and mask seeds as in the sweep (same noise for every mix); the sets are
  generated, and their σ computed, with DropPath at ``uncertainty.set_droppath_rate`` (the study's 0.05: its
  entanglement and descriptiveness tables repeat the sweep's 0.05 row).

Files (entry points for the workflow)
-------------------------------------
* :func:`run_mc_dropout` -> JSON (σ per pair, mean σ, region σ or the reason it is absent, the segmentation check)
  and NPZ (per pair: σ map, mean image, the ordinary sample, the object mask) for :func:`sigma_figure`.
* :func:`run_sweep_sets` -> ``out_dir/droppath_<rate>.npz`` (images uint8 NHWC, labels, tokens, params: the format
  of the sample stage, scored by the evaluate code) and ``out_dir/sweep.json`` (σ per rate).
* :func:`run_entanglement_sets` -> ``out_dir/mix_<a>-<b>.npz`` and ``out_dir/entanglement.json``.

Each rate / mix entry of these JSON files has ``"fidelity": null``; the workflow may fill it with the
``fidelity_metrics`` dict of that set (``fid``, ``kid_mean``, ``isc_mean``, ...), which :func:`droppath_table`,
:func:`entanglement_table` and :func:`sweep_figure` then show. Every record carries ``meta`` keys given by the caller
(e.g. ``dataset``, ``depth``, ``method``, ``seed``); tables group by ``dataset``/``depth``/``method`` and give
mean ± std over the records (training seeds) of each group, as :mod:`varup.report.tablefmt` defines it (sample std,
ddof = 1; a single record: its value without ±; the display column ``n`` counts the records).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from varup.base.seeding import derive_seed, make_generator
from varup.models.common import eval_mode
from varup.models.generators import load_generator
from varup.sampling.sampler import class_major_labels, condition_kwargs, mc_dropout, sample

log = logging.getLogger("varup.studies.uncertainty")

SWEEP_RATES = (0.05, 0.1, 0.2, 0.3)
ENTANGLEMENT_MIXES = ([0], [0, 1], [0, 1, 2])
OBJECT_MIN_CHROMA = 0.3  # the upper Otsu class must be at least this saturated to be an object
SIGMA_READINGS = ("dropout", "samples")  # what varies between the T passes: DropPath alone, or also the sampling noise
MC_GPU_BATCH = 64  # MC passes run at once on a GPU (one at a time on a CPU: see the module docstring)


# ------------------------------------------------------------------------------------------- helpers
def _device(var, device) -> torch.device:
    dev = var.lvl_1L.device
    if device is not None and torch.device(device) != dev:
        if not (torch.device(device).type == dev.type and torch.device(device).index is None):
            raise ValueError(f"the models are on {dev}, but device {device} was requested: move them first")
    return dev


# ------------------------------------------------------------------------------------------- MC passes
@torch.no_grad()
def mc_passes(var, vae, label_or_weights, *, T: int = 50, rate: float, seed: int, cfg: float = 1.5, top_k: int = 0,
              top_p: float = 0.0, more_smooth: bool = False, device=None, show_progress: bool = False,
              batch_size: int | None = None, masks: str = "per_call", reading: str = "dropout") -> torch.Tensor:
    """T MC-dropout passes for one condition and sampling seed (see the module docstring): float32 (T, 3, H, W) in
    [0, 1] on the CPU. ``label_or_weights``: a class index, or a (num_classes+1,) class-weight vector
    (:func:`entangled_weights`). ``batch_size`` passes run at once, each with its own generators (1: one pass at a
    time with single generators, the former path; None: 1 on a CPU, :data:`MC_GPU_BATCH` on a GPU). ``masks``:
    how DropPath draws its masks (:func:`varup.sampling.sampler.mc_dropout`); ``reading``: ``dropout`` (every pass
    the same sampling noise) or ``samples`` (pass t its own, ``derive_seed(seed, 'sample', t)``)."""
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if reading not in SIGMA_READINGS:
        raise ValueError(f"σ reading must be one of {SIGMA_READINGS} (uncertainty.sigma_reading), got {reading!r}")
    dev = _device(var, device)
    if batch_size is None:
        batch_size = 1 if dev.type == "cpu" else MC_GPU_BATCH
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    top_k, mask_draw = min(int(top_k), var.V), masks
    out = []
    batches: Iterable[range] = [range(a, min(T, a + batch_size)) for a in range(0, T, batch_size)]
    bar = None
    if show_progress:
        from varup.base.utils import progress

        bar = progress(total=T, desc="mc passes", unit="pass")
    with eval_mode(var, vae):
        for ts in batches:
            gens = [make_generator(derive_seed(seed, "mc", t), dev) for t in ts]
            noise = [make_generator(noise_seed(seed, reading, t), dev) for t in ts]
            if len(ts) == 1:  # a batch of one: its generators themselves (the path of batch_size=1)
                gens, noise = gens[0], noise[0]
            with mc_dropout(var, rate, len(ts), gens, masks=mask_draw):
                o = sample(var, vae, **condition_kwargs(var, label_or_weights, len(ts)), cfg=cfg, top_k=top_k,
                           top_p=top_p, more_smooth=more_smooth, generator=noise)
            out.append(o.images.float().cpu())
            if bar is not None:
                bar.update(len(ts))
    if bar is not None:
        bar.close()
    return torch.cat(out, 0)


def noise_seed(seed: int, reading: str, t: int) -> int:
    """The sampling seed of MC pass t: the same for every pass (``dropout``) or its own (``samples``)."""
    return derive_seed(seed, "sample") if reading == "dropout" else derive_seed(seed, "sample", t)


def readings_of(value: str) -> tuple[str, ...]:
    """``uncertainty.sigma_reading`` -> the σ readings to compute (``both``: dropout, then samples)."""
    if value == "both":
        return SIGMA_READINGS
    if value not in SIGMA_READINGS:
        raise ValueError(f"uncertainty.sigma_reading must be dropout, samples or both, got {value!r}")
    return (value,)


def sigma_key(reading: str, base: str = "mean_sigma") -> str:
    """The record key of a σ under a reading: ``mean_sigma`` (dropout), ``mean_sigma_samples`` (samples)."""
    return base if reading == "dropout" else f"{base}_{reading}"


def sigma_map(images) -> tuple[np.ndarray, np.ndarray]:
    """``images`` (T, 3, H, W) in [0, 1] (torch or numpy) -> (mean image (3, H, W), σ (H, W)), float32, where
    σ = mean over channels of the per-channel population std (ddof = 0) over the T passes."""
    x = images.detach().cpu().double().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float64)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"sigma_map expects (T, 3, H, W), got {x.shape}")
    return x.mean(axis=0).astype(np.float32), x.std(axis=0).mean(axis=0).astype(np.float32)


def region_sigma(sigma: np.ndarray, mask: np.ndarray) -> dict:
    """Mean σ inside / outside a binary object mask of the same resolution (None for an empty region), and the
    object's share of the pixels."""
    sigma, mask = np.asarray(sigma, np.float64), np.asarray(mask).astype(bool)
    if sigma.shape != mask.shape:
        raise ValueError(f"σ map {sigma.shape} and mask {mask.shape} differ in shape")
    inside, outside = sigma[mask], sigma[~mask]
    return {"inside": float(inside.mean()) if inside.size else None,
            "outside": float(outside.mean()) if outside.size else None,
            "object_fraction": float(mask.mean())}


# ------------------------------------------------------------------------------------------- segmentation
def _otsu(x: np.ndarray, bins: int = 256) -> float:
    h, edges = np.histogram(x, bins=bins, range=(0.0, 1.0))
    c = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(h)
    w1 = w0[-1] - w0
    m0 = np.cumsum(h * c)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    return float(edges[1:][int(np.argmax(np.nan_to_num(between)))])


def _hwc01(image) -> np.ndarray:
    x = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if x.ndim != 3:
        raise ValueError(f"expected one image (H, W, 3) or (3, H, W), got {x.shape}")
    if x.shape[0] == 3 and x.shape[-1] != 3:
        x = x.transpose(1, 2, 0)
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def object_mask(image, min_chroma: float = OBJECT_MIN_CHROMA) -> np.ndarray:
    """Object pixels of a toy image (uint8 or float in [0, 1]; HWC or CHW): chroma = max - min over RGB above Otsu's
    threshold; empty when the upper class is not saturated enough to be an object (mean chroma < ``min_chroma``)."""
    x = _hwc01(image)
    chroma = x.max(-1) - x.min(-1)
    thr = _otsu(chroma)
    mask = chroma > thr
    if not mask.any() or chroma[mask].mean() < min_chroma:
        return np.zeros(chroma.shape, bool)
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def segmentation_check(dataset_dir, split: str = "val", max_images: int | None = 256) -> dict:
    """IoU of :func:`object_mask` against the toy's exact masks on (a class-balanced subset of) a real split."""
    from PIL import Image

    from varup.data.subsets import balanced_subset
    from varup.data.toy import read_manifest

    rows = read_manifest(dataset_dir, split)
    if not rows:
        return {"split": split, "n": 0, "mean_iou": None, "reason": f"split {split!r} has no images"}
    keep = balanced_subset(np.array([r["label"] for r in rows]), max_images)
    ious = []
    for i in keep:
        img = np.asarray(Image.open(Path(dataset_dir) / rows[i]["path"]).convert("RGB"))
        true = np.asarray(Image.open(Path(dataset_dir) / rows[i]["mask_path"])) > 127
        ious.append(iou(object_mask(img), true))
    v = np.array(ious)
    return {"split": split, "n": int(len(v)), "mean_iou": float(v.mean()), "min_iou": float(v.min()),
            "p05_iou": float(np.percentile(v, 5)), "frac_iou_ge_0.8": float((v >= 0.8).mean())}


def has_object_masks(data_dir) -> tuple[bool, str | None]:
    """Whether region σ can be computed for this dataset (a toy dataset with masks), else the reason."""
    info_path = Path(data_dir) / "dataset.json"
    try:
        info = json.loads(info_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False, f"no dataset.json in {data_dir}"
    if info.get("name") != "toy":
        return False, (f"dataset {info.get('name')!r} has no object masks and no grey backgrounds: the object region "
                       "cannot be segmented offline (the paper used SAM)")
    return True, None


def mask_files(mask_dir, pairs: Sequence[tuple[int, int]]) -> tuple[dict | None, str | None]:
    """Object masks supplied for the generated mean images (e.g. made with SAM): ``mask_dir/class{c}_seed{s}.png``
    for every (class, sampling seed) pair. Returns ({pair: path}, None), or (None, the reason) when the folder or a
    file is missing."""
    d = Path(mask_dir)
    if not d.is_dir():
        return None, f"mask folder {d} does not exist"
    files = {(c, s): d / f"class{c}_seed{s}.png" for c, s in pairs}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        return None, f"{len(missing)} of {len(files)} masks missing in {d}, first {missing[0]}"
    return files, None


def read_mask(path, shape: tuple[int, int]) -> np.ndarray:
    """A mask PNG (any mode; a pixel is object when its grey value exceeds 127) of the σ map's shape."""
    from PIL import Image

    try:
        m = np.asarray(Image.open(path).convert("L")) > 127
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    if m.shape != tuple(shape):
        raise ValueError(f"{path}: mask is {m.shape[1]}x{m.shape[0]}, the σ map {shape[1]}x{shape[0]}")
    return m


# ------------------------------------------------------------------------------------------- image sets
@torch.no_grad()
def _generate_set(var, vae, labels_all: torch.Tensor, *, seed: int, batch_size: int, rate: float | None,
                  class_weights: torch.Tensor | None, cfg: float, top_k: int, top_p: float, more_smooth: bool,
                  desc: str, masks: str = "per_call") -> dict:
    """Class-major image set: batch b uses the sampling seed derive_seed(seed, 'sample', b) and, with a rate, the
    DropPath mask seed derive_seed(seed, 'droppath', b) (masks drawn as ``masks`` says). numpy uint8 NHWC images."""
    from varup.base.utils import progress
    from varup.data.folder import to_uint8
    from varup.tokenizer.tokens import token_dtype

    dev = var.lvl_1L.device
    top_k = min(int(top_k), var.V)
    images, tokens = [], []
    n = len(labels_all)
    bar = progress(total=n, desc=desc, unit="img")
    with eval_mode(var, vae):
        for b, s in enumerate(range(0, n, batch_size)):
            lab = labels_all[s:s + batch_size].to(dev)
            B = len(lab)
            w = class_weights.to(dev).view(1, -1).expand(B, -1) if class_weights is not None else None
            gen = make_generator(derive_seed(seed, "sample", b), dev)
            ctx = (mc_dropout(var, rate, B, make_generator(derive_seed(seed, "droppath", b), dev), masks=masks)
                   if rate is not None else contextlib.nullcontext())
            with ctx:
                o = sample(var, vae, lab, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, generator=gen,
                           class_weights=w)
            images.append(to_uint8(o.images.float().cpu()))
            tokens.append(torch.cat(o.tokens, 1).cpu().numpy().astype(token_dtype(var.V)))
            bar.update(B)
    bar.close()
    R = vae.resolution
    return {"images": np.concatenate(images) if images else np.zeros((0, R, R, 3), np.uint8),
            "labels": labels_all.cpu().numpy().astype(np.int64),
            "tokens": np.concatenate(tokens) if tokens else np.zeros((0, var.L), token_dtype(var.V))}


def _mean_sigma_of(var, vae, conditions: Sequence[tuple[Any, int]], readings: Sequence[str] = ("dropout",),
                   **kw) -> dict[str, list[float]]:
    """Per σ reading: the mean σ of the MC passes of each (condition, sampling seed)."""
    return {r: [float(sigma_map(mc_passes(var, vae, c, seed=s, reading=r, **kw))[1].mean()) for c, s in conditions]
            for r in readings}


def sigma_fields(per_reading: Mapping[str, list[float]], list_key: str) -> dict:
    """Record fields of the σ readings: ``<list_key>`` / ``mean_sigma`` (dropout) and ``<list_key>_samples`` /
    ``mean_sigma_samples`` (samples); a reading not computed is absent."""
    out: dict[str, Any] = {}
    for r, v in per_reading.items():
        out[sigma_key(r, list_key)] = v
        out[sigma_key(r)] = float(np.mean(v)) if v else None
    return out


def droppath_sweep(var, vae, *, rates: Sequence[float] = SWEEP_RATES, n_per_class: int, seed: int,
                   batch_size: int = 64, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                   more_smooth: bool = False, sigma_pairs: Sequence[tuple[int, int]] = ((0, 0),), T: int = 50,
                   device=None, masks: str = "per_call", readings: Sequence[str] = ("dropout",)) -> list[dict]:
    """Per rate: ``{'rate', 'images' (N,H,W,3) uint8, 'labels', 'tokens', 'pair_sigma', 'mean_sigma'}`` (and
    ``pair_sigma_samples``, ``mean_sigma_samples`` with the samples reading) -- an evaluation set with DropPath
    active (masks drawn as ``masks`` says) and the mean σ of MC passes of ``sigma_pairs`` ((class, sampling seed)
    pairs) at that rate, per σ reading in ``readings``."""
    _device(var, device)
    labels = class_major_labels(var.num_classes, n_per_class)
    out = []
    for rate in rates:
        s = _generate_set(var, vae, labels, seed=seed, batch_size=batch_size, rate=float(rate), class_weights=None,
                          cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, desc=f"droppath {rate:g}",
                          masks=masks)
        ps = _mean_sigma_of(var, vae, sigma_pairs, readings, T=T, rate=float(rate), cfg=cfg, top_k=top_k,
                            top_p=top_p, more_smooth=more_smooth, masks=masks)
        out.append({"rate": float(rate), **s, **sigma_fields(ps, "pair_sigma")})
    return out


def entangled_weights(num_classes: int, classes: Sequence[int]) -> torch.Tensor:
    """(num_classes+1,) float32: 1/len(classes) on each mixed class, 0 elsewhere (the null class included)."""
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("a class mix needs at least one class")
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate classes in the mix {classes}")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes {bad} are outside [0, {num_classes})")
    w = torch.zeros(num_classes + 1)
    w[classes] = 1.0 / len(classes)
    return w


def mix_name(mix: Sequence[int]) -> str:
    return "mix_" + "-".join(str(int(c)) for c in mix)


def rate_name(rate: float) -> str:
    return f"droppath_{float(rate):g}"


def entanglement_sets(var, vae, mixes: Sequence[Sequence[int]], n: int, seed: int, *, batch_size: int = 64,
                      cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
                      rate: float = 0.05, T: int = 50, sigma_seeds: Sequence[int] = (0,), device=None,
                      masks: str = "per_call", readings: Sequence[str] = ("dropout",)) -> list[dict]:
    """Per mix: ``{'mix', 'n_concepts', 'images' (n,H,W,3) uint8, 'labels', 'tokens', 'sigma_per_seed',
    'mean_sigma'}`` (and the ``_samples`` σ fields with that reading). ``labels`` are nominal (the mixed classes in
    turn, ``mix[i % len(mix)]``), so a class-balanced real reference of the mixed classes matches them; the images are
    all conditioned on the full mix and generated with DropPath at ``rate`` (``uncertainty.set_droppath_rate``: the
    study's 0.05; 0: off). σ: MC passes at ``rate`` under the mix, one per sampling seed in ``sigma_seeds``."""
    _device(var, device)
    out = []
    for mix in mixes:
        w = entangled_weights(var.num_classes, mix)
        labels = torch.tensor([int(mix[i % len(mix)]) for i in range(n)], dtype=torch.long)
        s = _generate_set(var, vae, labels, seed=seed, batch_size=batch_size, rate=float(rate) or None,
                          class_weights=w, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
                          desc=mix_name(mix), masks=masks)
        ps = _mean_sigma_of(var, vae, [(w, sd) for sd in sigma_seeds], readings, T=T, rate=rate, cfg=cfg,
                            top_k=top_k, top_p=top_p, more_smooth=more_smooth, masks=masks)
        out.append({"mix": [int(c) for c in mix], "n_concepts": len(mix), **s, **sigma_fields(ps, "sigma_per_seed")})
    return out


# ------------------------------------------------------------------------------------------- stage entry points
def _mc_pair(var, vae, dev, c: int, s: int, kw: Mapping[str, Any], readings: Sequence[str], region_ok: bool,
             mask_file) -> tuple[dict, dict]:
    """One (class, sampling seed) pair of :func:`run_mc_dropout`: its record and arrays (per reading: σ map and mean
    image; the ordinary sample; the object mask of the first reading's mean image or the supplied one, used for
    every reading's region σ)."""
    maps = {r: sigma_map(mc_passes(var, vae, c, seed=s, reading=r, **kw)) for r in readings}
    with eval_mode(var, vae):  # the ordinary sample: DropPath off, the dropout reading's sampling seed
        plain = sample(var, vae, torch.tensor([c], device=dev), cfg=kw["cfg"], top_k=min(kw["top_k"], var.V),
                       top_p=kw["top_p"], more_smooth=kw["more_smooth"],
                       generator=make_generator(derive_seed(s, "sample"), dev))
    mean0, sigma0 = maps[readings[0]]
    rec: dict[str, Any] = {"class": c, "sample_seed": s}
    if mask_file is not None:
        mask = read_mask(mask_file, sigma0.shape)
    else:
        mask = object_mask(mean0) if region_ok else np.zeros(sigma0.shape, bool)
    arrays = {"mask": mask, "sample": plain.images[0].float().cpu().numpy().transpose(1, 2, 0)}
    for r, (mean, sigma) in maps.items():
        rec[sigma_key(r)] = float(sigma.mean())
        if region_ok:
            rec[sigma_key(r, "region")] = region_sigma(sigma, mask)
        sfx = "" if r == readings[0] else f"_{r}"  # the NPZ's sigma / mean: the first reading (its ``reading``)
        arrays["sigma" + sfx], arrays["mean" + sfx] = sigma, mean.transpose(1, 2, 0)
    return rec, arrays


def _region_summary(recs: Sequence[dict], readings: Sequence[str]) -> dict:
    """Mean region σ over the pairs, per reading (``inside``/``outside``: dropout; ``inside_samples`` ...)."""
    out: dict[str, Any] = {"available": True}
    for r in readings:
        regs = [rec[sigma_key(r, "region")] for rec in recs]
        ins = [g["inside"] for g in regs if g["inside"] is not None]
        outs = [g["outside"] for g in regs if g["outside"] is not None]
        out[sigma_key(r, "inside")] = float(np.mean(ins)) if ins else None
        out[sigma_key(r, "outside")] = float(np.mean(outs)) if outs else None
        out["n_pairs_with_object"] = len(ins)
    return out


def run_mc_dropout(model, tokenizer, data_dir, out_json, out_npz, *, classes: Sequence[int], seeds: Sequence[int],
                   T: int = 50, rate: float = 0.1, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                   more_smooth: bool = False, device: str = "auto", meta: Mapping[str, Any] | None = None,
                   segmentation_images: int | None = 256, mask_dir=None, masks: str = "per_call",
                   sigma_reading: str = "dropout") -> dict:
    """σ maps for every (class, sampling seed) in classes x seeds, per σ reading (``sigma_reading``: dropout,
    samples or both); mean σ; region σ inside / outside the object of the generated mean image: masks from
    ``mask_dir`` when given (:func:`mask_files`), else segmented on toy datasets, else absent with the reason.
    Fields of the samples reading carry the suffix ``_samples`` (:func:`sigma_key`)."""
    from varup.base.utils import atomic_npz_save, atomic_write_json, write_provenance

    t0 = time.time()
    readings = readings_of(sigma_reading)
    pairs = [(int(c), int(s)) for c in classes for s in seeds]
    if not pairs:
        raise ValueError("no (class, seed) pairs: give at least one class and one seed")
    given = None
    if mask_dir is not None:
        given, reason = mask_files(mask_dir, pairs)
        ok = given is not None
    else:
        ok, reason = has_object_masks(data_dir)
    var, vae, dev = load_generator(model, tokenizer, device)
    kw = dict(T=T, rate=rate, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, masks=masks)
    done = [_mc_pair(var, vae, dev, c, s, kw, readings, ok, None if given is None else given[(c, s)])
            for c, s in pairs]
    recs = [r for r, _ in done]
    res: dict[str, Any] = {"kind": "mc_dropout", **dict(meta or {}), "rate": float(rate), "T": int(T),
                           "sigma_readings": list(readings), "droppath_masks": masks, "pairs": recs,
                           **{sigma_key(r): float(np.mean([x[sigma_key(r)] for x in recs])) for r in readings},
                           "params": {"cfg": cfg, "top_k": top_k, "top_p": top_p, "more_smooth": more_smooth,
                                      "classes": list(map(int, classes)), "sample_seeds": list(map(int, seeds)),
                                      "sigma": "mean over RGB of the per-channel population std over T passes, [0,1]",
                                      "seeds": "pass t: sampling derive_seed(s,'sample') (dropout reading) or "
                                               "derive_seed(s,'sample',t) (samples reading), mask derive_seed(s,'mc',t)",
                                      "droppath_masks": masks, "sigma_reading": sigma_reading}}
    if ok:
        res["region"] = _region_summary(recs, readings)
        if given is not None:
            res["region"]["segmentation"] = f"masks supplied in {mask_dir}"
        else:
            res["region"].update(segmentation="Otsu threshold on chroma (max-min RGB) of the generated mean image",
                                 segmentation_check=segmentation_check(data_dir, "val", segmentation_images))
    else:
        res["region"] = {"available": False, "reason": reason}
    arrays = {k: np.stack([a[k] for _, a in done]) for k in done[0][1]}
    atomic_npz_save(out_npz, **{k: v.astype(np.float32) if k != "mask" else v for k, v in arrays.items()},
                    classes=np.array([c for c, _ in pairs]), seeds=np.array([s for _, s in pairs]),
                    rate=np.array(float(rate)), T=np.array(int(T)), meta=np.array(json.dumps(dict(meta or {}))),
                    reading=np.array(readings[0]), droppath_masks=np.array(masks))
    atomic_write_json(out_json, res)
    write_provenance(out_json, config=res["params"], device=str(dev), started=t0)
    log.info("MC dropout: mean σ %s over %d pairs (rate %g, T %d, masks %s)",
             ", ".join(f"{r} {res[sigma_key(r)]:.4f}" for r in readings), len(pairs), rate, T, masks)
    return res


def _sigma_of_set(s: Mapping[str, Any]) -> dict:
    """The σ fields of a generated set (every reading's list and mean)."""
    return {k: v for k, v in s.items() if k.startswith(("pair_sigma", "sigma_per_seed", "mean_sigma"))}


def _set_params(**kw) -> np.ndarray:
    return np.array(json.dumps(kw, sort_keys=True))


def run_sweep_sets(model, tokenizer, out_dir, *, rates: Sequence[float] = SWEEP_RATES, n_per_class: int, seed: int,
                   batch_size: int = 64, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                   more_smooth: bool = False, sigma_pairs: Sequence[Sequence[int]] = ((0, 0),), T: int = 50,
                   device: str = "auto", meta: Mapping[str, Any] | None = None, masks: str = "per_call",
                   sigma_reading: str = "dropout") -> dict:
    """``out_dir/droppath_<rate>.npz`` per rate (the sample-stage format) and ``out_dir/sweep.json`` (σ per reading
    of ``sigma_reading``; DropPath masks drawn as ``masks`` says)."""
    from varup.base.utils import atomic_npz_save, atomic_write_json, write_provenance

    t0 = time.time()
    var, vae, dev = load_generator(model, tokenizer, device)
    out_dir = Path(out_dir)
    pairs = [(int(c), int(s)) for c, s in sigma_pairs]
    sets = droppath_sweep(var, vae, rates=rates, n_per_class=n_per_class, seed=seed, batch_size=batch_size, cfg=cfg,
                          top_k=top_k, top_p=top_p, more_smooth=more_smooth, sigma_pairs=pairs, T=T, masks=masks,
                          readings=readings_of(sigma_reading))
    entries = []
    for s in sets:
        name = rate_name(s["rate"]) + ".npz"
        atomic_npz_save(out_dir / name, images=s["images"], labels=s["labels"], tokens=s["tokens"],
                        params=_set_params(kind="droppath", rate=s["rate"], n_per_class=n_per_class, seed=seed,
                                           batch_size=batch_size, cfg=cfg, top_k=top_k, top_p=top_p,
                                           more_smooth=more_smooth, droppath_masks=masks))
        entries.append({"rate": s["rate"], "set": name, "n_images": int(len(s["images"])),
                        **_sigma_of_set(s), "fidelity": None})
    res = {"kind": "droppath_sweep", **dict(meta or {}), "rates": entries, "T": int(T), "sigma_pairs": pairs,
           "sigma_readings": list(readings_of(sigma_reading)), "droppath_masks": masks,
           "params": {"n_per_class": n_per_class, "seed": seed, "batch_size": batch_size, "cfg": cfg, "top_k": top_k,
                      "top_p": top_p, "more_smooth": more_smooth, "droppath_masks": masks,
                      "sigma_reading": sigma_reading}}
    atomic_write_json(out_dir / "sweep.json", res)
    write_provenance(out_dir / "sweep.json", config=res["params"], device=str(dev), started=t0)
    return res


def run_entanglement_sets(model, tokenizer, out_dir, *, mixes: Sequence[Sequence[int]] = ENTANGLEMENT_MIXES, n: int,
                          seed: int, batch_size: int = 64, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                          more_smooth: bool = False, rate: float = 0.05, T: int = 50,
                          sigma_seeds: Sequence[int] = (0,), device: str = "auto",
                          meta: Mapping[str, Any] | None = None, masks: str = "per_call",
                          sigma_reading: str = "dropout") -> dict:
    """``out_dir/mix_<a>-<b>.npz`` per mix (images, nominal labels, tokens, mix, params) and
    ``out_dir/entanglement.json``. Score each set against the real images of its mixed classes. ``rate``: the
    DropPath rate of the sets and their σ (``uncertainty.set_droppath_rate``)."""
    from varup.base.utils import atomic_npz_save, atomic_write_json, write_provenance

    t0 = time.time()
    var, vae, dev = load_generator(model, tokenizer, device)
    out_dir = Path(out_dir)
    sets = entanglement_sets(var, vae, mixes, n, seed, batch_size=batch_size, cfg=cfg, top_k=top_k, top_p=top_p,
                             more_smooth=more_smooth, rate=rate, T=T, sigma_seeds=sigma_seeds, masks=masks,
                             readings=readings_of(sigma_reading))
    entries = []
    for s in sets:
        name = mix_name(s["mix"]) + ".npz"
        atomic_npz_save(out_dir / name, images=s["images"], labels=s["labels"], tokens=s["tokens"],
                        mix=np.array(s["mix"]),
                        params=_set_params(kind="entanglement", mix=s["mix"], n=n, seed=seed, batch_size=batch_size,
                                           cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
                                           rate=float(rate), droppath_masks=masks))
        entries.append({"mix": s["mix"], "n_concepts": s["n_concepts"], "set": name, "n_images": int(len(s["images"])),
                        **_sigma_of_set(s), "fidelity": None})
    res = {"kind": "entanglement", **dict(meta or {}), "mixes": entries, "rate": float(rate), "T": int(T),
           "sigma_seeds": list(map(int, sigma_seeds)), "sigma_readings": list(readings_of(sigma_reading)),
           "droppath_masks": masks,
           "params": {"n": n, "seed": seed, "batch_size": batch_size, "cfg": cfg, "top_k": top_k, "top_p": top_p,
                      "more_smooth": more_smooth, "rate": float(rate), "droppath_masks": masks,
                      "sigma_reading": sigma_reading}}
    atomic_write_json(out_dir / "entanglement.json", res)
    write_provenance(out_dir / "entanglement.json", config=res["params"], device=str(dev), started=t0)
    return res


def real_rows_for_mix(labels: np.ndarray, mix: Sequence[int]) -> np.ndarray:
    """Indices of real images (e.g. of a real feature set's ``meta['labels']``) whose class is in ``mix``."""
    return np.flatnonzero(np.isin(np.asarray(labels), np.asarray(list(mix))))


__all__ = ["mc_passes", "sigma_map", "region_sigma", "object_mask", "iou", "segmentation_check", "has_object_masks", "droppath_sweep", "entangled_weights", "entanglement_sets", "mix_name", "rate_name", "real_rows_for_mix", "run_mc_dropout", "run_sweep_sets", "run_entanglement_sets", "SWEEP_RATES", "ENTANGLEMENT_MIXES", "SIGMA_READINGS", "readings_of", "sigma_key", "noise_seed", "sigma_fields"]
