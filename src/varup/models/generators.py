"""Loading a trained run for a stage that samples or scores it: the model file and its tokenizer on one device.
Apart from :mod:`varup.models.checkpoint`, which the trainer imports, so that this helper is no part of the
training code's fingerprint (an edit here re-runs the stages that load runs, never training)."""
from __future__ import annotations

import os

from varup.models.checkpoint import load_model


def load_generator(model: str | os.PathLike, tokenizer: str | os.PathLike, device: str = "auto"):
    """A trained model file (:func:`load_model`, eval mode) and its tokenizer on the resolved ``device``:
    ``(var, vae, device)``, the preamble of every stage that samples or scores a run."""
    from varup.base.runtime import resolve_device
    from varup.models.vqvae import load_vqvae

    dev = resolve_device(device)
    return load_model(model).to(dev), load_vqvae(tokenizer).to(dev), dev


__all__ = ["load_generator"]
