"""Sample-quality metrics from saved Inception features (no second Inception pass), using torch-fidelity's own
metric functions (FID, KID, Inception Score); precision/recall as torch-fidelity computes them and PRDC as the
``prdc`` package computes them, both in blocks (no N x N matrix: at 50k samples torch-fidelity's full path holds
three 50k x 50k float64 matrices, 20 GB each, and ``prdc`` three more); plus clean-FID through clean-fid's own
resizer and feature loop with our offline weights, in memory (no PNG round trip).

Convention, as in torch-fidelity: ``gen`` is input 1 (generated), ``real`` is input 2 (reference).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.utils.data
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

from varup.config.sizes import min_set_size
from varup.metrics.inception import ISC_UNAVAILABLE, load_inception

NO_LOGITS_REASON = "no logits_unbiased features were extracted for the generated set"
PRDC_SLICES = 8  # prdc computes its distances with n_jobs=8: scikit-learn splits the columns into 8 slices
PRDC_BLOCK = 1 << 25  # distances per block of PRDC rows (~256 MB in float64)


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
    """FID, KID, precision/recall (torch-fidelity's, :func:`prc_metrics`), PRDC (Naeem et al.,
    :func:`prdc_metrics`) and, when ``gen['logits_unbiased']`` exists,
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

    prc = prc_metrics(g, r, prc_neighborhood)
    out.update(precision=float(prc["precision"]), recall=float(prc["recall"]), f_score=float(prc["f_score"]),
               prc_neighborhood=prc_neighborhood)

    out.update(prdc_metrics(g.numpy(), r.numpy(), prdc_nearest_k))
    out.update(_inception_score(gen.get("logits_unbiased"), isc_splits, seed, isc_unavailable_reason))
    return out


