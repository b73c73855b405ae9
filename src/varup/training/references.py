"""The references of the uncertainty-preserving objective, built once per tokenizer (rule ``references``) or per LM
embedding matrix: s*(code) of the semantic readings (a Gaussian over codebook-embedding distance, bandwidth τ or
τ set by a median effective support), s* per scale of the dataset reading, k-means code clusters for L_SE, and
their statistics. Kept apart from the loss so that an edit of the loss re-runs training, not the references."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

REF_KEYS = {"semantic": "semantic_s_star", "semantic_k": "semantic_k_s_star", "dataset": "dataset_s_star"}


# ----------------------------------------------------------------------------------- the fused kernel
def dispersion(p: torch.Tensor) -> torch.Tensor:
    """s(p) = V·Var_v[p_v] = Σ p² - 1/V along the last dim."""
    return p.square().sum(-1) - 1.0 / p.shape[-1]


# -------------------------------------------------------------------------------- references (once)
@torch.no_grad()
def codebook_tau(codebook: torch.Tensor, chunk: int = 1024) -> float:
    """Median distance from each code to its nearest other code (the semantic reference's bandwidth τ)."""
    E = codebook.float()
    V = E.shape[0]
    nn_d = torch.empty(V)
    for a in range(0, V, chunk):
        d = torch.cdist(E[a:a + chunk], E)
        d[torch.arange(d.shape[0]), torch.arange(a, a + d.shape[0])] = torch.inf
        nn_d[a:a + chunk] = d.min(dim=1).values.cpu()
    return float(nn_d.median())


def _gaussian_rows(E: torch.Tensor, a: int, b: int, tau: float) -> torch.Tensor:
    """Rows a..b of q*(v | g) ∝ exp(-‖e_v - e_g‖² / 2τ²) (float64)."""
    d2 = torch.cdist(E[a:b], E).square()
    return torch.softmax(-d2 / (2 * tau * tau), dim=1)


@torch.no_grad()
def semantic_reference(codebook: torch.Tensor, tau: float | None = None, chunk: int = 1024,
                       with_entropy: bool = False):
    """s*(g) for every code g: the dispersion of q*(v) ∝ exp(-‖e_v - e_g‖² / 2τ²). Returns (V,) float32 and τ
    (and the (V,) entropies of q* with ``with_entropy``).

    Computed in float64, row chunks of the V×V distance matrix at a time (never stored whole)."""
    E = codebook.double()
    V = E.shape[0]
    if tau is None:
        tau = codebook_tau(codebook)
    if not tau > 0:
        raise ValueError(f"semantic reference bandwidth tau must be > 0, got {tau} (duplicate codebook entries?)")
    out = torch.empty(V, dtype=torch.float64)
    ent = torch.empty(V, dtype=torch.float64)
    for a in range(0, V, chunk):
        q = _gaussian_rows(E, a, min(V, a + chunk), tau)
        out[a:a + chunk] = dispersion(q).cpu()
        ent[a:a + chunk] = -torch.special.xlogy(q, q).sum(1).cpu()
    return (out.float(), float(tau), ent.float()) if with_entropy else (out.float(), float(tau))


def effective_support(s: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The number of equally likely codes with the same Σq² (inverse Simpson index): 1 / (s + 1/V)."""
    return 1.0 / (s.double() + 1.0 / vocab_size)


@torch.no_grad()
def max_distance(E: torch.Tensor, chunk: int = 1024) -> float:
    """The largest distance between two rows of E, a chunk of rows at a time: O(chunk·V) memory, never the V×V
    matrix (185 GB at V = 151,936); the same value as ``torch.cdist(E, E).max()``."""
    return max(float(torch.cdist(E[a:a + chunk], E).max()) for a in range(0, E.shape[0], chunk))


@torch.no_grad()
def support_tau(codebook: torch.Tensor, k: float, iters: int = 40, chunk: int = 1024) -> float:
    """The bandwidth τ at which the median effective support of q*(· | g) over the codes g is ``k`` codes.

    Effective support grows monotonically with τ (from 1 code at τ → 0 to V at τ → ∞), so a bisection in log τ
    finds it; k must lie strictly between 1 and V."""
    V = codebook.shape[0]
    if not 1.0 < k < V:
        raise ValueError(f"references.support_k must be between 1 and the vocabulary size {V} (exclusive), got {k}")
    E = codebook.double()
    lo, hi = math.log(codebook_tau(codebook, chunk) * 1e-3 + 1e-12), math.log(max_distance(E, chunk) * 10 + 1e-12)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        s = torch.cat([dispersion(_gaussian_rows(E, a, min(V, a + chunk), math.exp(mid))) for a in range(0, V, chunk)])
        if float(torch.quantile(effective_support(s, V), 0.5)) < k:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


@torch.no_grad()
def dataset_reference(tokens: torch.Tensor, patch_nums: Sequence[int], vocab_size: int,
                      with_entropy: bool = False):
    """s* per scale: the dispersion of the empirical code histogram of that scale in the token cache (N, L)
    (and the histogram's entropy per scale with ``with_entropy``)."""
    out, ent = [], []
    a = 0
    for pn in patch_nums:
        t = tokens[:, a:a + pn * pn].reshape(-1).long()
        a += pn * pn
        h = torch.bincount(t, minlength=vocab_size).double()
        h = h / h.sum()
        out.append(dispersion(h))
        ent.append(-torch.special.xlogy(h, h).sum())
    s = torch.stack(out).float()
    return (s, torch.stack(ent).float()) if with_entropy else s


def code_clusters(codebook: torch.Tensor, num_clusters: int = 64, seed: int = 0, n_init: int = 4) -> torch.Tensor:
    """k-means of the codebook embeddings (scikit-learn, fixed seed) -> (V,) int64 cluster of each code."""
    from sklearn.cluster import KMeans

    E = codebook.detach().double().cpu().numpy()
    k = min(num_clusters, E.shape[0])
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(E)
    return torch.as_tensor(km.labels_, dtype=torch.long)


def assignment_matrix(clusters: torch.Tensor, num_clusters: int | None = None) -> torch.Tensor:
    """(V,) cluster ids -> (V, C) one-hot float32 matrix, so that P = p @ A sums p within each cluster."""
    C = int(clusters.max()) + 1 if num_clusters is None else num_clusters
    return F.one_hot(clusters.long(), C).float()


def build_references(codebook: torch.Tensor, tokens: torch.Tensor | None, patch_nums: Sequence[int], *,
                     num_clusters: int = 64, cluster_seed: int = 0, tau: float | None = None,
                     support_k: float | None = 8.0) -> dict:
    """Everything the objective needs, computed once per tokenizer/token cache (saved by the pipeline):
    clusters, the ``semantic`` s* (τ = ``tau`` or the median nearest-neighbour distance), the ``semantic_k`` s*
    (τ set so that q* has a median effective support of ``support_k`` codes; skipped when None), the
    ``dataset`` s* per scale, and the entropy of each reference distribution (for the training logs)."""
    V = codebook.shape[0]
    s_sem, tau, h_sem = semantic_reference(codebook, tau, with_entropy=True)
    refs = {
        "semantic_s_star": s_sem,
        "semantic_entropy": h_sem,
        "tau": torch.tensor(tau),
        "clusters": code_clusters(codebook, num_clusters, cluster_seed),
        "patch_nums": torch.tensor(list(patch_nums)),
        "vocab_size": torch.tensor(V),
    }
    if support_k is not None:
        tau_k = support_tau(codebook, support_k)
        s_k, _, h_k = semantic_reference(codebook, tau_k, with_entropy=True)
        refs.update(semantic_k_s_star=s_k, semantic_k_entropy=h_k, tau_k=torch.tensor(tau_k),
                    support_k=torch.tensor(float(support_k)))
    if tokens is not None:
        refs["dataset_s_star"], refs["dataset_entropy"] = dataset_reference(tokens, patch_nums, V, with_entropy=True)
    return refs


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    x = x.double().flatten()
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"mean": float(x.mean()), "q10": float(q[0]), "median": float(q[1]), "q90": float(q[2])}


def reference_stats(refs: Mapping[str, torch.Tensor]) -> dict:
    """What each reference asks of the model: s* and effective support (median and quantiles over the codes, or
    per scale for ``dataset``), τ, and the reference entropy. Written beside the references file and in the report."""
    V = int(refs["vocab_size"])
    out: dict = {"vocab_size": V, "uniform": {"s_star": 0.0, "effective_support": float(V), "entropy": math.log(V)}}
    for name, tau_key in (("semantic", "tau"), ("semantic_k", "tau_k")):
        key = REF_KEYS[name]
        if key not in refs:
            continue
        out[name] = {"tau": float(refs[tau_key]), "s_star": _quantiles(refs[key]),
                     "effective_support": _quantiles(effective_support(refs[key], V)),
                     "entropy": _quantiles(refs[f"{name}_entropy"])}
        if name == "semantic_k":
            out[name]["support_k"] = float(refs["support_k"])
    if "dataset_s_star" in refs:
        s = refs["dataset_s_star"]
        out["dataset"] = {"s_star_per_scale": s.tolist(), "effective_support_per_scale": effective_support(s, V).tolist(),
                          "entropy_per_scale": refs["dataset_entropy"].tolist()}
    return out


def load_references(path, map_location="cpu") -> dict:
    from varup.base.checkpoint import read_checkpoint

    refs = read_checkpoint(path, map_location)
    if not isinstance(refs, dict) or "clusters" not in refs:
        raise ValueError(f"{path}: not a varup loss-reference file (missing 'clusters')")
    return refs
