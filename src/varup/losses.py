"""The training objective  L = L_CE + λ1·L_2nd + λ2·L_SE  (the paper's eq. 6, made precise in DESIGN.md).

Per token (position i of scale k) with predicted distribution p over V codes and ground-truth code g:

* ``L_CE``  — cross-entropy, optional label smoothing ε: ``-(1-ε)·log p_g - ε·mean_v log p_v``.
* ``L_2nd`` — second-order regulariser ``d(s(p), s*)`` with the dispersion statistic
  ``s(p) = V·Var_v[p_v] = Σ_v p_v² - 1/V`` (0 for uniform, ≈1 for one-hot; the raw variance of eq. 3 is O(1/V)).
  Reference ``s*``: ``uniform`` (0), ``dataset`` (s of the empirical code histogram of scale k in the training token
  cache) or ``semantic`` (s of q*(v) ∝ exp(-‖e_v - e_g‖² / 2τ²) around the ground-truth code; a V-vector).
  Discrepancy ``d``: ``squared`` (s - s*)², ``wasserstein`` (√s - √s*)² (scale part of W2 between equal-mean
  Gaussians), ``kl`` ½(s/s* - 1 - ln(s/s*)) (KL(N(0,s) ‖ N(0,s*))); the last two add ``eps`` to s and s*.
* ``L_SE``  — semantic entropy over code clusters c (k-means of the codebook): ``P_c = Σ_{v∈c} p_v``,
  ``-Σ_c P_c log P_c``.

Each is a token mean (every token weighs 1/L, as the official trainer). The three per-token terms come from one
fused, chunked autograd function: it keeps only the logits and a few per-token scalars between forward and backward
(no V×V tensor, no saved softmax), so memory stays at or below plain cross-entropy and the gradient is analytic.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

REFERENCES = ("uniform", "dataset", "semantic")
DISCREPANCIES = ("squared", "wasserstein", "kl")


@dataclass
class LossConfig:
    lambda_2nd: float = 0.0  # λ1
    lambda_se: float = 0.0  # λ2
    reference: str = "semantic"
    discrepancy: str = "squared"
    label_smoothing: float = 0.0
    eps: float = 1e-6  # added to s and s* by the wasserstein and kl discrepancies

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"loss.reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.discrepancy not in DISCREPANCIES:
            raise ValueError(f"loss.discrepancy must be one of {DISCREPANCIES}, got {self.discrepancy!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.lambda_2nd < 0 or self.lambda_se < 0:
            raise ValueError(f"loss weights must be >= 0, got lambda_2nd={self.lambda_2nd}, lambda_se={self.lambda_se}")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------- the fused kernel
def dispersion(p: torch.Tensor) -> torch.Tensor:
    """s(p) = V·Var_v[p_v] = Σ p² - 1/V along the last dim."""
    return p.square().sum(-1) - 1.0 / p.shape[-1]


def _discrepancy(s: torch.Tensor, s_star: torch.Tensor, kind: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """d(s, s*) and ∂d/∂s."""
    if kind == "squared":
        diff = s - s_star
        return diff.square(), 2.0 * diff
    if kind == "wasserstein":
        rs, rr = (s + eps).sqrt(), (s_star + eps).sqrt()
        return (rs - rr).square(), (rs - rr) / rs
    if kind == "kl":
        a, b = s + eps, s_star + eps
        r = a / b
        return 0.5 * (r - 1.0 - r.log()), 0.5 * (1.0 / b - 1.0 / a)
    raise ValueError(kind)


def _chunk_rows(n: int, V: int, budget_elems: int = 1 << 24) -> int:
    return max(1, min(n, budget_elems // max(V, 1)))


class _TokenLosses(torch.autograd.Function):
    """(N, V) logits -> (N, 3) per-token [ce, d, H]; analytic, chunked backward."""

    @staticmethod
    def forward(ctx, logits, targets, s_star, assign, label_smoothing, kind, eps, want_2nd, want_se):
        N, V = logits.shape
        out = logits.new_zeros(N, 3, dtype=torch.float32)
        lse_all = logits.new_empty(N, dtype=torch.float32)
        S_all = logits.new_empty(N, dtype=torch.float32)
        C = assign.shape[1] if assign is not None else 0
        logP_all = logits.new_empty(N, C, dtype=torch.float32) if want_se else None
        step = _chunk_rows(N, V)
        for a in range(0, N, step):
            b = min(N, a + step)
            z = logits[a:b].float()
            lse = torch.logsumexp(z, dim=-1)
            logp_y = z.gather(1, targets[a:b, None]).squeeze(1) - lse
            ce = -logp_y if label_smoothing == 0 else -(1 - label_smoothing) * logp_y - label_smoothing * (z.mean(-1) - lse)
            out[a:b, 0] = ce
            lse_all[a:b] = lse
            if want_2nd or want_se:
                p = torch.exp(z - lse[:, None])
                S = p.square().sum(-1)
                S_all[a:b] = S
                if want_2nd:
                    out[a:b, 1] = _discrepancy(S - 1.0 / V, s_star[a:b], kind, eps)[0]
                if want_se:
                    P = p @ assign
                    out[a:b, 2] = -torch.special.xlogy(P, P).sum(-1)
                    logP_all[a:b] = P.clamp_min(1e-30).log()
        ctx.save_for_backward(logits, targets, s_star, assign, lse_all, S_all, logP_all, out)
        ctx.cfg = (label_smoothing, kind, eps, want_2nd, want_se)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, s_star, assign, lse_all, S_all, logP_all, out = ctx.saved_tensors
        label_smoothing, kind, eps, want_2nd, want_se = ctx.cfg
        N, V = logits.shape
        grad = torch.empty_like(logits)
        step = _chunk_rows(N, V)
        for a in range(0, N, step):
            b = min(N, a + step)
            z = logits[a:b].float()
            p = torch.exp(z - lse_all[a:b, None])
            g = grad_out[a:b].float()
            # d ce / dz = p - (1-ε)·onehot - ε/V
            gz = p * g[:, 0:1]
            if label_smoothing:
                gz -= g[:, 0:1] * (label_smoothing / V)
            gz.scatter_add_(1, targets[a:b, None], -(1 - label_smoothing) * g[:, 0:1])
            if want_2nd:
                S = S_all[a:b]
                dd_ds = _discrepancy(S - 1.0 / V, s_star[a:b], kind, eps)[1]
                # d s / d z_j = 2 p_j (p_j - S)
                gz += (2.0 * g[:, 1] * dd_ds)[:, None] * p * (p - S[:, None])
            if want_se:
                H = out[a:b, 2]
                # d H / d z_j = -p_j (log P_{c(j)} + H)
                logP_code = logP_all[a:b] @ assign.T
                gz -= g[:, 2:3] * p * (logP_code + H[:, None])
            grad[a:b] = gz.to(grad.dtype)
        return grad, None, None, None, None, None, None, None, None


def token_losses(logits: torch.Tensor, targets: torch.Tensor, *, s_star: torch.Tensor | None = None,
                 cluster_assign: torch.Tensor | None = None, label_smoothing: float = 0.0,
                 discrepancy: str = "squared", eps: float = 1e-6, want_2nd: bool = True,
                 want_se: bool = True) -> torch.Tensor:
    """Per-token [ce, d(s, s*), H_sem] as an (N, 3) float32 tensor with an analytic gradient w.r.t. logits.

    logits (N, V) any float dtype; targets (N,) long; s_star (N,) per-token reference (needed for the 2nd-order
    term); cluster_assign (V, C) one-hot float matrix of code clusters (needed for the semantic entropy).
    Terms that are not wanted are returned as 0 and cost nothing.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, V), got {tuple(logits.shape)}")
    N, V = logits.shape
    if targets.shape != (N,):
        raise ValueError(f"targets must be ({N},), got {tuple(targets.shape)}")
    if discrepancy not in DISCREPANCIES:
        raise ValueError(f"discrepancy must be one of {DISCREPANCIES}, got {discrepancy!r}")
    if want_2nd:
        if s_star is None:
            raise ValueError("s_star is required for the second-order term")
        s_star = s_star.to(device=logits.device, dtype=torch.float32).expand(N).contiguous()
    else:
        s_star = logits.new_zeros(N, dtype=torch.float32)
    if want_se:
        if cluster_assign is None or cluster_assign.shape[0] != V:
            raise ValueError(f"cluster_assign must be a ({V}, C) matrix for the semantic entropy")
        cluster_assign = cluster_assign.to(device=logits.device, dtype=torch.float32)
    else:
        cluster_assign = None
    return _TokenLosses.apply(logits, targets.long(), s_star, cluster_assign, float(label_smoothing), discrepancy,
                              float(eps), bool(want_2nd), bool(want_se))


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


