"""The tokenizer gate: a trained tokenizer must keep what the generator is asked to produce.

A generator can only be as good as its tokenizer's reconstructions: if the decoded token maps of real images no
longer show the object's shape, no amount of transformer training makes samples of the conditioned class. On the toy
dataset this is measured directly: the mode classifier (trained on real images, :mod:`varup.data.modes`) classifies the
tokenizer's reconstructions of held-out images, and the run stops before encoding if its class (shape) error exceeds
a configured bound (``datasets.<d>.tokenizer_gate.max_class_error``). The numbers are written to the gate's JSON
output when it passes, and to ``<output stem>.failed.json`` beside it when it fails (Snakemake deletes a failed
job's outputs), so a failed gate leaves its evidence beside the tokenizer.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("varup.tokenizer.gate")


class TokenizerGateError(RuntimeError):
    """The tokenizer's reconstructions lose the class."""


@torch.no_grad()
def reconstruct_uint8(vae, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Images (N, 3, R, R) in [-1, 1] -> the tokenizer's reconstructions as uint8 (N, R, R, 3) (rounded)."""
    from varup.data.folder import to_uint8

    out = [to_uint8(vae.img_to_reconstructed_img(images[a:a + batch_size]).add(1).div(2))
           for a in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, *images.shape[2:], 3), np.uint8)


def reconstruction_errors(vae, classifier, images: torch.Tensor, attrs: np.ndarray) -> dict[str, Any]:
    """Per-attribute error rates of ``classifier`` on ``vae``'s reconstructions of ``images`` and on the images
    themselves (``attrs``: (N, 4) true shape, colour, size, background indices)."""
    from varup.data.folder import to_uint8
    from varup.models.modeclf import ATTRIBUTES, classify

    def errors(u8: np.ndarray) -> dict[str, float]:
        pred = classify(classifier, u8)
        return {a: float((pred[a] != attrs[:, j]).mean()) for j, a in enumerate(ATTRIBUTES)}

    rec = errors(reconstruct_uint8(vae, images))
    real = errors(to_uint8(images.add(1).div(2)))
    return {"n": int(len(images)), "class_error": rec["shape"], "reconstruction_errors": rec,
            "real_errors": real, "real_class_error": real["shape"]}


def run_tokenizer_gate(tokenizer, classifier, data_dir, out_json, *, resolution: int, preprocess: dict | None = None,
                       split: str = "val", max_class_error: float = 0.1, config_key: str = "tokenizer_gate",
                       device: str = "cpu") -> dict[str, Any]:
    """Measure the class error of the mode classifier on the tokenizer's reconstructions of ``split``; write
    ``out_json`` (atomically) when it is within ``max_class_error``; otherwise write the record to
    :func:`failed_record_path` and raise :class:`TokenizerGateError`, naming the number and the bound's config key."""
    from varup.base.runtime import resolve_device
    from varup.base.utils import atomic_write_json, sha256_file, write_provenance
    from varup.data.folder import open_split
    from varup.models.modeclf import load_mode_classifier
    from varup.models.vqvae import load_vqvae

    t0 = time.time()
    dev = resolve_device(device)
    vae = load_vqvae(tokenizer).to(dev)
    clf = load_mode_classifier(classifier).to(dev)
    ds = open_split(str(data_dir), split, resolution, preprocess)
    images = torch.stack([ds[i][0] for i in range(len(ds))]).to(dev)
    attrs = _attributes(Path(data_dir), split, clf)
    res = reconstruction_errors(vae, clf, images, attrs)
    passed = res["class_error"] <= max_class_error
    res.update(kind="tokenizer_gate", split=split, max_class_error=max_class_error, config_key=config_key,
               passed=bool(passed), tokenizer_sha256=sha256_file(tokenizer), classifier_sha256=sha256_file(classifier))
    out_json, failed = Path(out_json), failed_record_path(out_json)
    target = out_json if passed else failed  # a failed job's outputs are deleted by Snakemake: keep the evidence
    atomic_write_json(target, res)
    write_provenance(target, config={"split": split, "max_class_error": max_class_error}, started=t0)
    if passed:
        for stale in (failed, failed.with_name(failed.name + ".prov.json")):
            stale.unlink(missing_ok=True)
    msg = (f"tokenizer gate: class error of the mode classifier on {tokenizer}'s reconstructions of {res['n']} "
           f"held-out ({split}) images is {res['class_error']:.4f} (on the real images {res['real_class_error']:.4f}); "
           f"bound {config_key} = {max_class_error}")
    if not passed:
        raise TokenizerGateError(msg + ": the tokenizer loses the class; train it longer or wider "
                                 f"(per-attribute errors {_rounded(res['reconstruction_errors'])})")
    log.info("%s: passed (per-attribute errors %s)", msg, _rounded(res["reconstruction_errors"]))
    return res


def failed_record_path(out_json) -> Path:
    """Where a failed gate writes its record: beside the output, ``gate.json`` -> ``gate.failed.json``."""
    out_json = Path(out_json)
    return out_json.with_name(out_json.stem + ".failed" + out_json.suffix)


def _attributes(data_dir: Path, split: str, classifier) -> np.ndarray:
    """(N, 4) true attribute indices of ``split`` in the dataset's order (the order ``open_split`` reads)."""
    from varup.data.modes import manifest_attributes
    from varup.data.toy import read_manifest

    try:
        return manifest_attributes(read_manifest(data_dir, split), classifier.attributes or {})
    except (KeyError, ValueError) as e:
        raise ValueError(f"{data_dir}: the mode classifier's attribute names do not match the manifest ({e})") from None


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


__all__ = ["TokenizerGateError", "failed_record_path", "reconstruct_uint8", "reconstruction_errors", "run_tokenizer_gate"]
