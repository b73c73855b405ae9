"""Fréchet distance, KID and precision/recall in the feature space of the toy mode classifier, computed by
torch-fidelity's own machinery.

Why: Inception-FID of 32 px images upsampled to 299 px measures mostly blur. On the toy dataset a network trained on
the toy images themselves gives a feature space that sees what the toy is made of (shape, colour, size,
background): the penultimate layer of :class:`varup.models.modeclf.ModeClassifier` (:meth:`~varup.models.modeclf.ModeClassifier.embed`,
the ``4 * width``-d global mean and max of its last conv block; 128-d at the default width 32).

How: :class:`ModeClassifierFeatures` is a torch-fidelity ``FeatureExtractorBase`` registered under
:data:`FEATURE_EXTRACTOR`; it loads the classifier file passed as ``feature_extractor_weights_path``.
:func:`toy_feature_metrics` calls ``torch_fidelity.calculate_metrics`` with two :class:`UInt8Images` datasets
(input1 = generated, input2 = real, torch-fidelity's convention: precision = share of generated samples inside the
real manifold, recall = the converse), ``fid``, ``kid`` and ``prc`` on the layer :data:`FEATURE_LAYER`, and
``cache=False``: torch-fidelity keys its cache by input name only and never invalidates it, and a small CNN's
features cost milliseconds, so nothing is cached.

Stages (workflow entry points):

* :func:`run_toy_metrics` -- one run's samples against the metrics' real reference set (the same class-balanced
  ``metrics_real_split`` subset of ``real_max_images`` as the Inception metrics) -> ``toy_metrics.json``;
* :func:`run_toy_floor` -- once per dataset, the same metrics (and, optionally, the Inception FID/KID/P/R) of a real
  set of the sample size, DISJOINT from the reference (:func:`floor_rows`), against the reference: the score of a
  perfect generator at this sample size -> ``toy_metrics_floor.json``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Mapping

import numpy as np
import torch
from torch_fidelity import calculate_metrics
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.metric_fid import KEY_METRIC_FID
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD
from torch_fidelity.metric_prc import KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from varup.config.sizes import min_set_size
from varup.models.modeclf import load_mode_classifier

log = logging.getLogger("varup.metrics.toyfeatures")

FEATURE_EXTRACTOR = "varup-mode-classifier"
FEATURE_LAYER = "penultimate"


class ModeClassifierFeatures(FeatureExtractorBase):
    """torch-fidelity feature extractor: uint8 (B, 3, H, W) -> ``(features,)``, the float64 penultimate features of
    the mode classifier saved at ``feature_extractor_weights_path`` (:meth:`varup.models.modeclf.ModeClassifier.embed`)."""

    def __init__(self, name: str, features_list, feature_extractor_weights_path: str | None = None, **kwargs):
        super().__init__(name, features_list)
        vassert(feature_extractor_weights_path is not None,
                f"{FEATURE_EXTRACTOR} needs feature_extractor_weights_path: a mode_classifier.pt file")
        self.classifier = load_mode_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return (FEATURE_LAYER,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return FEATURE_LAYER

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        ok = torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
        vassert(ok, f"expected uint8 (B, 3, H, W) input, got {getattr(x, 'dtype', type(x))} "
                    f"{tuple(getattr(x, 'shape', ()))}")
        return (self.classifier.embed(x.float()).double(),)


def register() -> str:
    """Register :class:`ModeClassifierFeatures` with torch-fidelity (once per process); returns its name."""
    if FEATURE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(FEATURE_EXTRACTOR, ModeClassifierFeatures)
    return FEATURE_EXTRACTOR


register()


class UInt8Images(torch.utils.data.Dataset):
    """A uint8 (N, H, W, 3) array as torch-fidelity input: item i is the uint8 (3, H, W) tensor of image i."""

    def __init__(self, images: np.ndarray):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].contiguous()


def toy_feature_metrics(gen_uint8: np.ndarray, real_uint8: np.ndarray, classifier, *, kid_subsets: int = 100,
                        kid_subset_size: int = 1000, prc_neighborhood: int = 3, seed: int = 2020,
                        batch_size: int = 256, device: str = "cpu") -> dict:
    """toy-FD, toy-KID (mean and std over ``kid_subsets`` random subsets) and toy-precision/recall of ``gen_uint8``
    against ``real_uint8`` (uint8 (N, H, W, 3) arrays) from ``torch_fidelity.calculate_metrics`` with the mode
    classifier file ``classifier`` as feature extractor. ``kid_subset_size`` is clamped to the smaller set and the
    value used returned. Plain floats and ints."""
    gen, real = UInt8Images(gen_uint8), UInt8Images(real_uint8)
    need = min_set_size(prc_neighborhood, 0)
    if min(len(gen), len(real)) < need:
        raise ValueError(f"need at least {need} images per set (have generated {len(gen)}, real {len(real)})")
    subset = min(kid_subset_size, len(gen), len(real))
    dev = torch.device(device)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        m = calculate_metrics(input1=gen, input2=real, feature_extractor=register(), feature_layer_fid=FEATURE_LAYER,
                              feature_layer_kid=FEATURE_LAYER, feature_layer_prc=FEATURE_LAYER,
                              feature_extractor_weights_path=str(classifier), fid=True, kid=True, prc=True,
                              cache=False, cuda=dev.type == "cuda", batch_size=batch_size, kid_subsets=kid_subsets,
                              kid_subset_size=subset, prc_neighborhood=prc_neighborhood, rng_seed=seed,
                              save_cpu_ram=True, verbose=False)
    return {"fd": float(m[KEY_METRIC_FID]), "kid_mean": float(m[KEY_METRIC_KID_MEAN]),
            "kid_std": float(m[KEY_METRIC_KID_STD]), "precision": float(m[KEY_METRIC_PRECISION]),
            "recall": float(m[KEY_METRIC_RECALL]), "f_score": float(m[KEY_METRIC_F_SCORE]), "n_gen": len(gen),
            "n_real": len(real), "kid_subsets": kid_subsets, "kid_subset_size": subset,
            "prc_neighborhood": prc_neighborhood, "seed": seed}


def feature_space(classifier) -> dict:
    """What the features are, for the JSON records: extractor, layer, dimension, the classifier file and its hash."""
    from varup.base.utils import sha256_file

    model = load_mode_classifier(classifier)
    return {"extractor": FEATURE_EXTRACTOR, "layer": FEATURE_LAYER, "dim": int(model.feature_dim),
            "definition": "varup.models.modeclf.ModeClassifier.embed: [global mean, global max] of the last conv block",
            "classifier": str(classifier), "classifier_sha256": sha256_file(classifier),
            "classifier_val_accuracy": model.val_accuracy}


def _metric_kw(params: Mapping[str, Any]) -> dict:
    p = {"kid_subsets": 100, "kid_subset_size": 1000, "prc_neighborhood": 3, "batch_size": 256, **params}
    return {k: int(p[k]) for k in ("kid_subsets", "kid_subset_size", "prc_neighborhood", "batch_size")}


def toy_reference(data_dir, params: Mapping[str, Any]) -> tuple[np.ndarray, dict]:
    """The metrics' real reference set (the rows ``real_features`` uses) and its description."""
    from varup.data.subsets import load_rows, real_subset

    split = params.get("split", "val")
    rows, keep = real_subset(data_dir, split, params.get("max_images"))
    images, _ = load_rows(data_dir, rows, keep, int(params["resolution"]))
    return images, {"split": split, "n": int(len(keep)), "indices": keep.tolist()}


