"""Mode coverage on the toy dataset (beyond the paper): the sharpest test of the mode-collapse claim.

A small CNN classifies toy images into their 4 attributes -- shape (= class), colour, size, background -- with one
head each (simpler and more accurate than one 64-way head); the global mode index follows the toy's order
``product(shapes, colours, sizes, backgrounds)``, i.e. ``mode = label * modes_per_class + mode_in_class``.
It is trained on the toy TRAIN split (labels from the manifest) and its held-out accuracy is measured on VAL.

:func:`mode_coverage` compares the histogram of the predicted modes of generated images with the true one:

* ``covered``: modes with >= 1 sample; ``covered_share``: modes whose generated share is >= ``min_share_ratio``
  times their true share (default 0.5: at least half as frequent as in the data);
* ``expected_covered_true``: how many modes n i.i.d. draws from the TRUE distribution cover on average,
  ``sum_m 1 - (1 - p_m)^n`` -- the finite-sample ceiling for ``covered`` (128 samples over 64 uniform modes cover
  ~55.7, not 64);
* ``kl_gen_true`` = KL(generated || true) and ``kl_true_gen`` = KL(true || generated) in nats, of the histograms
  smoothed as ``q = (p + eps) / (1 + K * eps)`` (K modes, ``eps = 1e-6`` on the probability scale) so that empty
  modes give a finite, large KL(true || generated) (~log(1/eps) per missing unit of mass);
* the same per class, over that class's modes: the within-class histogram of the predicted non-shape attributes
  (``mode_in_class = pred_mode % modes_per_class``) of the samples CONDITIONED on the class, against the true
  within-class histogram (renormalised);
* ``class_error``: the fraction of samples whose predicted shape differs from the conditioning class.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from varup.tablefmt import GROUP_KEYS, add_stat, grouped, key_cols

log = logging.getLogger("varup.modes")

ATTRIBUTES = ("shape", "colour", "size", "background")
KL_EPS = 1e-6


# ------------------------------------------------------------------------------------------- classifier
class ModeClassifier(nn.Module):
    """3 conv blocks (BN, ReLU; max-pool after the first two) -> [global avg, global max] (:meth:`embed`, the
    ``4 * width``-d penultimate features) -> one linear head per attribute. Input uint8-range images, normalised
    inside (``(x / 255 - 0.5) / 0.25``)."""

    def __init__(self, n_shapes: int, n_colours: int, n_sizes: int, n_backgrounds: int, width: int = 32,
                 resolution: int = 32):
        super().__init__()
        self.sizes = (n_shapes, n_colours, n_sizes, n_backgrounds)
        self.resolution = resolution
        w = width

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2),
                                      block(2 * w, 2 * w))
        self.heads = nn.ModuleList([nn.Linear(4 * w, n) for n in self.sizes])
        self.feature_dim = 4 * w

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float (B, 3, H, W) on the 0..255 scale -> (B, 4 * width) penultimate features: the global average
        and the global max of the last conv block. Images of another size are first resized to ``resolution``
        (bilinear, antialiased). Every use of the features (the heads, the toy-feature metrics) goes through here."""
        r = self.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        h = self.features((x / 255.0 - 0.5) / 0.25)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: float (B, 3, H, W) on the 0..255 scale -> per-attribute logits of :meth:`embed`'s features."""
        h = self.embed(x)
        return [head(h) for head in self.heads]


def _attribute_names(info: Mapping[str, Any]) -> dict[str, list[str]]:
    return {"shape": list(info["classes"]), "colour": list(info["colours"]), "size": list(info["sizes"]),
            "background": list(info["backgrounds"])}


def manifest_attributes(rows: Sequence[Mapping[str, Any]], names: Mapping[str, list[str]]) -> np.ndarray:
    """(N, 4) shape, colour, size and background indices of toy manifest ``rows`` in the order of ``names``
    (the attribute names a classifier was trained with); ValueError/KeyError on a name it does not know."""
    return np.array([[names["shape"].index(r["class_name"]), names["colour"].index(r["colour"]),
                      names["size"].index(r["size"]), names["background"].index(r["background"])] for r in rows],
                    np.int64).reshape(-1, len(ATTRIBUTES))


