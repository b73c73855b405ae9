"""Sample-quality metrics from saved Inception features (no second Inception pass), using torch-fidelity's own
metric functions (FID, KID, precision/recall, Inception Score) and the ``prdc`` package; plus clean-FID through
clean-fid with our offline weights.

Convention, as in torch-fidelity: ``gen`` is input 1 (generated), ``real`` is input 2 (reference).
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import (
    KEY_METRIC_F_SCORE,
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    prc_features_to_metric,
)

from varup.config.sizes import min_set_size
from varup.metrics.inception import ISC_UNAVAILABLE, load_inception

NO_LOGITS_REASON = "no logits_unbiased features were extracted for the generated set"


def _pool(feats: dict, name: str) -> torch.Tensor:
    if feats.get("pool") is None:
        raise KeyError(f"{name} features have no 'pool' entry")
    x = np.asarray(feats["pool"], dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} pool features must be 2-D (n, d), got shape {x.shape}")
    return torch.from_numpy(x)


def fidelity_metrics(gen: dict, real: dict, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
                     prc_neighborhood: int = 3, prdc_nearest_k: int = 5, seed: int = 2020, isc_splits: int = 10,
                     isc_unavailable_reason: str | None = None) -> dict:
    """FID, KID, precision/recall (torch-fidelity), PRDC (Naeem et al.) and, when ``gen['logits_unbiased']`` exists,
    the Inception Score, from feature dicts as returned by ``extract_features``.

    ``kid_subset_size`` is clamped to ``min(n_gen, n_real)`` and the value used is returned; ``isc_splits`` is
    clamped to ``n_gen``. Without logits ``isc_mean``/``isc_std`` are None and ``isc_unavailable_reason`` says why.
    All numbers are plain Python floats/ints.
    """
    g, r = _pool(gen, "generated"), _pool(real, "real")
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"feature dimensions differ: generated {g.shape[1]}, real {r.shape[1]}")
    n_gen, n_real = len(g), len(r)
    need = min_set_size(prc_neighborhood, prdc_nearest_k)
    if min(n_gen, n_real) < need:
        raise ValueError(f"need at least {need} samples per set (have generated {n_gen}, real {n_real})")

    out: dict = {"n_gen": n_gen, "n_real": n_real, "seed": seed}
    fid = fid_statistics_to_metric(fid_features_to_statistics(g), fid_features_to_statistics(r), verbose=False)
    out["fid"] = float(fid[KEY_METRIC_FID])

    subset = min(kid_subset_size, n_gen, n_real)
    kid = kid_features_to_metric(g, r, kid_subsets=kid_subsets, kid_subset_size=subset, rng_seed=seed, verbose=False)
    out.update(kid_mean=float(kid[KEY_METRIC_KID_MEAN]), kid_std=float(kid[KEY_METRIC_KID_STD]),
               kid_subsets=kid_subsets, kid_subset_size=subset, kid_subset_size_requested=kid_subset_size)

    prc = prc_features_to_metric(g, r, prc_neighborhood=prc_neighborhood, save_cpu_ram=False, verbose=False)
    out.update(precision=float(prc[KEY_METRIC_PRECISION]), recall=float(prc[KEY_METRIC_RECALL]),
               f_score=float(prc[KEY_METRIC_F_SCORE]), prc_neighborhood=prc_neighborhood)

    out.update(prdc_metrics(g.numpy(), r.numpy(), prdc_nearest_k))
    out.update(_inception_score(gen.get("logits_unbiased"), isc_splits, seed, isc_unavailable_reason))
    return out


def prdc_metrics(gen_pool: np.ndarray, real_pool: np.ndarray, nearest_k: int = 5) -> dict:
    """Precision, recall, density, coverage (``prdc.compute_prdc``; its progress prints are silenced)."""
    from prdc import compute_prdc

    with contextlib.redirect_stdout(io.StringIO()):
        res = compute_prdc(real_features=real_pool, fake_features=gen_pool, nearest_k=nearest_k)
    return {"prdc_precision": float(res["precision"]), "prdc_recall": float(res["recall"]),
            "prdc_density": float(res["density"]), "prdc_coverage": float(res["coverage"]),
            "prdc_nearest_k": nearest_k}


def _inception_score(logits: np.ndarray | None, splits: int, seed: int, reason: str | None) -> dict:
    if logits is None:
        return {"isc_mean": None, "isc_std": None, "isc_splits": None,
                "isc_unavailable_reason": reason or f"{NO_LOGITS_REASON} ({ISC_UNAVAILABLE})"}
    logits = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    splits = min(splits, len(logits))
    isc = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=seed)
    return {"isc_mean": float(isc[KEY_METRIC_ISC_MEAN]), "isc_std": float(isc[KEY_METRIC_ISC_STD]),
            "isc_splits": splits, "isc_unavailable_reason": None}


# ------------------------------------------------------------------------------------------ clean-fid
def _write_pngs(images: np.ndarray, folder: Path) -> None:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N,H,W,3), got {images.dtype} {images.shape}")
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:06d}.png")


def _clean_model(extractor, mode: str):
    if mode == "clean":
        return extractor.resized_input_module()
    if mode == "legacy_tensorflow":
        def model(x: torch.Tensor) -> torch.Tensor:  # PNG pixels arrive as exact integers in a float tensor
            return torch.from_numpy(extractor.extract(x.round().clamp(0, 255).to(torch.uint8))["pool"]).float()
        return model
    raise ValueError(f"clean-FID supports mode 'clean' or 'legacy_tensorflow', not {mode!r}")


def clean_fid_features(images_uint8: np.ndarray, inception_info: dict | str | os.PathLike, *, mode: str = "clean",
                       batch_size: int = 50, device: str = "cpu", num_workers: int = 0) -> np.ndarray:
    """clean-fid's own feature pipeline (``cleanfid.fid.get_folder_features``: PIL-bicubic float resize to 299x299
    in 'clean' mode) over PNGs of ``images_uint8``, with our Inception weights as the model, so nothing is
    downloaded. Real-set features are computed once and reused by every run."""
    from cleanfid import fid as cfid

    model = _clean_model(load_inception(inception_info, device=device), mode)
    with tempfile.TemporaryDirectory(prefix="varup-cleanfid-") as tmp:
        _write_pngs(images_uint8, Path(tmp) / "img")
        with contextlib.redirect_stdout(io.StringIO()):
            return cfid.get_folder_features(str(Path(tmp) / "img"), model=model, num_workers=num_workers,
                                            batch_size=batch_size, device=torch.device(device), mode=mode,
                                            verbose=False)


def clean_fid_from_features(gen_feats: np.ndarray, real_feats: np.ndarray) -> float:
    """clean-fid's Fréchet distance (``cleanfid.fid.fid_from_feats``) between two feature sets."""
    from cleanfid import fid as cfid

    return float(np.real(cfid.fid_from_feats(gen_feats, real_feats)))