@torch.no_grad()
def semantic_reference(codebook: torch.Tensor, tau: float | None = None, chunk: int = 1024) -> tuple[torch.Tensor, float]:
    """s*(g) for every code g: the dispersion of q*(v) ∝ exp(-‖e_v - e_g‖² / 2τ²). Returns (V,) float32 and τ.

    Computed in float64, row chunks of the V×V distance matrix at a time (never stored whole)."""
    E = codebook.double()
    V = E.shape[0]
    if tau is None:
        tau = codebook_tau(codebook)
    if not tau > 0:
        raise ValueError(f"semantic reference bandwidth tau must be > 0, got {tau} (duplicate codebook entries?)")
    out = torch.empty(V, dtype=torch.float64)
    for a in range(0, V, chunk):
        d2 = torch.cdist(E[a:a + chunk], E).square()
        q = torch.softmax(-d2 / (2 * tau * tau), dim=1)
        out[a:a + chunk] = dispersion(q).cpu()
    return out.float(), float(tau)


@torch.no_grad()
def dataset_reference(tokens: torch.Tensor, patch_nums: Sequence[int], vocab_size: int) -> torch.Tensor:
    """s* per scale: the dispersion of the empirical code histogram of that scale in the token cache (N, L)."""
    out = []
    a = 0
    for pn in patch_nums:
        t = tokens[:, a:a + pn * pn].reshape(-1).long()
        a += pn * pn
        h = torch.bincount(t, minlength=vocab_size).double()
        out.append(dispersion(h / h.sum()))
    return torch.stack(out).float()


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
                     num_clusters: int = 64, cluster_seed: int = 0, tau: float | None = None) -> dict:
    """Everything the objective needs, computed once per tokenizer/token cache (saved by the pipeline)."""
    V = codebook.shape[0]
    s_sem, tau = semantic_reference(codebook, tau)
    refs = {
        "semantic_s_star": s_sem,
        "tau": torch.tensor(tau),
        "clusters": code_clusters(codebook, num_clusters, cluster_seed),
        "patch_nums": torch.tensor(list(patch_nums)),
        "vocab_size": torch.tensor(V),
    }
    if tokens is not None:
        refs["dataset_s_star"] = dataset_reference(tokens, patch_nums, V)
    return refs