def prdc_metrics(gen_pool: np.ndarray, real_pool: np.ndarray, nearest_k: int = 5, *,
                 chunk_rows: int | None = None) -> dict:
    """Precision, recall, density and coverage (Naeem et al. 2020) as the ``prdc`` package's ``compute_prdc``
    defines and computes them, without its N x N matrices: the distances come in blocks of ``chunk_rows`` rows
    (default: about 32 M distances a block, ~670 rows at 50k), so memory is O(chunk_rows * N).

    The same arithmetic as ``prdc``: scikit-learn's Euclidean distances (``|x|^2 - 2 x.y + |y|^2``, clipped at 0,
    float32 features upcast as scikit-learn does) over the same 8 column slices (``prdc`` passes ``n_jobs=8``), the
    self distances set to 0, a point's radius the (k+1)-th smallest distance to its own set (itself included),
    ``<`` comparisons. Tests compare it with ``prdc.compute_prdc``."""
    real, fake = np.asarray(real_pool), np.asarray(gen_pool)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"PRDC needs (n, d) feature sets of one width, got real {real.shape}, generated {fake.shape}")
    if min(len(real), len(fake)) < nearest_k + 2:
        raise ValueError(f"PRDC with nearest_k {nearest_k} needs at least {nearest_k + 2} samples per set "
                         f"(have generated {len(fake)}, real {len(real)})")
    rows = chunk_rows or max(1, PRDC_BLOCK // max(len(real), len(fake)))
    real_radii = _kth_neighbour_radii(real, nearest_k, rows)
    fake_radii = _kth_neighbour_radii(fake, nearest_k, rows)
    inside = np.zeros(len(fake), bool)  # precision: a fake point inside some real ball
    counts = np.zeros(len(fake), np.int64)  # density: how many real balls hold it
    recall = np.zeros(len(real), bool)
    covered = np.zeros(len(real), bool)
    for a, d in _distance_rows(real, fake, rows):
        r = real_radii[a:a + len(d), None]
        in_ball = d < r
        inside |= in_ball.any(axis=0)
        counts += in_ball.sum(axis=0)
        recall[a:a + len(d)] = (d < fake_radii[None, :]).any(axis=1)
        covered[a:a + len(d)] = d.min(axis=1) < r[:, 0]
    return {"prdc_precision": float(inside.mean()), "prdc_recall": float(recall.mean()),
            "prdc_density": float((1.0 / float(nearest_k)) * counts.mean()), "prdc_coverage": float(covered.mean()),
            "prdc_nearest_k": nearest_k}


def _distance_rows(x: np.ndarray, y: np.ndarray, rows: int, *, same: bool = False):
    """(start, block): scikit-learn's Euclidean distances from ``rows`` rows of ``x`` at a time to all of ``y``,
    each block assembled from ``prdc``'s 8 column slices of ``y``; ``same``: y is x, its self distances set to 0."""
    from sklearn.metrics.pairwise import euclidean_distances
    from sklearn.utils import gen_even_slices

    slices = list(gen_even_slices(len(y), PRDC_SLICES))
    for a in range(0, len(x), rows):
        block = x[a:a + rows]
        d = np.concatenate([euclidean_distances(block, y[s]) for s in slices], axis=1)
        if same:
            d[np.arange(len(block)), np.arange(a, a + len(block))] = 0
        yield a, d


def _kth_neighbour_radii(x: np.ndarray, nearest_k: int, rows: int) -> np.ndarray:
    """Each point's distance to its k-th nearest neighbour in its own set: the (k+1)-th smallest of its distances,
    the zero to itself included (``prdc``'s ``compute_nearest_neighbour_distances``)."""
    radii = np.empty(len(x), dtype=np.result_type(x.dtype, np.float32))
    for a, d in _distance_rows(x, x, rows, same=True):
        radii[a:a + len(d)] = np.partition(d, nearest_k, axis=1)[:, nearest_k]
    return radii


def prc_metrics(gen: torch.Tensor, real: torch.Tensor, neighborhood: int = 3, batch_size: int | None = None) -> dict:
    """torch-fidelity's precision, recall and F-score (Kynkäänniemi et al. 2019; ``prc_features_to_metric`` with
    ``save_cpu_ram=False``) without its three N x N matrices: the same ``torch.cdist`` blocks of ``batch_size`` x
    ``batch_size`` (torch-fidelity's ``prc_batch_size``, 10000), reduced as they come (a running k smallest per
    row for the radii, running any() for the ball tests), so memory is O(batch_size^2 + N) and every distance,
    radius and ``<=`` test is torch-fidelity's own. Tests compare it with ``prc_features_to_metric``."""
    from torch_fidelity.defaults import DEFAULTS

    bs = int(batch_size or DEFAULTS["prc_batch_size"])
    k = neighborhood + 1
    radius_gen, radius_real = _kth_in_blocks(gen, k, bs), _kth_in_blocks(real, k, bs)
    gen_inside = torch.zeros(len(gen), dtype=torch.bool)  # precision: some real ball holds the generated point
    real_inside = torch.zeros(len(real), dtype=torch.bool)  # recall: some generated ball holds the real point
    for i, rows in enumerate(real.split(bs)):
        r_rows = radius_real[i * bs:i * bs + len(rows)].unsqueeze(1)
        for j, cols in enumerate(gen.split(bs)):
            d = torch.cdist(rows, cols).cpu()  # torch-fidelity's dist_2_1 block (i, j)
            real_inside[i * bs:i * bs + len(rows)] |= (d <= radius_gen[j * bs:j * bs + len(cols)]).any(dim=1)
            gen_inside[j * bs:j * bs + len(cols)] |= (d <= r_rows).any(dim=0)
    precision = gen_inside.float().mean().item()
    recall = real_inside.float().mean().item()
    return {"precision": precision, "recall": recall,
            "f_score": 2 * precision * recall / max(1e-5, precision + recall)}


def _kth_in_blocks(x: torch.Tensor, k: int, bs: int) -> torch.Tensor:
    """``torch.cdist(x, x).kthvalue(k).values`` from ``bs`` x ``bs`` cdist blocks (torch-fidelity's blocks),
    keeping the k smallest distances of each row so far."""
    out = []
    for rows in x.split(bs):
        best = None
        for cols in x.split(bs):
            d = torch.cdist(rows, cols).cpu()
            best = d if best is None else torch.cat([best, d], dim=1)
            best = best.topk(min(k, best.shape[1]), dim=1, largest=False).values
        out.append(best.max(dim=1).values)
    return torch.cat(out)


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
class CleanFidImages(torch.utils.data.Dataset):
    """clean-fid's ``ResizeDataset`` over uint8 (N, H, W, 3) images in memory instead of image files: the same
    resizer (``cleanfid.resize.build_resizer(mode)``: in 'clean' mode PIL bicubic on each channel as float, to
    299 x 299) and the same conversion to a tensor. PNG is lossless for uint8, so the items equal those of PNGs of
    the images read back by clean-fid's folder path."""

    def __init__(self, images: np.ndarray, mode: str = "clean"):
        from cleanfid.resize import build_resizer
        from torchvision.transforms import ToTensor

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N,H,W,3), got {images.dtype} {images.shape}")
        self.images, self.fn_resize, self.to_tensor = images, build_resizer(mode), ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        resized = self.fn_resize(np.array(self.images[i]))
        if resized.dtype == np.uint8:  # 'legacy_tensorflow': no resize, exact integers as floats
            return self.to_tensor(np.array(resized)) * 255
        return self.to_tensor(resized)


