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
import torch.nn.functional as F

from varup.models.modeclf import ATTRIBUTES, ModeClassifier, attrs_to_mode, images_to_tensor, predict

log = logging.getLogger("varup.data.modes")

def attribute_names(info: Mapping[str, Any]) -> dict[str, list[str]]:
    return {"shape": list(info["classes"]), "colour": list(info["colours"]), "size": list(info["sizes"]),
            "background": list(info["backgrounds"])}


def manifest_attributes(rows: Sequence[Mapping[str, Any]], names: Mapping[str, list[str]]) -> np.ndarray:
    """(N, 4) shape, colour, size and background indices of toy manifest ``rows`` in the order of ``names``
    (the attribute names a classifier was trained with); ValueError/KeyError on a name it does not know."""
    return np.array([[names["shape"].index(r["class_name"]), names["colour"].index(r["colour"]),
                      names["size"].index(r["size"]), names["background"].index(r["background"])] for r in rows],
                    np.int64).reshape(-1, len(ATTRIBUTES))


def load_attribute_split(dataset_dir: Path, split: str, names: Mapping[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
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


def attribute_accuracy(pred: np.ndarray, attrs: np.ndarray) -> dict[str, float]:
    acc = {a: float((pred[:, j] == attrs[:, j]).mean()) for j, a in enumerate(ATTRIBUTES)}
    acc["mode"] = float((pred == attrs).all(1).mean())
    return acc


def train_mode_classifier(dataset_dir, out_path, *, epochs: int = 6, seed: int = 0, device: str = "cpu",
                          batch_size: int = 64, lr: float = 5e-3, width: int = 32, weight_decay: float = 1e-4) -> dict:
    """Train on the toy TRAIN split (whole split in memory; random symmetries of the square and random Gaussian
    blur of half the images, which keep every attribute), AdamW + one-cycle schedule, seeded; evaluate on VAL. Saves ``{'model', 'config', 'val_accuracy'}``
    (``torch.load(weights_only=True)``-loadable) to ``out_path``; returns
    ``{'val_accuracy': {shape, colour, size, background, mode}, 'train_accuracy', 'train_time_s', ...}``."""
    from varup.base.runtime import resolve_device
    from varup.base.utils import atomic_torch_save, read_json

    t0 = time.time()
    dataset_dir = Path(dataset_dir)
    info = read_json(dataset_dir / "dataset.json")
    names = attribute_names(info)
    sizes = [len(names[a]) for a in ATTRIBUTES]
    xtr, ytr = load_attribute_split(dataset_dir, "train", names)
    xva, yva = load_attribute_split(dataset_dir, "val", names)
    dev = resolve_device(device)
    config = {"n_shapes": sizes[0], "n_colours": sizes[1], "n_sizes": sizes[2], "n_backgrounds": sizes[3],
              "width": int(width), "resolution": int(info["resolution"])}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModeClassifier(**config).to(dev)
    rng = np.random.default_rng(seed)
    X, Y = images_to_tensor(xtr), torch.from_numpy(ytr)
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
    val_acc = attribute_accuracy(predict(model, images_to_tensor(xva)), yva)
    train_acc = attribute_accuracy(predict(model, X), ytr)
    elapsed = time.time() - t0
    atomic_torch_save({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "config": config,
                       "val_accuracy": val_acc, "attributes": {a: names[a] for a in ATTRIBUTES}}, out_path)
    log.info("mode classifier: val accuracy %s (%.1f s)", {k: round(v, 4) for k, v in val_acc.items()}, elapsed)
    return {"val_accuracy": val_acc, "train_accuracy": train_acc, "train_time_s": round(elapsed, 2),
            "n_train": int(len(X)), "n_val": int(len(xva)), "epochs": epochs, "seed": seed, "config": config}


# ------------------------------------------------------------------------------------------- coverage
def true_mode_hist(dataset_dir, split: str = "train") -> np.ndarray:
    """The toy's mode distribution, read from the manifest (uniform by construction when the class counts are
    multiples of the modes per class)."""
    from varup.base.utils import read_json
    from varup.data.toy import read_manifest

    n_modes = len(read_json(Path(dataset_dir) / "dataset.json")["modes"])
    counts = np.bincount([r["mode"] for r in read_manifest(dataset_dir, split)], minlength=n_modes).astype(np.float64)
    return counts / counts.sum()


__all__ = ["train_mode_classifier", "true_mode_hist", "manifest_attributes"]