# ---------------------------------------------------------------------------------- the objective
@dataclass
class LossOutput:
    total: torch.Tensor  # scalar with grad
    ce: torch.Tensor  # scalar, detached
    l2nd: torch.Tensor
    lse: torch.Tensor
    per_scale: torch.Tensor  # (3, SN) detached: rows ce, l2nd, lse

    def scalars(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "ce": float(self.ce), "l2nd": float(self.l2nd), "lse": float(self.lse)}


class UncertaintyLoss(torch.nn.Module):
    """L = L_CE + λ1·L_2nd + λ2·L_SE over (B, L, V) logits with per-scale components for logging.

    ``refs`` comes from :func:`build_references` (or its saved file). With λ1 = λ2 = 0 (the baseline) the
    regularisers are still computed for logging when ``log_all`` is set, but never enter the gradient.
    """

    def __init__(self, cfg: LossConfig, patch_nums: Sequence[int], refs: Mapping[str, torch.Tensor] | None = None,
                 log_all: bool = True):
        super().__init__()
        self.cfg = cfg
        self.patch_nums = tuple(patch_nums)
        self.SN = len(self.patch_nums)
        scale_ids = torch.cat([torch.full((pn * pn,), i, dtype=torch.long) for i, pn in enumerate(self.patch_nums)])
        self.register_buffer("scale_ids", scale_ids, persistent=False)
        refs = dict(refs or {})
        self.want_2nd = cfg.lambda_2nd > 0 or (log_all and self._has_reference(refs))
        self.want_se = cfg.lambda_se > 0 or (log_all and "clusters" in refs)
        if cfg.lambda_2nd > 0 and not self._has_reference(refs):
            raise ValueError(f"loss.reference={cfg.reference!r} needs precomputed references "
                             f"({'semantic_s_star' if cfg.reference == 'semantic' else 'dataset_s_star'})")
        if cfg.lambda_se > 0 and "clusters" not in refs:
            raise ValueError("loss.lambda_se > 0 needs the codebook clusters (references file)")
        if self.want_2nd:
            if cfg.reference == "semantic":
                self.register_buffer("s_star_code", refs["semantic_s_star"].float(), persistent=False)
            elif cfg.reference == "dataset":
                s = refs["dataset_s_star"].float()
                if s.numel() != self.SN:
                    raise ValueError(f"dataset reference has {s.numel()} scales, patch_nums has {self.SN}")
                self.register_buffer("s_star_scale", s, persistent=False)
        if self.want_se:
            self.register_buffer("assign", assignment_matrix(refs["clusters"]), persistent=False)

    def _has_reference(self, refs: Mapping) -> bool:
        return {"uniform": True, "semantic": "semantic_s_star" in refs, "dataset": "dataset_s_star" in refs}[self.cfg.reference]

    def _s_star(self, targets_BL: torch.Tensor) -> torch.Tensor | None:
        if not self.want_2nd:
            return None
        B, L = targets_BL.shape
        if self.cfg.reference == "uniform":
            return targets_BL.new_zeros((), dtype=torch.float32)
        if self.cfg.reference == "semantic":
            return self.s_star_code[targets_BL.reshape(-1)]
        return self.s_star_scale[self.scale_ids[:L]].expand(B, L).reshape(-1)

    def forward(self, logits_BLV: torch.Tensor, targets_BL: torch.Tensor) -> LossOutput:
        B, L, V = logits_BLV.shape
        if targets_BL.shape != (B, L):
            raise ValueError(f"targets must be ({B}, {L}), got {tuple(targets_BL.shape)}")
        per_tok = token_losses(
            logits_BLV.reshape(B * L, V), targets_BL.reshape(-1), s_star=self._s_star(targets_BL),
            cluster_assign=getattr(self, "assign", None), label_smoothing=self.cfg.label_smoothing,
            discrepancy=self.cfg.discrepancy, eps=self.cfg.eps, want_2nd=self.want_2nd, want_se=self.want_se,
        ).view(B, L, 3)
        means = per_tok.mean(dim=(0, 1))  # token means (every token weighs 1/L, as the official trainer)
        total = means[0]
        if self.cfg.lambda_2nd > 0:
            total = total + self.cfg.lambda_2nd * means[1]
        if self.cfg.lambda_se > 0:
            total = total + self.cfg.lambda_se * means[2]
        with torch.no_grad():
            per_pos = per_tok.detach().mean(0)  # (L, 3)
            sids = self.scale_ids[:L]
            per_scale = per_pos.new_zeros(self.SN, 3).index_add_(0, sids, per_pos)
            per_scale = (per_scale / torch.bincount(sids, minlength=self.SN).clamp_min(1)[:, None]).T.contiguous()
        m = means.detach()
        return LossOutput(total=total, ce=m[0], l2nd=m[1], lse=m[2], per_scale=per_scale)


def load_references(path, map_location="cpu") -> dict:
    from varup.models.common import read_checkpoint

    refs = read_checkpoint(path, map_location)
    if not isinstance(refs, dict) or "clusters" not in refs:
        raise ValueError(f"{path}: not a varup loss-reference file (missing 'clusters')")
    return refs


__all__ = ["LossConfig", "UncertaintyLoss", "LossOutput", "token_losses", "dispersion", "semantic_reference",
           "dataset_reference", "code_clusters", "assignment_matrix", "build_references", "load_references",
           "codebook_tau", "REFERENCES", "DISCREPANCIES"]