def _clean_model(extractor, mode: str):
    if mode == "clean":
        return extractor.resized_input_module()
    if mode == "legacy_tensorflow":
        def model(x: torch.Tensor) -> torch.Tensor:  # the pixels arrive as exact integers in a float tensor
            return torch.from_numpy(extractor.extract(x.round().clamp(0, 255).to(torch.uint8))["pool"]).float()
        return model
    raise ValueError(f"clean-FID supports mode 'clean' or 'legacy_tensorflow', not {mode!r}")


def _loader_workers(num_workers: int | None, device: str) -> int:
    """``num_workers`` as given; None: none on the CPU (the network needs the cores), else up to 8 resizing
    processes."""
    if num_workers is not None:
        return int(num_workers)
    return 0 if torch.device(device).type == "cpu" else max(0, min(8, len(os.sched_getaffinity(0)) - 1))


def clean_fid_features(images_uint8: np.ndarray, inception_info: dict | str | os.PathLike, *, mode: str = "clean",
                       batch_size: int = 50, device: str = "cpu", num_workers: int | None = None) -> np.ndarray:
    """clean-fid's own feature pipeline (the resize of ``cleanfid.fid.get_folder_features``, :class:`CleanFidImages`,
    and its ``get_batch_features``) over ``images_uint8`` in memory, with our Inception weights as the model, so
    nothing is downloaded and no image is written: the images go through a DataLoader (``num_workers`` resizing
    processes; None: 0 on the CPU, up to 8 otherwise), in batches of ``batch_size``. The features equal the folder
    path's over PNGs of the images (tests compare them). Real-set features are computed once and reused."""
    model = _clean_model(load_inception(inception_info, device=device), mode)
    return _clean_features(images_uint8, model, mode, batch_size, device, num_workers)


def _clean_features(images_uint8: np.ndarray, model, mode: str, batch_size: int, device: str,
                    num_workers: int | None) -> np.ndarray:
    from cleanfid import fid as cfid

    loader = torch.utils.data.DataLoader(CleanFidImages(images_uint8, mode), batch_size=batch_size, shuffle=False,
                                         drop_last=False, num_workers=_loader_workers(num_workers, device))
    feats = [cfid.get_batch_features(batch, model, torch.device(device)) for batch in loader]
    return np.concatenate(feats) if feats else np.zeros((0, 2048), np.float32)


def clean_fid_from_features(gen_feats: np.ndarray, real_feats: np.ndarray) -> float:
    """clean-fid's Fréchet distance (``cleanfid.fid.fid_from_feats``) between two feature sets."""
    from cleanfid import fid as cfid

    return float(np.real(cfid.fid_from_feats(gen_feats, real_feats)))


def clean_fid_score(gen_uint8: np.ndarray, real_uint8: np.ndarray, inception_info: dict | str | os.PathLike, *,
                    mode: str = "clean", batch_size: int = 50, device: str = "cpu",
                    num_workers: int | None = None) -> float:
    """FID as clean-fid computes it for two folders (``cleanfid.fid.compute_fid`` with our Inception weights as
    ``custom_feat_extractor``: each set's features, then ``fid_from_feats``), with the features computed in memory
    (:func:`clean_fid_features`), so clean-fid downloads nothing and no PNG is written.

    ``mode='clean'``: clean-fid's PIL-bicubic float resize to 299x299, then the Inception layers.
    ``mode='legacy_tensorflow'``: no outside resize; torch-fidelity's TF1-bilinear resize inside the network (this
    reproduces torch-fidelity's FID up to the matrix square-root method). Other modes need other networks.
    """
    model = _clean_model(load_inception(inception_info, device=device), mode)
    gen, real = (_clean_features(x, model, mode, batch_size, device, num_workers) for x in (gen_uint8, real_uint8))
    return clean_fid_from_features(gen, real)


def fidelity_with_settings(gen, real, params: dict, info: dict) -> dict:
    """:func:`varup.metrics.fidelity.fidelity_metrics` of generated against real features, with the ``metrics``
    settings in ``params`` and the Inception weights' ``info``."""
    return fidelity_metrics(gen, real, kid_subsets=params.get("kid_subsets", 100),
                            kid_subset_size=params.get("kid_subset_size", 1000),
                            prc_neighborhood=params.get("prc_neighborhood", 3),
                            prdc_nearest_k=params.get("prdc_nearest_k", 5),
                            isc_unavailable_reason=info.get("isc_unavailable_reason"))
