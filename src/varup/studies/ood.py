"""Table 3's OOD detection: teacher-forced token NLL of in-distribution and OOD images under a trained model, and
the AUROC of NLL as the OOD score."""
from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import torch

from varup.models.common import check_pair, eval_mode
from varup.models.var import VAR
from varup.models.vqvae import VQVAE, split_tokens

log = logging.getLogger("varup.studies.editing")



# ------------------------------------------------------------------------------------------------ OOD / NLL
@torch.no_grad()
def _token_nll(var: VAR, x: torch.Tensor, tok: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) float64 per-token -log p of the true tokens under teacher forcing with classes ``cls``, and (B, L)
    bool: the top-1 prediction is not the true token."""
    logits = var(cls, x)  # (B, L, V) float32
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    return nll.double(), logits.argmax(-1) != tok


@torch.no_grad()
def image_nll(var: VAR, vae: VQVAE, tokens, labels=None, *, batch_size: int = 64, device: str | torch.device = "cpu",
              class_mode: str = "null") -> dict:
    """Token-likelihood of token maps under the teacher-forced transformer (no CFG), in nats.

    ``tokens`` (N, L) flat rows (numpy, memmap or tensor); ``labels`` (N,) needed for ``class_mode='label'``.
    ``class_mode``: 'null' = the unconditional class (the default, fair to OOD images that have no ID label);
    'label' = the given labels; 'max' = the best class, min over classes 0..C-1 of the image's total NLL
    (C forward passes per image). Logits are formed one batch at a time; per-token values are summed in float64.

    Returns numpy arrays: nll_per_token (N,) mean over the L tokens, nll_total (N,) sum, bits_per_token (N,),
    nll_per_scale (N, SN) mean per scale, class_used (N,) (num_classes = null class), wrong (N,) the number of tokens
    whose top-1 prediction is not the true token (Table 3's token error, :mod:`varup.studies.corruptions`).
    """
    if class_mode not in CLASS_MODES:
        raise ValueError(f"class_mode must be one of {CLASS_MODES}, got {class_mode!r}")
    check_pair(var, vae)
    if class_mode == "label" and labels is None:
        raise ValueError("class_mode='label' needs labels")
    dev = torch.device(device)
    var.to(dev)
    vae.to(dev)
    tokens_np = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens
    N = len(tokens_np)
    L = var.L
    if N and (tokens_np.ndim != 2 or tokens_np.shape[1] != L):
        raise ValueError(f"tokens must have shape (N, {L}), got {tuple(tokens_np.shape)}")
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).reshape(-1)
        if len(labels) != N:
            raise ValueError(f"got {len(labels)} labels for {N} token rows")
    sid = var.lvl_1L[0].cpu()
    SN = len(var.patch_nums)
    counts = torch.bincount(sid, minlength=SN).double()
    total = np.zeros(N, np.float64)
    per_scale = np.zeros((N, SN), np.float64)
    used, wrong = np.zeros(N, np.int64), np.zeros(N, np.int64)
    C = var.num_classes
    with eval_mode(var, vae):
        for a in range(0, N, batch_size):
            tok = torch.from_numpy(np.asarray(tokens_np[a:a + batch_size]).astype(np.int64)).to(dev)
            B = tok.shape[0]
            x = vae.idxBl_to_var_input(split_tokens(tok, var.patch_nums))
            if class_mode == "max":
                best, best_c, best_w = None, None, None
                for c in range(C):
                    nll, w = _token_nll(var, x, tok, torch.full((B,), c, dtype=torch.long, device=dev))
                    nll, w = nll.cpu(), w.cpu()
                    if best is None:
                        best, best_c, best_w = nll, torch.zeros(B, dtype=torch.long), w
                    else:
                        better = nll.sum(1) < best.sum(1)
                        best = torch.where(better[:, None], nll, best)
                        best_w = torch.where(better[:, None], w, best_w)
                        best_c = torch.where(better, c, best_c)
                nll, cls, w = best, best_c, best_w
            else:
                cls = (torch.full((B,), C, dtype=torch.long) if class_mode == "null"
                       else torch.from_numpy(labels[a:a + B]))
                nll, w = (t.cpu() for t in _token_nll(var, x, tok, cls.to(dev)))
            total[a:a + B] = nll.sum(1).numpy()
            wrong[a:a + B] = w.sum(1).numpy()
            per_scale[a:a + B] = (torch.zeros(B, SN, dtype=torch.float64).index_add_(1, sid, nll) / counts).numpy()
            used[a:a + B] = cls.cpu().numpy()
    per_token = total / L
    return {"nll_per_token": per_token, "nll_total": total, "bits_per_token": per_token / math.log(2),
            "nll_per_scale": per_scale, "class_used": used, "wrong": wrong}


def ood_auroc(nll_in, nll_out) -> float:
    """AUROC of separating OOD (positive) from ID by the NLL score (higher NLL = more OOD)."""
    from sklearn.metrics import roc_auc_score

    a = np.asarray(nll_in, np.float64).reshape(-1)
    b = np.asarray(nll_out, np.float64).reshape(-1)
    if not len(a) or not len(b):
        raise ValueError(f"AUROC needs ID and OOD scores, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("AUROC scores must be finite")
    y = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    return float(roc_auc_score(y, np.concatenate([a, b])))


def _nll_stats(r: dict) -> dict:
    n = len(r["nll_total"])
    return {"n": int(n), "mean_nll_per_token": float(r["nll_per_token"].mean()),
            "std_nll_per_token": float(r["nll_per_token"].std()), "mean_nll_total": float(r["nll_total"].mean()),
            "mean_bits_per_token": float(r["bits_per_token"].mean()),
            "mean_nll_per_scale": r["nll_per_scale"].mean(0).tolist()}


def run_ood(model: str | os.PathLike, tokenizer: str | os.PathLike, id_tokens_dir: str | os.PathLike,
            ood_tokens_dir: str | os.PathLike, out_json: str | os.PathLike, *, max_images: int | None = None,
            class_mode: str = "null", batch_size: int = 64, device: str = "cpu") -> dict:
    """Table 3: NLL of ID (val split of ``id_tokens_dir``) and OOD (split 'ood' of ``ood_tokens_dir``) images under
    one model, and the OOD AUROC. Class-balanced deterministic subsets of at most ``max_images`` each (the OOD rows'
    labels only balance the subset). Writes ``out_json`` atomically and returns the same dict."""
    from varup.base.utils import atomic_write_json, write_provenance
    from varup.data.subsets import balanced_subset
    from varup.models.generators import load_generator
    from varup.tokenizer.tokens import TokenCache

    t0 = time.time()
    if class_mode not in ("null", "max"):
        raise ValueError(f"run_ood: class_mode must be 'null' or 'max' (OOD images have no in-distribution label), "
                         f"got {class_mode!r}")
    var, vae, dev = load_generator(model, tokenizer, device)
    id_c, ood_c = TokenCache(id_tokens_dir, "val"), TokenCache(ood_tokens_dir, "ood")
    for c in (id_c, ood_c):
        c.check_made_by(vae)
    sha = [c.meta.get("tokenizer_sha256") for c in (id_c, ood_c)]
    if all(sha) and sha[0] != sha[1]:
        raise ValueError(f"ID and OOD token caches were made by different tokenizers ({sha[0][:12]} vs {sha[1][:12]})")
    res = {}
    for key, c in (("id", id_c), ("ood", ood_c)):
        rows = balanced_subset(c.labels, max_images)
        r = image_nll(var, vae, c.tokens[rows], None, batch_size=batch_size, device=dev, class_mode=class_mode)
        res[key] = r
    out = {
        "auroc": ood_auroc(res["id"]["nll_total"], res["ood"]["nll_total"]),
        "id": _nll_stats(res["id"]), "ood": _nll_stats(res["ood"]), "class_mode": class_mode,
        "model": str(model), "tokenizer": str(tokenizer), "id_tokens": str(id_tokens_dir),
        "ood_tokens": str(ood_tokens_dir), "max_images": max_images,
        "protocol": ("score = negative log-likelihood (nats) of an image's multi-scale token map under the "
                     "teacher-forced VAR (no CFG), summed over all L tokens (per-token = total / L, so the ranking "
                     "is the same); conditioning: " + {"null": "the null (unconditional) class for ID and OOD",
                                                       "max": "the best class (min NLL over all classes)"}[class_mode]
                     + "; AUROC with OOD as the positive class and higher NLL = more OOD; ID = class-balanced "
                     "val split, OOD = split 'ood'; tokens from the same tokenizer"),
        "wall_s": round(time.time() - t0, 2),
    }
    atomic_write_json(out_json, out)
    write_provenance(out_json, config={k: out[k] for k in ("class_mode", "max_images", "model", "tokenizer")},
                     device=str(dev), started=t0)
    log.info("OOD AUROC %.4f (ID NLL/token %.4f, OOD %.4f, %s)", out["auroc"], out["id"]["mean_nll_per_token"],
             out["ood"]["mean_nll_per_token"], class_mode)
    return out


CLASS_MODES = ("null", "label", "max")
