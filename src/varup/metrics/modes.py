"""Mode coverage of a sample set (toy datasets): the mode classifier labels every sample; modes covered, KL
between the generated and the true mode histograms, per-class coverage and class error, beside a real reference set."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from varup.data.modes import attribute_accuracy, attribute_names, load_attribute_split, true_mode_hist
from varup.models.modeclf import ATTRIBUTES, classify, load_mode_classifier

log = logging.getLogger("varup.data.modes")



KL_EPS = 1e-6


def _smooth(p: np.ndarray, eps: float) -> np.ndarray:
    return (p + eps) / (1.0 + len(p) * eps)


def kl(p: np.ndarray, q: np.ndarray, eps: float = KL_EPS) -> float:
    """KL(p || q) in nats of the eps-smoothed histograms (see the module docstring)."""
    p, q = _smooth(np.asarray(p, np.float64), eps), _smooth(np.asarray(q, np.float64), eps)
    return float(np.sum(p * np.log(p / q)))


def _coverage(counts: np.ndarray, true: np.ndarray, min_share_ratio: float, eps: float) -> dict:
    n = int(counts.sum())
    gen = counts / n if n else np.zeros_like(true)
    support = true > 0
    return {"n": n, "n_modes": int(len(true)), "covered": int((counts > 0).sum()),
            "covered_share": int(((gen >= min_share_ratio * true) & support).sum()),
            "expected_covered_true": float(np.sum(1.0 - (1.0 - true) ** n)),
            "kl_gen_true": kl(gen, true, eps) if n else None, "kl_true_gen": kl(true, gen, eps) if n else None,
            "hist": counts.astype(int).tolist()}


def mode_coverage(pred_modes, labels, n_modes: int, modes_per_class: int, true_hist=None, *,
                  min_share_ratio: float = 0.5, eps: float = KL_EPS) -> dict:
    """Mode coverage of generated samples (see the module docstring). ``pred_modes``: predicted global modes (N,);
    ``labels``: the conditioning classes (N,); ``true_hist``: (n_modes,) probabilities, default uniform.

    Returns ``{'overall': {...}, 'per_class': [{class, ...}], 'per_class_mean': {covered, covered_share,
    kl_gen_true, kl_true_gen}, 'class_error', 'n', 'min_share_ratio', 'eps'}``."""
    pred = np.asarray(pred_modes, np.int64).ravel()
    labels = np.asarray(labels, np.int64).ravel()
    if pred.shape != labels.shape:
        raise ValueError(f"{len(pred)} predictions but {len(labels)} labels")
    if n_modes % modes_per_class:
        raise ValueError(f"n_modes {n_modes} is not a multiple of modes_per_class {modes_per_class}")
    if len(pred) and (pred.min() < 0 or pred.max() >= n_modes):
        raise ValueError(f"predicted modes outside [0, {n_modes})")
    n_classes = n_modes // modes_per_class
    true = np.full(n_modes, 1.0 / n_modes) if true_hist is None else np.asarray(true_hist, np.float64)
    if true.shape != (n_modes,) or not np.isclose(true.sum(), 1.0) or (true < 0).any():
        raise ValueError(f"true_hist must be a probability vector of length {n_modes}")
    out: dict[str, Any] = {"n": int(len(pred)), "min_share_ratio": min_share_ratio, "eps": eps,
                           "overall": _coverage(np.bincount(pred, minlength=n_modes), true, min_share_ratio, eps)}
    per = []
    for c in range(n_classes):
        sel = labels == c
        t = true[c * modes_per_class:(c + 1) * modes_per_class]
        if not sel.any() or t.sum() == 0:
            continue
        counts = np.bincount(pred[sel] % modes_per_class, minlength=modes_per_class)
        per.append({"class": c, **_coverage(counts, t / t.sum(), min_share_ratio, eps),
                    "class_error": float((pred[sel] // modes_per_class != c).mean())})
    out["per_class"] = per
    out["per_class_mean"] = {k: (float(np.mean([p[k] for p in per])) if per else None)
                             for k in ("covered", "covered_share", "expected_covered_true", "kl_gen_true",
                                       "kl_true_gen")}
    out["class_error"] = float((pred // modes_per_class != labels).mean()) if len(pred) else None
    return out


def run_mode_coverage(classifier, samples_npz, dataset_dir, out_json, *, meta: Mapping[str, Any] | None = None,
                      reference_split: str = "val", min_share_ratio: float = 0.5, eps: float = KL_EPS,
                      device: str = "cpu") -> dict:
    """Classify a sample set (``images``, ``labels``) into modes and write its coverage to ``out_json``; also the
    coverage the classifier reports for a class-balanced subset of the real ``reference_split`` of the same size
    (``reference_real``: its deviations from perfect coverage are classifier errors and finite-sample effects)."""
    from varup.base.runtime import resolve_device
    from varup.base.utils import atomic_write_json, read_json, sha256_file, write_provenance
    from varup.data.subsets import balanced_subset

    t0 = time.time()
    dataset_dir = Path(dataset_dir)
    model = load_mode_classifier(classifier).to(resolve_device(device))
    info = read_json(dataset_dir / "dataset.json")
    n_modes, n_classes = len(info["modes"]), len(info["classes"])
    per_class = n_modes // n_classes
    true = true_mode_hist(dataset_dir, "train")
    with np.load(samples_npz) as z:
        images, labels = z["images"], z["labels"]
    pred = classify(model, images)
    cov = mode_coverage(pred["mode"], labels, n_modes, per_class, true, min_share_ratio=min_share_ratio, eps=eps)
    names = attribute_names(info)
    rimgs, rattrs = load_attribute_split(dataset_dir, reference_split, names)
    keep = balanced_subset(rattrs[:, 0], len(images))
    rpred = classify(model, rimgs[keep])
    ref = mode_coverage(rpred["mode"], rattrs[keep, 0], n_modes, per_class, true, min_share_ratio=min_share_ratio,
                        eps=eps)
    ref["classifier_accuracy"] = attribute_accuracy(np.stack([rpred[a] for a in ATTRIBUTES], 1), rattrs[keep])
    res = {"kind": "mode_coverage", **dict(meta or {}), "n_samples": int(len(images)), "coverage": cov,
           "reference_real": {"split": reference_split, "n": int(len(keep)), **ref},
           "classifier": {"path": str(classifier), "val_accuracy": model.val_accuracy},
           "samples_sha256": sha256_file(samples_npz)}
    atomic_write_json(out_json, res)
    write_provenance(out_json, config={"min_share_ratio": min_share_ratio, "eps": eps}, started=t0)
    o = cov["overall"]
    log.info("mode coverage: %d/%d modes (%d with >= %.2f of the true share), KL(g||t) %.3f, class error %.3f",
             o["covered"], n_modes, o["covered_share"], min_share_ratio, o["kl_gen_true"] or float("nan"),
             cov["class_error"] or 0.0)
    return res
