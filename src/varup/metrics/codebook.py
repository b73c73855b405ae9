"""Codebook usage of VQ token maps, per scale of a VAR multi-scale token sequence and overall."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def usage(codes: np.ndarray, vocab_size: int) -> dict:
    """Usage statistics of a flat array of code indices: ``active_codes`` (distinct codes used),
    ``active_fraction`` (of the vocabulary), ``entropy_nats`` of the empirical code histogram and
    ``perplexity`` = exp(entropy) (the effective number of equally used codes), and ``n_tokens``."""
    counts = np.bincount(codes.ravel(), minlength=vocab_size)
    n = int(counts.sum())
    p = counts[counts > 0] / n
    entropy = float(-(p * np.log(p)).sum())
    active = int((counts > 0).sum())
    return {"n_tokens": n, "active_codes": active, "active_fraction": active / vocab_size,
            "entropy_nats": entropy, "perplexity": float(np.exp(entropy))}


def codebook_stats(tokens: np.ndarray, patch_nums: Sequence[int], vocab_size: int) -> dict:
    """Codebook usage of ``tokens`` (N, L) with L = sum(pn**2 for pn in patch_nums), scales concatenated coarse to
    fine as in VAR. Returns ``per_scale`` (a list of :func:`usage` dicts with ``scale`` and ``patch_num``),
    ``overall`` (all tokens pooled) and ``vocab_size``."""
    tokens = np.asarray(tokens)
    lengths = [int(pn) ** 2 for pn in patch_nums]
    if tokens.ndim != 2 or tokens.shape[1] != sum(lengths):
        raise ValueError(f"tokens must be (N, {sum(lengths)}) for patch_nums {list(patch_nums)}, got {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    tokens = tokens.astype(np.int64, copy=False)
    bounds = np.cumsum([0] + lengths)
    per_scale = [{"scale": k, "patch_num": int(pn), **usage(tokens[:, bounds[k]:bounds[k + 1]], vocab_size)}
                 for k, pn in enumerate(patch_nums)]
    return {"per_scale": per_scale, "overall": usage(tokens, vocab_size), "vocab_size": vocab_size}
