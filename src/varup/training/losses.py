"""The training objective  L = L_CE + λ1·L_2nd + λ2·L_SE  (the paper's eq. 6, made precise in DESIGN.md).

Per token (position i of scale k) with predicted distribution p over V codes and ground-truth code g:

* ``L_CE``  — cross-entropy, optional label smoothing ε: ``-(1-ε)·log p_g - ε·mean_v log p_v``.
* ``L_2nd`` — second-order regulariser ``d(c·s(p), c·s*)`` with the dispersion statistic
  ``s(p) = V·Var_v[p_v] = Σ_v p_v² - 1/V`` (0 for uniform, ≈1 for one-hot) and ``c = 1`` (``dispersion_scale:
  vocab``) or ``c = 1/V`` (``raw``: the variance of eq. 3 literally, O(1/V)).
  Reference ``s*``: ``uniform`` (0), ``dataset`` (s of the empirical code histogram of scale k in the training token
  cache), ``semantic`` (s of q*(v) ∝ exp(-‖e_v - e_g‖² / 2τ²) around the ground-truth code, τ = median
  nearest-neighbour distance; a V-vector) or ``semantic_k`` (the same kernel, τ set by :func:`support_tau` so that
  q* has a median effective support 1/Σq*² of k codes).
  Discrepancy ``d``: ``squared`` (s - s*)², ``wasserstein`` (√s - √s*)² (scale part of W2 between equal-mean
  Gaussians), ``kl`` ½(s/s* - 1 - ln(s/s*)) (KL(N(0,s) ‖ N(0,s*))); the last two add ``eps`` to s and s*
  (``kl`` with ``uniform`` is rejected: it would divide by eps).
* ``L_SE``  — semantic entropy over code clusters c (k-means of the codebook): ``P_c = Σ_{v∈c} p_v``,
  ``-Σ_c P_c log P_c``; ``se_direction: maximize`` flips its sign in the objective.

CE and L_SE are token means (every token weighs 1/L, as the official trainer); L_2nd is a token mean
(``l2nd_reduction: token_mean``) or summed over an image's L tokens (``image_sum``). The three per-token terms come
from one fused, chunked autograd function: it keeps only the logits and a few per-token scalars between forward and
backward (no V×V tensor, no saved softmax), so memory stays at or below plain cross-entropy and the gradient is
analytic. It runs with autocast disabled (float32, or float64 for float64 logits). A run whose λ are 0 computes
cross-entropy alone; :meth:`UncertaintyLoss.diagnostics` reads every term, its logit-gradient share against CE and
the predictive dispersion/entropy on log steps, outside the gradient.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from varup.models.common import autocast_off
from varup.training.references import REF_KEYS, assignment_matrix, dispersion

REFERENCES = ("uniform", "dataset", "semantic", "semantic_k")
DISCREPANCIES = ("squared", "wasserstein", "kl")
L2ND_REDUCTIONS = ("token_mean", "image_sum")
DISPERSION_SCALES = ("vocab", "raw")
SE_DIRECTIONS = ("minimize", "maximize")
@dataclass
class LossConfig:
    lambda_2nd: float = 0.0  # λ1
    lambda_se: float = 0.0  # λ2
    reference: str = "semantic"
    discrepancy: str = "squared"
    label_smoothing: float = 0.0
    eps: float = 1e-6  # added to s and s* by the wasserstein and kl discrepancies
    l2nd_reduction: str = "token_mean"  # token_mean (1/L per token, as CE) | image_sum (summed over an image's L tokens)
    dispersion_scale: str = "vocab"  # vocab: s = V·Var_v[p_v] | raw: s = Var_v[p_v] (eq. 3 literally, O(1/V))
    se_direction: str = "minimize"  # minimize: +λ2·L_SE (the paper's words) | maximize: -λ2·L_SE (keeps entropy)

    def __post_init__(self) -> None:
        for key, allowed in (("reference", REFERENCES), ("discrepancy", DISCREPANCIES),
                             ("l2nd_reduction", L2ND_REDUCTIONS), ("dispersion_scale", DISPERSION_SCALES),
                             ("se_direction", SE_DIRECTIONS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"loss.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.discrepancy == "kl" and self.reference == "uniform":
            raise ValueError("loss.discrepancy 'kl' with loss.reference 'uniform' divides by eps (s* = 0): "
                             "use squared or wasserstein, or another reference")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.lambda_2nd < 0 or self.lambda_se < 0:
            raise ValueError(f"loss weights must be >= 0, got lambda_2nd={self.lambda_2nd}, lambda_se={self.lambda_se}")

    def to_dict(self) -> dict:
        return asdict(self)


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


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 logits stay float64; every other dtype (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _ce_grad(p: torch.Tensor, targets: torch.Tensor, label_smoothing: float, weight: torch.Tensor) -> torch.Tensor:
    """weight · ∂ce/∂z = weight · (p - (1-ε)·onehot - ε/V), a new (n, V) tensor."""
    gz = p * weight
    if label_smoothing:
        gz -= weight * (label_smoothing / p.shape[-1])
    gz.scatter_add_(1, targets[:, None], (-(1 - label_smoothing) * weight).expand(p.shape[0], 1))
    return gz


def _dispersion_grad(p: torch.Tensor, S: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """coef · ∂S/∂z with S = Σ p²: coef · 2 p_j (p_j - S)."""
    return (2.0 * coef)[:, None] * p * (p - S[:, None])


def _entropy_grad(p: torch.Tensor, logP_code: torch.Tensor, H: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """coef · ∂H_sem/∂z = -coef · p_j (log P_{c(j)} + H)."""
    return -coef[:, None] * p * (logP_code + H[:, None])


class _TokenLosses(torch.autograd.Function):
    """(N, V) logits -> (N, 3) per-token [ce, d, H]; analytic, chunked backward."""

    @staticmethod
    def forward(ctx, logits, targets, s_star, assign, label_smoothing, kind, eps, want_2nd, want_se, scale):
        N, V = logits.shape
        dt = _compute_dtype(logits)
        out = logits.new_zeros(N, 3, dtype=dt)
        lse_all = logits.new_empty(N, dtype=dt)
        S_all = logits.new_empty(N, dtype=dt)
        C = assign.shape[1] if assign is not None else 0
        logP_all = logits.new_empty(N, C, dtype=dt) if want_se else None
        step = _chunk_rows(N, V)
        for a in range(0, N, step):
            b = min(N, a + step)
            z = logits[a:b].to(dt)
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
                    out[a:b, 1] = _discrepancy(scale * (S - 1.0 / V), scale * s_star[a:b], kind, eps)[0]
                if want_se:
                    P = p @ assign
                    out[a:b, 2] = -torch.special.xlogy(P, P).sum(-1)
                    logP_all[a:b] = P.clamp_min(1e-300 if dt == torch.float64 else 1e-30).log()
        ctx.save_for_backward(logits, targets, s_star, assign, lse_all, S_all, logP_all, out)
        ctx.cfg = (label_smoothing, kind, eps, want_2nd, want_se, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, s_star, assign, lse_all, S_all, logP_all, out = ctx.saved_tensors
        label_smoothing, kind, eps, want_2nd, want_se, scale = ctx.cfg
        N, V = logits.shape
        dt = _compute_dtype(logits)
        grad = torch.empty_like(logits)
        step = _chunk_rows(N, V)
        for a in range(0, N, step):
            b = min(N, a + step)
            p = torch.exp(logits[a:b].to(dt) - lse_all[a:b, None])
            g = grad_out[a:b].to(dt)
            gz = _ce_grad(p, targets[a:b], label_smoothing, g[:, 0:1])
            if want_2nd:
                S = S_all[a:b]
                dd_ds = _discrepancy(scale * (S - 1.0 / V), scale * s_star[a:b], kind, eps)[1]
                gz += _dispersion_grad(p, S, g[:, 1] * dd_ds * scale)
            if want_se:
                gz += _entropy_grad(p, logP_all[a:b] @ assign.T, out[a:b, 2], g[:, 2])
            grad[a:b] = gz.to(grad.dtype)
        return grad, None, None, None, None, None, None, None, None, None


def token_losses(logits: torch.Tensor, targets: torch.Tensor, *, s_star: torch.Tensor | None = None,
                 cluster_assign: torch.Tensor | None = None, label_smoothing: float = 0.0,
                 discrepancy: str = "squared", eps: float = 1e-6, want_2nd: bool = True,
                 want_se: bool = True, dispersion_scale: float = 1.0) -> torch.Tensor:
    """Per-token [ce, d(c·s, c·s*), H_sem] with an analytic gradient w.r.t. logits: (N, 3), float64 for float64
    logits, else float32.

    logits (N, V) any float dtype; targets (N,) long; s_star (N,) per-token reference (needed for the 2nd-order
    term); cluster_assign (V, C) one-hot float matrix of code clusters (needed for the semantic entropy);
    dispersion_scale c multiplies s and s* (1 = V·Var, 1/V = the raw variance). Terms that are not wanted are
    returned as 0 and cost nothing. Runs with autocast disabled, so no part (the cluster sum included) drops to bf16.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, V), got {tuple(logits.shape)}")
    N, V = logits.shape
    if targets.shape != (N,):
        raise ValueError(f"targets must be ({N},), got {tuple(targets.shape)}")
    if discrepancy not in DISCREPANCIES:
        raise ValueError(f"discrepancy must be one of {DISCREPANCIES}, got {discrepancy!r}")
    dt = _compute_dtype(logits)
    if want_2nd:
        if s_star is None:
            raise ValueError("s_star is required for the second-order term")
        s_star = s_star.to(device=logits.device, dtype=dt).expand(N).contiguous()
    else:
        s_star = logits.new_zeros(N, dtype=dt)
    if want_se:
        if cluster_assign is None or cluster_assign.shape[0] != V:
            raise ValueError(f"cluster_assign must be a ({V}, C) matrix for the semantic entropy")
        cluster_assign = cluster_assign.to(device=logits.device, dtype=dt)
    else:
        cluster_assign = None
    with autocast_off(logits.device.type):
        if not want_2nd and not want_se:  # cross-entropy alone (the baseline): torch's own kernel, ~3x faster
            ce = F.cross_entropy(logits.to(dt), targets.long(), reduction="none", label_smoothing=float(label_smoothing))
            return torch.stack([ce, torch.zeros_like(ce).detach(), torch.zeros_like(ce).detach()], 1)
        return _TokenLosses.apply(logits, targets.long(), s_star, cluster_assign, float(label_smoothing), discrepancy,
                                  float(eps), bool(want_2nd), bool(want_se), float(dispersion_scale))