def clean_fid_score(gen_uint8: np.ndarray, real_uint8: np.ndarray, inception_info: dict | str | os.PathLike, *,
                    mode: str = "clean", batch_size: int = 50, device: str = "cpu", num_workers: int = 0) -> float:
    """FID computed by clean-fid (``cleanfid.fid.compute_fid`` on two temporary PNG folders) with our Inception
    weights passed as ``custom_feat_extractor``, so clean-fid downloads nothing.

    ``mode='clean'``: clean-fid's PIL-bicubic float resize to 299x299, then the Inception layers.
    ``mode='legacy_tensorflow'``: no outside resize; torch-fidelity's TF1-bilinear resize inside the network (this
    reproduces torch-fidelity's FID up to the matrix square-root method). Other modes need other networks.
    """
    from cleanfid import fid as cfid

    model = _clean_model(load_inception(inception_info, device=device), mode)
    with tempfile.TemporaryDirectory(prefix="varup-cleanfid-") as tmp:
        _write_pngs(gen_uint8, Path(tmp) / "gen")
        _write_pngs(real_uint8, Path(tmp) / "real")
        with contextlib.redirect_stdout(io.StringIO()):
            score = cfid.compute_fid(str(Path(tmp) / "gen"), str(Path(tmp) / "real"), mode=mode,
                                     custom_feat_extractor=model, batch_size=batch_size,
                                     device=torch.device(device), num_workers=num_workers, verbose=False,
                                     use_dataparallel=False)
    return float(np.real(score))


def fidelity_with_settings(gen, real, params: dict, info: dict) -> dict:
    """:func:`varup.metrics.fidelity.fidelity_metrics` of generated against real features, with the ``metrics``
    settings in ``params`` and the Inception weights' ``info``."""
    return fidelity_metrics(gen, real, kid_subsets=params.get("kid_subsets", 100),
                            kid_subset_size=params.get("kid_subset_size", 1000),
                            prc_neighborhood=params.get("prc_neighborhood", 3),
                            prdc_nearest_k=params.get("prdc_nearest_k", 5),
                            isc_unavailable_reason=info.get("isc_unavailable_reason"))
