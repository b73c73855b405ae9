"""CMMD (Jayasumana et al. 2024, "Rethinking FID"): the maximum mean discrepancy between CLIP image embeddings
of generated and real images, with a Gaussian RBF kernel. Computed as the published implementation
(google-research/google-research, ``cmmd/``) does:

* ``distance.mmd``: the biased (minimum-variance, V-statistic) estimator of Gretton et al. 2012, Eq. 5, i.e. the
  means over *all* pairs, diagonals k(x_i, x_i) = 1 included: ``mean K_xx + mean K_yy - 2 mean K_xy`` with
  ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))``, sigma = 10, times 1000. It is 0 for identical sets and never
  negative. The published code runs in JAX's default float32; :func:`mmd` computes in float64, in row blocks
  (the same value up to float32 rounding, without N x N matrices in memory).
* ``embedding.py`` / ``io_util.py``: CLIP ViT-L/14@336px image embeddings, L2-normalised (scenic's
  ``encode_image(normalize=True)``); each image centre-cropped to its largest square, resized to 336 x 336 with
  PIL bicubic (antialiased, back to uint8), scaled to [0, 1], then normalised with CLIP's mean / std. Unlike the
  published reader, :meth:`ClipImageEmbedder.embed` keeps the last partial batch (it drops it to fill TPUs).

No maintained pip package for CMMD exists on this project's index (``cmmd``, ``cmmd-pytorch`` are absent, and so is
torchmetrics), hence this implementation; the CLIP model is open_clip's, loaded by :mod:`varup.models.clip`.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from varup.base.utils import progress

SIGMA = 10.0  # the RBF bandwidth of the paper and the published code
SCALE = 1000.0  # the published code's factor "to make the metric more human readable"
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


# --------------------------------------------------------------------------------------------- distance
def as_float64(a, device=None):
    """(N, D) float64 torch tensor of an array or tensor (kept on its device unless ``device`` is given)."""
    import torch

    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    t = t.to(device=device if device is not None else t.device, dtype=torch.float64)
    if t.ndim != 2 or not len(t):
        raise ValueError(f"expected a non-empty (N, D) set of embeddings, got shape {tuple(t.shape)}")
    return t


def kernel_mean(a, b, gamma: float, block: int = 4096) -> float:
    """Mean of exp(-gamma ||a_i - b_j||^2) over all (i, j), squared distances expanded as the published code does
    (|a|^2 + |b|^2 - 2 a.b), ``block`` rows of ``a`` at a time."""
    b_sq = (b * b).sum(1)
    total = a.new_zeros(())
    for i in range(0, len(a), block):
        rows = a[i:i + block]
        d2 = (rows * rows).sum(1)[:, None] + b_sq[None, :] - 2.0 * rows @ b.T
        total += (-gamma * d2).exp().sum()
    return float(total) / (len(a) * len(b))


def mmd(x, y, *, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """``scale`` x the biased squared MMD between the rows of ``x`` (N, D) and ``y`` (M, D) under the Gaussian RBF
    kernel of bandwidth ``sigma`` (float64; numpy arrays or torch tensors, on ``x``'s device)."""
    x = as_float64(x)
    y = as_float64(y, device=x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"embedding sizes differ: {x.shape[1]} vs {y.shape[1]}")
    gamma = 1.0 / (2.0 * sigma ** 2)
    return scale * (kernel_mean(x, x, gamma) + kernel_mean(y, y, gamma) - 2.0 * kernel_mean(x, y, gamma))


def cmmd(gen_features, real_features) -> float:
    """CMMD between generated and real CLIP embeddings (each (N, D), L2-normalised as :class:`ClipImageEmbedder`
    gives them): :func:`mmd` with sigma 10 and scale 1000. Unnormalised features (e.g. Inception's) are refused."""
    for name, f in (("generated", gen_features), ("real", real_features)):
        norms = as_float64(f).norm(dim=1)
        if (norms - 1).abs().max() > 1e-3:
            raise ValueError(f"CMMD needs L2-normalised CLIP embeddings; the {name} features have norms in "
                             f"[{float(norms.min()):.4g}, {float(norms.max()):.4g}]")
    return mmd(real_features, gen_features)


# ------------------------------------------------------------------------------------------ preprocessing
def cmmd_preprocess(image: np.ndarray, size: int = 336) -> np.ndarray:
    """One uint8 image (H, W, 3), (H, W, 1) or (H, W) as the published CMMD reads it: centre crop to the largest
    square, PIL bicubic resize to ``size``, gray tiled to RGB, [0, 1], CLIP mean / std. Returns (size, size, 3)
    float32."""
    from PIL import Image

    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"expected an (H, W, 3) or gray image, got shape {img.shape}")
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    im = Image.fromarray(img[top:top + side, left:left + side])
    out = np.asarray(im.resize((size, size), resample=Image.BICUBIC), dtype=np.float32) / 255.0
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return (out - CLIP_MEAN) / CLIP_STD


class ClipImageEmbedder:
    """CLIP image embeddings for CMMD (default ViT-L/14@336px with OpenAI's ``ViT-L-14-336px.pt``, see
    :data:`varup.models.clip.CLIP_WEIGHTS`): ``embed(images)`` takes uint8 NHWC images of any resolution (one
    array, or a sequence of HWC arrays of different sizes) and returns (N, dim) float32 L2-normalised rows."""

    def __init__(self, weights: str | os.PathLike, arch: str = "ViT-L-14-336", *, device="cpu", batch_size: int = 32,
                 quick_gelu: bool = True):
        import torch

        from varup.models.clip import image_size, load_clip_model

        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.model = load_clip_model(weights, arch, device=self.device, quick_gelu=quick_gelu)
        self.size = image_size(self.model)
        self.dim = int(self.model.visual.output_dim)

    def embed(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        out = [np.empty((0, self.dim), np.float32)]
        with progress(total=len(images), desc="CLIP embeddings", unit="img") as bar:
            for start in range(0, len(images), self.batch_size):
                batch = images[start:start + self.batch_size]
                out.append(self.embed_batch(batch))
                bar.update(len(batch))
        return np.concatenate(out)

    def embed_batch(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        import torch

        from varup.models.clip import autocast_off

        x = np.stack([cmmd_preprocess(im, self.size) for im in images]).transpose(0, 3, 1, 2)
        with torch.no_grad(), autocast_off(self.device):
            emb = self.model.encode_image(torch.from_numpy(np.ascontiguousarray(x)).to(self.device), normalize=True)
        return emb.float().cpu().numpy()