@torch.no_grad()
def gradient_norms(logits: torch.Tensor, targets: torch.Tensor, *, s_star: torch.Tensor | None,
                   cluster_assign: torch.Tensor | None, label_smoothing: float = 0.0, discrepancy: str = "squared",
                   eps: float = 1e-6, dispersion_scale: float = 1.0) -> dict[str, float]:
    """Frobenius norms over all (N, V) entries of ∂/∂logits of Σ_tokens ce, Σ d and Σ H_sem (unweighted), plus the
    token means of the predictive dispersion s = V·Var_v[p_v] and the predictive entropy -Σ p log p.

    Norms of the sums: every term of the objective is a mean over the same tokens, so the 1/N factors cancel in the
    ratios that :meth:`UncertaintyLoss.diagnostics` logs. ``s_star=None`` / ``cluster_assign=None`` skip a term."""
    N, V = logits.shape
    dt = _compute_dtype(logits)
    sq = {"ce": 0.0, "l2nd": 0.0, "lse": 0.0}
    s_sum = h_sum = 0.0
    one = logits.new_ones(1, 1, dtype=dt)
    step = _chunk_rows(N, V)
    with autocast_off(logits.device.type):
        for a in range(0, N, step):
            b = min(N, a + step)
            z = logits[a:b].to(dt)
            logp = torch.log_softmax(z, dim=-1)
            p = logp.exp()
            S = p.square().sum(-1)
            s_sum += float((S - 1.0 / V).sum())
            h_sum += float(-(p * logp).sum())
            sq["ce"] += float(_ce_grad(p, targets[a:b].long(), label_smoothing, one).square().sum())
            if s_star is not None:
                ref = s_star.to(device=logits.device, dtype=dt).expand(N)[a:b]
                dd = _discrepancy(dispersion_scale * (S - 1.0 / V), dispersion_scale * ref, discrepancy, eps)[1]
                sq["l2nd"] += float(_dispersion_grad(p, S, dd * dispersion_scale).square().sum())
            if cluster_assign is not None:
                A = cluster_assign.to(device=logits.device, dtype=dt)
                P = p @ A
                H = -torch.special.xlogy(P, P).sum(-1)
                logP = P.clamp_min(1e-300 if dt == torch.float64 else 1e-30).log()
                sq["lse"] += float(_entropy_grad(p, logP @ A.T, H, torch.ones_like(H)).square().sum())
    out = {f"gnorm_{k}": v ** 0.5 for k, v in sq.items()}
    out.update(pred_dispersion=s_sum / max(N, 1), pred_entropy=h_sum / max(N, 1))
    return out


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
    """L = L_CE + w·λ1·L_2nd ± λ2·L_SE over (B, L, V) logits, with per-scale components for logging
    (w = L for ``l2nd_reduction: image_sum``, else 1; the sign is ``se_direction``).

    ``refs`` comes from :func:`build_references` (or its saved file). The backward pass computes only the terms
    whose weight is non-zero: a baseline (λ1 = λ2 = 0) pays for cross-entropy alone. The regularisers' values,
    gradient shares and the predictive dispersion/entropy of any run are read on log steps by
    :meth:`diagnostics`, under no_grad.
    """

    def __init__(self, cfg: LossConfig, patch_nums: Sequence[int], refs: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.cfg = cfg
        self.patch_nums = tuple(patch_nums)
        self.SN = len(self.patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        scale_ids = torch.cat([torch.full((pn * pn,), i, dtype=torch.long) for i, pn in enumerate(self.patch_nums)])
        self.register_buffer("scale_ids", scale_ids, persistent=False)
        # tokens per scale (>= 1), constant: the per-scale means need no bincount (a host sync) in a training step
        counts = torch.tensor([pn * pn for pn in self.patch_nums], dtype=torch.long).clamp_min(1)
        self.register_buffer("scale_counts", counts, persistent=False)
        refs = dict(refs or {})
        self.want_2nd = cfg.lambda_2nd > 0
        self.want_se = cfg.lambda_se > 0
        self.has_ref = self._has_reference(refs)
        if self.want_2nd and not self.has_ref:
            raise ValueError(f"loss.reference={cfg.reference!r} needs precomputed references "
                             f"({REF_KEYS.get(cfg.reference)}); rebuild the references file")
        if self.want_se and "clusters" not in refs:
            raise ValueError("loss.lambda_se > 0 needs the codebook clusters (references file)")
        self.w_2nd = cfg.lambda_2nd * (self.L if cfg.l2nd_reduction == "image_sum" else 1)
        self.w_se = cfg.lambda_se * (-1.0 if cfg.se_direction == "maximize" else 1.0)
        if self.has_ref and cfg.reference in ("semantic", "semantic_k"):
            self.register_buffer("s_star_code", refs[REF_KEYS[cfg.reference]].float(), persistent=False)
            self._register_optional("h_star_code", refs.get(f"{cfg.reference}_entropy"))
        elif self.has_ref and cfg.reference == "dataset":
            s = refs["dataset_s_star"].float()
            if s.numel() != self.SN:
                raise ValueError(f"dataset reference has {s.numel()} scales, patch_nums has {self.SN}")
            self.register_buffer("s_star_scale", s, persistent=False)
            self._register_optional("h_star_scale", refs.get("dataset_entropy"))
        if "clusters" in refs:
            self.register_buffer("assign", assignment_matrix(refs["clusters"]), persistent=False)

    def _register_optional(self, name: str, value: torch.Tensor | None) -> None:
        self.register_buffer(name, None if value is None else value.float(), persistent=False)

    def _has_reference(self, refs: Mapping) -> bool:
        return self.cfg.reference == "uniform" or REF_KEYS[self.cfg.reference] in refs

    def _s_star(self, targets_BL: torch.Tensor) -> torch.Tensor | None:
        if not self.has_ref:
            return None
        B, L = targets_BL.shape
        if self.cfg.reference == "uniform":
            return targets_BL.new_zeros((), dtype=torch.float32)
        if self.cfg.reference in ("semantic", "semantic_k"):
            return self.s_star_code[targets_BL.reshape(-1)]
        return self.s_star_scale[self.scale_ids[:L]].expand(B, L).reshape(-1)

    def _scale(self, V: int) -> float:
        """The factor c of c·s and c·s*: 1 for s = V·Var, 1/V for the raw variance."""
        return 1.0 if self.cfg.dispersion_scale == "vocab" else 1.0 / V

    def _h_star(self, targets_BL: torch.Tensor, V: int) -> float | None:
        """Mean entropy of the reference distribution over these targets (None when the file does not hold it)."""
        B, L = targets_BL.shape
        if self.cfg.reference == "uniform":
            return math.log(V)
        if self.cfg.reference in ("semantic", "semantic_k"):
            h = getattr(self, "h_star_code", None)
            return None if h is None else float(h[targets_BL.reshape(-1)].mean())
        h = getattr(self, "h_star_scale", None)
        return None if h is None else float(h[self.scale_ids[:L]].mean())

    def _per_token(self, logits_BLV: torch.Tensor, targets_BL: torch.Tensor, want_2nd: bool, want_se: bool):
        B, L, V = logits_BLV.shape
        if targets_BL.shape != (B, L):
            raise ValueError(f"targets must be ({B}, {L}), got {tuple(targets_BL.shape)}")
        return token_losses(
            logits_BLV.reshape(B * L, V), targets_BL.reshape(-1), s_star=self._s_star(targets_BL) if want_2nd else None,
            cluster_assign=getattr(self, "assign", None) if want_se else None,
            label_smoothing=self.cfg.label_smoothing, discrepancy=self.cfg.discrepancy, eps=self.cfg.eps,
            want_2nd=want_2nd, want_se=want_se, dispersion_scale=self._scale(V),
        ).view(B, L, 3)

    def _per_scale(self, per_tok: torch.Tensor) -> torch.Tensor:
        """(3, SN) per-scale means of the per-token terms, without a host sync (fixed-size ops only)."""
        per_pos = per_tok.detach().mean(0)  # (L, 3)
        L = per_pos.shape[0]
        sids = self.scale_ids[:L]
        per_scale = per_pos.new_zeros(self.SN, 3).index_add_(0, sids, per_pos)
        counts = (self.scale_counts if L == self.L
                  else torch.zeros_like(self.scale_counts).index_add_(0, sids, torch.ones_like(sids)).clamp_min(1))
        return (per_scale / counts[:, None]).T.contiguous()

    def forward(self, logits_BLV: torch.Tensor, targets_BL: torch.Tensor) -> LossOutput:
        per_tok = self._per_token(logits_BLV, targets_BL, self.want_2nd, self.want_se)
        means = per_tok.mean(dim=(0, 1))  # token means (every token weighs 1/L, as the official trainer)
        total = means[0]
        if self.want_2nd:
            total = total + self.w_2nd * means[1]
        if self.want_se:
            total = total + self.w_se * means[2]
        with torch.no_grad():
            per_scale = self._per_scale(per_tok)
        m = means.detach()
        return LossOutput(total=total, ce=m[0], l2nd=m[1], lse=m[2], per_scale=per_scale)

    @torch.no_grad()
    def diagnostics(self, logits_BLV: torch.Tensor, targets_BL: torch.Tensor) -> dict:
        """Log-step readings outside the gradient, for any run (λ = 0 included): the unweighted L_2nd and L_SE
        (token means and per scale), each weighted regulariser's logit-gradient norm as a share of CE's
        (``gshare_2nd`` = ‖∇_z(w·λ1·L_2nd)‖ / ‖∇_z L_CE‖, ``gshare_se`` likewise; ``*_per_lambda`` per unit of λ),
        and the predictive dispersion and entropy beside the reference's (``ref_dispersion``, ``ref_entropy``)."""
        logits_BLV = logits_BLV.detach()
        can_2nd, can_se = self.has_ref, hasattr(self, "assign")
        per_tok = self._per_token(logits_BLV, targets_BL, can_2nd, can_se)
        B, L, V = logits_BLV.shape
        s_star = self._s_star(targets_BL)
        g = gradient_norms(logits_BLV.reshape(B * L, V), targets_BL.reshape(-1), s_star=s_star,
                           cluster_assign=getattr(self, "assign", None), label_smoothing=self.cfg.label_smoothing,
                           discrepancy=self.cfg.discrepancy, eps=self.cfg.eps, dispersion_scale=self._scale(V))
        ce_norm = max(g["gnorm_ce"], 1e-30)
        unit_2nd = g["gnorm_l2nd"] / ce_norm * (self.L if self.cfg.l2nd_reduction == "image_sum" else 1)
        unit_se = g["gnorm_lse"] / ce_norm
        means = per_tok.mean(dim=(0, 1))
        return {
            "l2nd": float(means[1]), "lse": float(means[2]), "per_scale": self._per_scale(per_tok),
            "gshare_2nd": self.cfg.lambda_2nd * unit_2nd, "gshare_se": self.cfg.lambda_se * unit_se,
            "gshare_2nd_per_lambda": unit_2nd if can_2nd else None, "gshare_se_per_lambda": unit_se if can_se else None,
            "pred_dispersion": g["pred_dispersion"], "pred_entropy": g["pred_entropy"],
            "ref_dispersion": None if s_star is None else float(s_star.float().expand(B * L).mean()),
            "ref_entropy": self._h_star(targets_BL, V),
        }


__all__ = ["LossConfig", "UncertaintyLoss", "LossOutput", "token_losses", "gradient_norms", "dispersion", "assignment_matrix",
           "REFERENCES", "DISCREPANCIES", "L2ND_REDUCTIONS", "DISPERSION_SCALES", "SE_DIRECTIONS"]
