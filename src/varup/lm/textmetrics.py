"""Text metrics of Table 6: MAUVE (mauve-text) over LM features, Self-BLEU (sacrebleu), distinct-n.

Definitions (exactly what is computed):

* **Features** (:func:`featurize`): each text is tokenized on its own with ``tokenizer(text, truncation=True,
  max_length=max_length)`` (the tokenizer's default special tokens, as mauve-text's ``tokenizer.encode``; the
  first ``max_length`` tokens are kept), the model is run with ``output_hidden_states=True`` and the feature is
  ``hidden_states[-1]`` (the final layer, i.e. after the model's final norm for GPT-2/Qwen2/Llama) at the text's
  last token — mauve-text's own featurizer (``mauve.utils.featurize_tokens_from_model``, GPT-2 large on a
  cluster). Batches are padded on the right by this function whatever ``tokenizer.padding_side`` says, with an
  attention mask, and the last real token is indexed from the mask, so a batch gives the features of one text at
  a time (position ids are then the plain 0..L-1 of the unpadded text). A text that tokenizes to zero tokens (the
  empty string) is featurised as the eos token alone (mauve-text drops empty texts instead; we keep one feature
  row per text). Features are float32, shape (N, H).
* **MAUVE** (:func:`mauve_score`): ``mauve.compute_mauve(p_features, q_features, ...)`` with p = the human /
  reference texts and q = the model generations (mauve-text's convention); defaults are mauve-text's: seed 25,
  ``num_buckets='auto'`` (k-means on max(2, round(min(|p|, |q|) / 10)) clusters after l2-normalisation and PCA
  to 90 % explained variance), scaling factor c = 5, 25 mixture weights. ``mauve`` is the unsmoothed score;
  ``mauve_star`` (Krichevsky-Trofimov smoothed histograms, Pillutla et al. 2023) is returned beside it.
* **Self-BLEU** (:func:`self_bleu`; Zhu et al. 2018, Texygen): the mean over texts i of sentence BLEU of text i
  against all the other texts as references, each in [0, 1] (sacrebleu's 0-100 divided by 100). sacrebleu's
  ``BLEU(max_ngram_order=4, tokenize='13a', smooth_method='exp', effective_order=True)``, case-sensitive,
  brevity penalty against the closest reference length (ties: the shorter). Note sacrebleu's ``effective_order``
  only drops n-gram orders the hypothesis is too short to have; an order with no matches is smoothed by ``exp``
  (NIST: 1 / (2^k · total)), and a hypothesis sharing no unigram with any reference scores exactly 0.
  ``sample=k`` scores a seeded random subset of k hypotheses, each still against all other texts.
* **distinct-n** (:func:`distinct_n`): unique n-grams / total n-grams over all texts, whitespace tokens.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np


# ------------------------------------------------------------------------------------------------ features
def _token_ids(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    out = []
    for t in texts:
        ids = list(tokenizer(t, truncation=True, max_length=max_length)["input_ids"])
        if not ids:
            if eos is None:
                raise ValueError(f"text {t!r} tokenizes to no tokens and the tokenizer has no eos token")
            ids = [int(eos)]
        out.append(ids)
    return out


def featurize(model, tokenizer, texts: list[str], *, max_length: int = 1024, batch_size: int = 8,
              device="cpu") -> np.ndarray:
    """Last-layer hidden state at each text's last token, float32 (N, H); see the module docstring."""
    import torch

    from varup.base.utils import progress

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    dev = torch.device(device)
    model.to(dev)
    model.eval()
    ids = _token_ids(tokenizer, texts, max_length)
    if not ids:
        hidden = getattr(getattr(model, "config", None), "hidden_size", 0)
        return np.zeros((0, hidden), dtype=np.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batch similar lengths: less padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    feats: list[np.ndarray | None] = [None] * len(ids)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    with torch.no_grad():
        for batch in progress(batches, desc="featurize", unit="batch"):
            lens = [len(ids[i]) for i in batch]
            L = max(lens)
            input_ids = torch.full((len(batch), L), int(pad), dtype=torch.long)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for r, i in enumerate(batch):  # right padding: real tokens keep positions 0..len-1
                input_ids[r, :lens[r]] = torch.tensor(ids[i], dtype=torch.long)
                mask[r, :lens[r]] = 1
            outs = model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True,
                         return_dict=True)
            last = (mask.sum(dim=1) - 1).to(dev)
            h = outs.hidden_states[-1][torch.arange(len(batch), device=dev), last]
            h = h.float().cpu().numpy()
            for r, i in enumerate(batch):
                feats[i] = h[r]
    return np.stack(feats).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------------ MAUVE
def mauve_score(p_features, q_features, *, seed: int = 25, num_buckets="auto", scaling_factor: float = 5.0,
                kmeans_explained_var: float = 0.9) -> dict:
    """MAUVE of q (generations) against p (human texts) from features: mauve-text's estimator.

    Returns ``{"mauve", "mauve_star", "frontier_integral", "num_buckets", "n_p", "n_q"}``."""
    import mauve

    p = np.asarray(p_features, dtype=np.float32)
    q = np.asarray(q_features, dtype=np.float32)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise ValueError(f"features must be (N, H) with equal H, got p {p.shape}, q {q.shape}")
    if p.shape[0] < 2 or q.shape[0] < 2:
        raise ValueError(f"MAUVE needs at least 2 samples on each side, got p={p.shape[0]}, q={q.shape[0]}")
    if num_buckets != "auto":
        num_buckets = int(num_buckets)
    out = mauve.compute_mauve(p_features=p, q_features=q, seed=int(seed), num_buckets=num_buckets,
                              mauve_scaling_factor=float(scaling_factor),
                              kmeans_explained_var=float(kmeans_explained_var), verbose=False, device_id=-1)
    res = {"mauve": float(out.mauve), "num_buckets": int(out.num_buckets), "n_p": int(p.shape[0]),
           "n_q": int(q.shape[0])}
    for k in ("mauve_star", "frontier_integral"):
        if getattr(out, k, None) is not None:
            res[k] = float(getattr(out, k))
    return res


# ------------------------------------------------------------------------------------------------ diversity
def self_bleu(texts: list[str], *, max_order: int = 4, tokenize: str = "13a", smooth_method: str = "exp",
              sample: int | None = None, seed: int = 0) -> float:
    """Self-BLEU in [0, 1] (lower = more diverse); see the module docstring."""
    from sacrebleu.metrics import BLEU

    texts = list(texts)
    if len(texts) < 2:
        raise ValueError(f"Self-BLEU needs at least 2 texts, got {len(texts)}")
    bleu = BLEU(max_ngram_order=max_order, tokenize=tokenize, smooth_method=smooth_method, effective_order=True)
    idx = list(range(len(texts)))
    if sample is not None and sample < len(texts):
        if sample < 1:
            raise ValueError(f"sample must be >= 1, got {sample}")
        idx = sorted(random.Random(seed).sample(idx, sample))
    scores = [bleu.sentence_score(texts[i], texts[:i] + texts[i + 1:]).score / 100.0 for i in idx]
    return float(np.mean(scores))


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique n-grams / total n-grams over all texts (whitespace tokens); 0.0 when there are none."""
    grams = [tuple(w[j:j + n]) for w in (t.split() for t in texts) for j in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


__all__ = ["featurize", "mauve_score", "self_bleu", "distinct_n"]
