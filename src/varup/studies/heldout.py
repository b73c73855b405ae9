"""One run's held-out token loss and size, for the scaling study (:mod:`varup.studies.scaling`).

Loss: the teacher-forced mean NLL per token (nats) of the token maps of one split of the dataset's token cache (the
held-out ``val`` by default), computed by Table 3's :func:`varup.studies.ood.image_nll`: no CFG, every one of the L
tokens of an image, the mean over the images of their per-token mean. Conditioning ``label`` (the default) feeds each
image its own class, as training does, so it is the test counterpart of the training cross-entropy; ``null`` the
unconditional class. A class-balanced subset of ``max_images`` rows (None: the whole split).

Size: parameter counts of the VAR: ``total`` and ``non_embedding`` = total minus the input embeddings (class,
token (``word_embed``), start, position and level embeddings) and the output head (``head``, the C×V projection to
the vocabulary), as in the language-model scaling laws (Kaplan et al. 2020), which count neither embeddings nor
the unembedding. The AdaLN before the head (``head_nm``) is a conditioned layer norm and is counted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

log = logging.getLogger("varup.studies.heldout")

#: first components of the parameter names that ``non_embedding`` leaves out
EMBEDDINGS = ("word_embed", "class_emb", "pos_start", "pos_1LC", "lvl_embed", "head")


def param_counts(model) -> dict:
    """``total``, ``non_embedding`` and ``embedding`` parameter counts of a VAR, and ``by_part`` (each left-out
    part's count)."""
    total, parts = 0, {k: 0 for k in EMBEDDINGS}
    for name, p in model.named_parameters():
        total += p.numel()
        first = name.split(".")[0]
        if first in parts:
            parts[first] += p.numel()
    emb = sum(parts.values())
    return {"total": int(total), "non_embedding": int(total - emb), "embedding": int(emb), "by_part": parts}


def heldout_nll(var, vae, tokens, labels, *, class_mode: str, batch_size: int, device) -> np.ndarray:
    """Per-image mean NLL per token of ``tokens`` (N, L), in chunks with a progress line."""
    from varup.base.utils import progress
    from varup.studies.ood import image_nll

    chunk = batch_size * 8
    out = []
    for a in progress(range(0, len(tokens), chunk), total=-(-len(tokens) // chunk), desc="held-out NLL", unit="chunk"):
        r = image_nll(var, vae, np.asarray(tokens[a:a + chunk]), labels[a:a + chunk], batch_size=batch_size,
                      device=device, class_mode=class_mode)
        out.append(r["nll_per_token"])
    return np.concatenate(out) if out else np.zeros(0)


def run_heldout(model, tokenizer, tokens_dir, out_json, *, split: str = "val", max_images: int | None = None,
                class_mode: str = "label", batch_size: int = 64, device: str = "auto", meta: dict | None = None) -> dict:
    """Held-out loss and parameter counts of one trained model; writes ``out_json`` (and its provenance)."""
    from varup.base.utils import atomic_write_json, write_provenance
    from varup.data.subsets import balanced_subset
    from varup.models.generators import load_generator
    from varup.tokenizer.tokens import TokenCache

    t0 = time.time()
    if class_mode not in ("label", "null"):
        raise ValueError(f"run_heldout: class_mode must be 'label' or 'null' (experiments.scaling.class_mode), got "
                         f"{class_mode!r}")
    var, vae, dev = load_generator(model, tokenizer, device)
    cache = TokenCache(tokens_dir, split)
    cache.check_made_by(vae)
    rows = balanced_subset(cache.labels, max_images)
    if not len(rows):
        raise ValueError(f"{tokens_dir}: split {split!r} has no token maps (experiments.scaling.split)")
    nll = heldout_nll(var, vae, cache.tokens[rows], cache.labels[rows], class_mode=class_mode, batch_size=batch_size,
                      device=dev)
    out = {"mean_nll_per_token": float(nll.mean()), "std_nll_per_token": float(nll.std()), "n": int(len(rows)),
           "split": split, "class_mode": class_mode, "max_images": max_images, "params": param_counts(var),
           "depth": len(var.blocks), "embed_dim": int(var.C),
           "model": str(model), "meta": dict(meta or {}), "wall_s": round(time.time() - t0, 2)}
    atomic_write_json(out_json, out)
    write_provenance(out_json, config={k: out[k] for k in ("split", "class_mode", "max_images", "model")},
                     device=str(dev), started=t0)
    log.info("held-out NLL/token %.4f on %d %s images (%s), %d non-embedding / %d parameters", out["mean_nll_per_token"],
             out["n"], split, class_mode, out["params"]["non_embedding"], out["params"]["total"])
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m varup.studies.heldout``: the rule ``scaling_heldout``."""
    from varup.base.runtime import deterministic_requested, set_deterministic
    from varup.base.utils import remove_orphan_provenance, set_threads, setup_logging

    ap = argparse.ArgumentParser(prog="python -m varup.studies.heldout", description="one run's held-out token loss")
    for k in ("model", "tokenizer", "tokens", "out"):
        ap.add_argument(f"--{k}", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--class-mode", choices=("label", "null"), default="label")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--run", default=None, help="dataset/depth/method/seed of the run (recorded)")
    ap.add_argument("--log", default=None)
    a = ap.parse_args(argv)
    setup_logging(a.log)
    set_threads(a.threads)
    remove_orphan_provenance(a.out)  # a sidecar left by a failed run of this output
    set_deterministic(deterministic_requested(os.environ))  # config `deterministic`, as every varup command
    run_heldout(a.model, a.tokenizer, a.tokens, a.out, split=a.split, max_images=a.max_images,
                class_mode=a.class_mode, batch_size=a.batch_size, device=a.device,
                meta={"run": a.run} if a.run else None)
    return 0


__all__ = ["EMBEDDINGS", "param_counts", "heldout_nll", "run_heldout", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