def _load_split(dataset_dir: Path, split: str, names: Mapping[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, R, R, 3) images and (N, 4) attribute indices; checks the manifest's global mode index."""
    from PIL import Image

    from varup.data.toy import read_manifest

    rows = read_manifest(dataset_dir, split)
    if not rows:
        raise ValueError(f"{dataset_dir}: split {split!r} has no images")
    imgs = np.stack([np.asarray(Image.open(dataset_dir / r["path"]).convert("RGB")) for r in rows])
    attrs = manifest_attributes(rows, names)
    modes = attrs_to_mode(attrs, [len(names[a]) for a in ATTRIBUTES])
    want = np.array([r["mode"] for r in rows])
    if not np.array_equal(modes, want) or not np.array_equal(attrs[:, 0], [r["label"] for r in rows]):
        raise ValueError(f"{dataset_dir}: manifest modes do not follow product(shapes, colours, sizes, backgrounds)")
    return imgs, attrs


def attrs_to_mode(attrs: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """(N, 4) attribute indices -> global mode index in ``product(shapes, colours, sizes, backgrounds)`` order."""
    attrs = np.asarray(attrs, np.int64)
    m = np.zeros(len(attrs), np.int64)
    for j, n in enumerate(sizes):
        m = m * n + attrs[:, j]
    return m


def _dihedral(x: torch.Tensor, sym: np.ndarray) -> torch.Tensor:
    """Apply one of the 8 symmetries of the square per image (k = sym % 4 quarter turns, then a flip if sym >= 4).
    Every toy attribute is invariant under them (a rotated triangle is still a triangle, stripes stay stripes)."""
    out = x.clone()
    for k in range(8):
        sel = np.flatnonzero(sym == k)
        if len(sel):
            y = torch.rot90(x[sel], k % 4, dims=(2, 3))
            out[sel] = y.flip(-1) if k >= 4 else y
    return out


BLUR_SIGMA = (0.4, 1.2)  # px: the softness of a small tokenizer's decoded edges


def _random_blur(x: torch.Tensor, rng: np.random.Generator, p: float = 0.5) -> torch.Tensor:
    """Gaussian-blur a random half of the batch with one sigma drawn from ``BLUR_SIGMA``. Generated and reconstructed
    toy images have softer edges than the rendered ones; a classifier trained on sharp images only reads a soft cross
    as a triangle. Blur keeps every attribute, so the classifier judges shape, colour, size and background as a
    person would, not sharpness."""
    from torchvision.transforms.functional import gaussian_blur

    sel = np.flatnonzero(rng.random(len(x)) < p)
    if not len(sel):
        return x
    sigma = float(rng.uniform(*BLUR_SIGMA))
    out = x.clone()
    out[sel] = gaussian_blur(x[sel], kernel_size=[5, 5], sigma=[sigma, sigma])
    return out


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


@torch.no_grad()
def _predict(model: ModeClassifier, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(x), batch_size):
        out.append(torch.stack([lg.argmax(1) for lg in model(x[s:s + batch_size].to(dev))], 1).cpu())
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros((0, 4), np.int64)


def _accuracy(pred: np.ndarray, attrs: np.ndarray) -> dict[str, float]:
    acc = {a: float((pred[:, j] == attrs[:, j]).mean()) for j, a in enumerate(ATTRIBUTES)}
    acc["mode"] = float((pred == attrs).all(1).mean())
    return acc


def train_mode_classifier(dataset_dir, out_path, *, epochs: int = 6, seed: int = 0, device: str = "cpu",
                          batch_size: int = 64, lr: float = 5e-3, width: int = 32, weight_decay: float = 1e-4) -> dict:
    """Train on the toy TRAIN split (whole split in memory; random symmetries of the square and random Gaussian
    blur of half the images, which keep every attribute), AdamW + one-cycle schedule, seeded; evaluate on VAL. Saves ``{'model', 'config', 'val_accuracy'}``
    (``torch.load(weights_only=True)``-loadable) to ``out_path``; returns
    ``{'val_accuracy': {shape, colour, size, background, mode}, 'train_accuracy', 'train_time_s', ...}``."""
    from varup.runtime import resolve_device
    from varup.utils import atomic_torch_save, read_json

    t0 = time.time()
    dataset_dir = Path(dataset_dir)
    info = read_json(dataset_dir / "dataset.json")
    names = _attribute_names(info)
    sizes = [len(names[a]) for a in ATTRIBUTES]
    xtr, ytr = _load_split(dataset_dir, "train", names)
    xva, yva = _load_split(dataset_dir, "val", names)
    dev = resolve_device(device)
    config = {"n_shapes": sizes[0], "n_colours": sizes[1], "n_sizes": sizes[2], "n_backgrounds": sizes[3],
              "width": int(width), "resolution": int(info["resolution"])}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModeClassifier(**config).to(dev)
    rng = np.random.default_rng(seed)
    X, Y = _to_tensor(xtr), torch.from_numpy(ytr)
    steps_per_epoch = -(-len(X) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch),
                                                pct_start=0.2)
    model.train()
    for epoch in range(epochs):
        perm = rng.permutation(len(X))
        sym = rng.integers(0, 8, len(X))
        total = 0.0
        for s in range(0, len(X), batch_size):
            idx = perm[s:s + batch_size]
            xb = _random_blur(_dihedral(X[idx], sym[idx]), rng).to(dev)
            yb = Y[idx].to(dev)
            loss = sum(F.cross_entropy(lg, yb[:, j]) for j, lg in enumerate(model(xb)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log.debug("mode classifier epoch %d loss %.4f", epoch, total / len(X))
    model.eval()
    val_acc = _accuracy(_predict(model, _to_tensor(xva)), yva)
    train_acc = _accuracy(_predict(model, X), ytr)
    elapsed = time.time() - t0
    atomic_torch_save({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "config": config,
                       "val_accuracy": val_acc, "attributes": {a: names[a] for a in ATTRIBUTES}}, out_path)
    log.info("mode classifier: val accuracy %s (%.1f s)", {k: round(v, 4) for k, v in val_acc.items()}, elapsed)
    return {"val_accuracy": val_acc, "train_accuracy": train_acc, "train_time_s": round(elapsed, 2),
            "n_train": int(len(X)), "n_val": int(len(xva)), "epochs": epochs, "seed": seed, "config": config}


def load_mode_classifier(path, map_location="cpu") -> ModeClassifier:
    """The classifier saved by :func:`train_mode_classifier` (eval mode); its ``val_accuracy`` and ``attributes``
    are attached as attributes."""
    from varup.models.common import read_checkpoint

    obj = read_checkpoint(path, map_location)
    if not isinstance(obj, dict) or "model" not in obj or "config" not in obj:
        raise ValueError(f"{path}: not a mode classifier file (expected keys 'model' and 'config')")
    model = ModeClassifier(**obj["config"])
    model.load_state_dict(obj["model"], strict=True)
    model.val_accuracy = obj.get("val_accuracy")
    model.attributes = obj.get("attributes")
    return model.eval()


def classify(model: ModeClassifier, images_uint8: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """uint8 (N, H, W, 3) -> ``{'mode': global mode index (N,), 'shape', 'colour', 'size', 'background': (N,)}``.
    Images of another resolution are resized (bilinear, antialiased) to the classifier's."""
    was = model.training
    model.eval()
    try:
        pred = _predict(model, _to_tensor(images_uint8), batch_size)
    finally:
        model.train(was)
    out = {a: pred[:, j] for j, a in enumerate(ATTRIBUTES)}
    out["mode"] = attrs_to_mode(pred, model.sizes)
    return out


# ------------------------------------------------------------------------------------------- coverage
def true_mode_hist(dataset_dir, split: str = "train") -> np.ndarray:
    """The toy's mode distribution, read from the manifest (uniform by construction when the class counts are
    multiples of the modes per class)."""
    from varup.data.toy import read_manifest
    from varup.utils import read_json

    n_modes = len(read_json(Path(dataset_dir) / "dataset.json")["modes"])
    counts = np.bincount([r["mode"] for r in read_manifest(dataset_dir, split)], minlength=n_modes).astype(np.float64)
    return counts / counts.sum()


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
    from varup.metrics.evaluate import balanced_subset
    from varup.runtime import resolve_device
    from varup.utils import atomic_write_json, read_json, sha256_file, write_provenance

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
    names = _attribute_names(info)
    rimgs, rattrs = _load_split(dataset_dir, reference_split, names)
    keep = balanced_subset(rattrs[:, 0], len(images))
    rpred = classify(model, rimgs[keep])
    ref = mode_coverage(rpred["mode"], rattrs[keep, 0], n_modes, per_class, true, min_share_ratio=min_share_ratio,
                        eps=eps)
    ref["classifier_accuracy"] = _accuracy(np.stack([rpred[a] for a in ATTRIBUTES], 1), rattrs[keep])
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


MODE_COLUMNS = (("covered", "modes covered", lambda c: c["overall"]["covered"], 1),
                ("covered_share", "modes ≥ ½ true share", lambda c: c["overall"]["covered_share"], 1),
                ("expected_covered_true", "i.i.d. ceiling", lambda c: c["overall"]["expected_covered_true"], 1),
                ("kl_gen_true", "KL(gen‖true)", lambda c: c["overall"]["kl_gen_true"], 3),
                ("kl_true_gen", "KL(true‖gen)", lambda c: c["overall"]["kl_true_gen"], 3),
                ("class_covered", "modes/class covered", lambda c: c["per_class_mean"]["covered"], 2),
                ("class_kl_gen_true", "KL(gen‖true)/class", lambda c: c["per_class_mean"]["kl_gen_true"], 3),
                ("class_error", "class error", lambda c: c["class_error"], 3))


def _coverage_row(keycols: dict, covs: list[dict], n_modes: int) -> tuple[dict, dict]:
    """(CSV row, display row) of the coverage dicts of one group."""
    row = {**keycols, "seeds": len(covs), "n_modes": n_modes}
    d = {**keycols, "n": len(covs)}
    for key, title, get, digits in MODE_COLUMNS:
        add_stat(row, d, key, title, (get(c) for c in covs), digits)
    return row, d


def mode_coverage_table(records: Sequence[Mapping[str, Any]]):
    """(table, display): one row per (dataset, depth, method) of :func:`run_mode_coverage` records, mean ± std over
    the records (training seeds; :mod:`varup.tablefmt`: sample std, ddof = 1, one record -> no ±): modes covered
    (>= 1 sample, and >= min_share_ratio of the true share), the i.i.d. ceiling, KL both ways, per-class mean
    coverage and the class error; then per dataset a "real (val)" row (n = 1) from its first record's reference (the
    classifier on as many real images; its depth is that record's, not meaningful)."""
    import pandas as pd

    rows = [_coverage_row(key_cols(key), [r["coverage"] for r in rs], rs[0]["coverage"]["overall"]["n_modes"])
            for key, rs in grouped(records).items()]
    seen = set()
    for r in records:  # one reference row per dataset, from its first record
        if r.get("reference_real") and r.get("dataset") not in seen:
            seen.add(r.get("dataset"))
            ref = r["reference_real"]
            keycols = {k: r.get(k) for k in GROUP_KEYS if r.get(k) is not None}
            keycols["method"] = f"real ({ref['split']})"
            rows.append(_coverage_row(keycols, [ref], ref["overall"]["n_modes"]))
    return pd.DataFrame([r for r, _ in rows]), pd.DataFrame([d for _, d in rows])


__all__ = ["ModeClassifier", "train_mode_classifier", "load_mode_classifier", "classify", "attrs_to_mode",
           "true_mode_hist", "manifest_attributes", "kl", "mode_coverage", "run_mode_coverage", "mode_coverage_table",
           "ATTRIBUTES", "KL_EPS"]