def run_toy_metrics(classifier, samples_npz, data_dir, out_json, *, params: Mapping[str, Any],
                    meta: Mapping[str, Any] | None = None, device: str = "cpu") -> dict:
    """One run's toy-feature metrics: its samples (``images`` of ``samples_npz``) against the real reference set
    (``params``: ``split``, ``max_images``, ``resolution`` and the metric settings of :func:`toy_feature_metrics`).
    Writes and returns ``{'kind': 'toy_metrics', **meta, 'toy': {...}, 'reference', 'feature_space', ...}``."""
    from varup.base.utils import atomic_write_json, sha256_file, write_provenance

    t0 = time.time()
    with np.load(samples_npz) as z:
        images = z["images"]
    real, ref = toy_reference(data_dir, params)
    toy = toy_feature_metrics(images, real, classifier, device=device, **_metric_kw(params))
    res = {"kind": "toy_metrics", **dict(meta or {}), "toy": toy, "reference": ref,
           "feature_space": feature_space(classifier), "samples_sha256": sha256_file(samples_npz)}
    atomic_write_json(out_json, res)
    write_provenance(out_json, config=dict(params), started=t0)
    log.info("toy-FD %.3f toy-KID %.4f toy-P %.3f toy-R %.3f (%d samples vs %d real)", toy["fd"], toy["kid_mean"],
             toy["precision"], toy["recall"], toy["n_gen"], toy["n_real"])
    return res


