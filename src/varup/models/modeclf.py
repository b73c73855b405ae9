"""The toy mode classifier: a small CNN with one head per attribute (shape, colour, size, background), its
loading and batched prediction. Its training on the toy images lives in :mod:`varup.data.modes`."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("varup.data.modes")



ATTRIBUTES = ("shape", "colour", "size", "background")


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


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


@torch.no_grad()
def predict(model: ModeClassifier, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(x), batch_size):
        out.append(torch.stack([lg.argmax(1) for lg in model(x[s:s + batch_size].to(dev))], 1).cpu())
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros((0, 4), np.int64)


def load_mode_classifier(path, map_location="cpu") -> ModeClassifier:
    """The classifier saved by :func:`train_mode_classifier` (eval mode); its ``val_accuracy`` and ``attributes``
    are attached as attributes."""
    from varup.base.checkpoint import read_checkpoint

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
        pred = predict(model, images_to_tensor(images_uint8), batch_size)
    finally:
        model.train(was)
    out = {a: pred[:, j] for j, a in enumerate(ATTRIBUTES)}
    out["mode"] = attrs_to_mode(pred, model.sizes)
    return out


def attrs_to_mode(attrs: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """(N, 4) attribute indices -> global mode index in ``product(shapes, colours, sizes, backgrounds)`` order."""
    attrs = np.asarray(attrs, np.int64)
    m = np.zeros(len(attrs), np.int64)
    for j, n in enumerate(sizes):
        m = m * n + attrs[:, j]
    return m