# ------------------------------------------------------------------------------------------------ floor
def per_class_subset(labels: np.ndarray, n_per_class: int, exclude=()) -> np.ndarray:
    """Sorted indices of the first ``n_per_class`` items of every class that are not in ``exclude`` (deterministic);
    a class with fewer such items is an error."""
    labels = np.asarray(labels)
    free = np.setdiff1d(np.arange(len(labels)), np.asarray(list(exclude), dtype=np.int64))
    out = []
    for c in np.unique(labels):
        idx = free[labels[free] == c]
        if len(idx) < n_per_class:
            raise ValueError(f"class {c} has {len(idx)} free images, fewer than the {n_per_class} the floor needs")
        out.append(idx[:n_per_class])
    return np.sort(np.concatenate(out))


def floor_rows(data_dir, *, reference_split: str, floor_split: str, n_per_class: int,
               max_images: int | None) -> tuple[list[dict], np.ndarray, list[dict], np.ndarray]:
    """(reference rows, reference indices, floor rows, floor indices): the metrics' reference set and a
    class-balanced floor set of ``n_per_class`` images per class from ``floor_split``, with no image of the
    reference (when both come from one split its reference indices are excluded). Raises if any image file is in
    both sets."""
    from varup.data.subsets import real_subset

    ref_rows, ref_keep = real_subset(data_dir, reference_split, max_images)
    fl_rows, _ = real_subset(data_dir, floor_split, None)
    exclude = ref_keep if floor_split == reference_split else ()
    fl_keep = per_class_subset(np.array([r["label"] for r in fl_rows]), n_per_class, exclude)
    shared = {ref_rows[i]["path"] for i in ref_keep} & {fl_rows[i]["path"] for i in fl_keep}
    if shared:
        raise ValueError(f"floor and reference sets share {len(shared)} images, e.g. {sorted(shared)[0]}")
    return ref_rows, ref_keep, fl_rows, fl_keep


def inception_floor_scores(images: np.ndarray, inception_json, real_features_path, ref: dict, params,
                           device) -> dict:
    """Inception FID/KID/P/R (and PRDC) of ``images`` (a real floor set) against the saved real features of the
    reference ``ref`` (one Inception pass), with the ``metrics`` settings in ``params``."""
    from varup.base.utils import read_json
    from varup.metrics.features import extract_features, load_features
    from varup.metrics.fidelity import fidelity_with_settings
    from varup.metrics.inception import load_inception

    real, meta = load_features(real_features_path)
    if meta.get("split") != ref["split"] or meta.get("n") != ref["n"]:
        raise ValueError(f"{real_features_path}: real features of {meta.get('n')} {meta.get('split')} images, but "
                         f"the reference set is {ref['n']} {ref['split']} images; re-run rule real_features")
    info = read_json(inception_json)
    gen = extract_features(images, load_inception(inception_json, device),
                           batch_size=int(params.get("batch_size", 64)), desc="floor features")
    return {**fidelity_with_settings(gen, real, dict(params), info), "inception_source": info.get("source")}


def reconstruction_ceiling(floor_uint8: np.ndarray, real_uint8: np.ndarray, tokenizer, classifier, params,
                           device: str = "cpu") -> dict:
    """The floor set encoded and decoded by the tokenizer, scored against the reference like a run's samples: what a
    generator that reproduced the token maps of real images exactly would get, the ceiling the tokenizer sets for
    every run trained on its tokens."""
    from varup.models.vqvae import load_vqvae
    from varup.tokenizer.gate import reconstruct_uint8

    vae = load_vqvae(tokenizer, map_location=device).eval()
    x = torch.from_numpy(floor_uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
    rec = reconstruct_uint8(vae, x)
    return {"tokenizer": str(tokenizer), "n": int(len(rec)),
            "toy": toy_feature_metrics(rec, real_uint8, classifier, device=device, **_metric_kw(params))}


def run_toy_floor(classifier, data_dir, out_json, *, params: Mapping[str, Any], dataset: str | None = None,
                  inception_json=None, real_features_path=None, tokenizer=None, device: str = "cpu") -> dict:
    """The "real vs real" floor of one dataset: a class-balanced set of ``params['n_per_class']`` images per class
    from ``params['floor_split']`` (:func:`floor_rows`: disjoint from the reference) scored against the reference
    like a run's samples, in the toy feature space and (with ``inception_json`` and ``real_features_path``) by
    Inception; with ``tokenizer``, also the tokenizer's reconstructions of the floor set
    (:func:`reconstruction_ceiling`). Writes and returns ``{'kind': 'toy_metrics_floor', 'dataset', 'toy',
    'inception' (or None, with 'inception_reason'), 'reconstruction' (or None), 'floor_set', 'reference',
    'feature_space'}``."""
    from varup.base.utils import atomic_write_json, write_provenance
    from varup.data.subsets import load_rows

    t0 = time.time()
    ref_rows, ref_keep, fl_rows, fl_keep = floor_rows(
        data_dir, reference_split=params.get("split", "val"), floor_split=params.get("floor_split", "train"),
        n_per_class=int(params["n_per_class"]), max_images=params.get("max_images"))
    res_px = int(params["resolution"])
    real, _ = load_rows(data_dir, ref_rows, ref_keep, res_px)
    floor, _ = load_rows(data_dir, fl_rows, fl_keep, res_px)
    ref = {"split": params.get("split", "val"), "n": int(len(ref_keep)), "indices": ref_keep.tolist()}
    res: dict = {"kind": "toy_metrics_floor", "dataset": dataset,
                 "toy": toy_feature_metrics(floor, real, classifier, device=device, **_metric_kw(params)),
                 "floor_set": {"split": params.get("floor_split", "train"), "n": int(len(fl_keep)),
                               "n_per_class": int(params["n_per_class"]), "indices": fl_keep.tolist()},
                 "reference": ref, "feature_space": feature_space(classifier), "inception": None}
    if inception_json and real_features_path:
        res["inception"] = inception_floor_scores(floor, inception_json, real_features_path, ref, params, device)
    else:
        res["inception_reason"] = "disabled (metrics.toy_features.floor_inception = false)"
    res["reconstruction"] = (reconstruction_ceiling(floor, real, tokenizer, classifier, params, device)
                             if tokenizer else None)
    atomic_write_json(out_json, res)
    write_provenance(out_json, config=dict(params), started=t0)
    log.info("floor (%d %s vs %d %s images): toy-FD %.3f, Inception FID %s; tokenizer reconstructions: toy-FD %s",
             len(fl_keep), res["floor_set"]["split"], ref["n"], ref["split"], res["toy"]["fd"],
             res["inception"] and round(res["inception"]["fid"], 2),
             res["reconstruction"] and round(res["reconstruction"]["toy"]["fd"], 3))
    return res


__all__ = ["FEATURE_EXTRACTOR", "FEATURE_LAYER", "ModeClassifierFeatures", "register", "UInt8Images",
           "toy_feature_metrics", "feature_space", "toy_reference", "run_toy_metrics", "per_class_subset", "floor_rows",
           "reconstruction_ceiling", "run_toy_floor", "inception_floor_scores"]
