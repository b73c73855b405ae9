"""The LM head and the objective on the trained positions only, in chunks of positions: the peak is chunk × V
logits (and their gradient), not batch × length × V.

:func:`head_loss` takes the final hidden states of the positions whose next-token label is trained (N, E), the LM
head (weight (V, E), optional bias) and the labels (N,), and runs ``lm_head`` and the objective over ``chunk``
positions at a time. Each chunk's gradient with respect to its hidden states and to the head is computed at once
(:func:`torch.autograd.grad` inside the forward), so nothing of size chunk × V outlives its chunk; the backward only
scales the gradients kept (N × E and the head's V × E). The objective is :class:`varup.training.losses.UncertaintyLoss`
applied to each chunk as a (n, 1, V) batch, exactly as :func:`varup.lm.sft.lm_loss` applies it to all positions at
once: its terms are per-token, so a chunk's token mean weighted by n_chunk / N sums to the mean over all N tokens.
With one chunk the weight is exactly 1 and the arithmetic is the unchunked one's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from varup.training.losses import UncertaintyLoss

#: the statistics :func:`head_loss` returns, in this order: the objective and its terms (token means over the
#: ``denom`` tokens) and the predictive entropy of the trained positions (0 unless asked for)
STATS = ("loss", "ce", "l2nd", "lse", "pred_entropy")


def _chunk_pass(h, w, bias, targets, loss_fn: UncertaintyLoss, weight: float, entropy: bool):
    """One chunk: logits, the objective (a token mean, times ``weight``) and its gradients w.r.t. those of h, w,
    bias that require one (None for the others)."""
    with torch.enable_grad():
        logits = F.linear(h, w, bias)
        out = loss_fn(logits.unsqueeze(1), targets.unsqueeze(1))
        part = out.total * weight
    wanted = [x for x in (h, w, bias) if x is not None and x.requires_grad]
    found = iter(torch.autograd.grad(part, wanted))
    grads = [next(found) if x is not None and x.requires_grad else None for x in (h, w, bias)]
    ent = torch.zeros((), device=h.device)
    if entropy:
        logp = torch.log_softmax(logits.detach().float(), -1)
        ent = -(logp.exp() * logp).sum(-1).mean()
    stats = torch.stack([out.total.detach().float(), out.ce.float(), out.l2nd.float(), out.lse.float(), ent.float()])
    return part.detach(), stats * weight, grads


class _ChunkedHeadLoss(torch.autograd.Function):
    """hidden (N, E), weight (V, E), bias (V,) | None -> (the objective's share of this call, its statistics)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, loss_fn, chunk, denom, entropy):
        N = hidden.shape[0]
        w = weight.detach().requires_grad_(weight.requires_grad)
        b = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
        g_h = torch.zeros_like(hidden)
        g_w = torch.zeros_like(weight) if w.requires_grad else None
        g_b = torch.zeros_like(bias) if b is not None and b.requires_grad else None
        total = None
        stats = torch.zeros(len(STATS), device=hidden.device, dtype=torch.float32)
        step = chunk or max(N, 1)
        for a in range(0, N, step):
            h = hidden[a:a + step].detach().requires_grad_(True)
            part, s, (gh, gw, gb) = _chunk_pass(h, w, b, targets[a:a + step], loss_fn, h.shape[0] / denom, entropy)
            total, stats = part if total is None else total + part, stats + s
            g_h[a:a + step] = gh
            if g_w is not None:
                g_w += gw
            if g_b is not None:
                g_b += gb
        if total is None:  # no trained position in this micro-batch: no loss, zero gradients
            total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        ctx.save_for_backward(g_h, g_w, g_b)
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, g_total, _g_stats):
        g_h, g_w, g_b = ctx.saved_tensors
        grads = [None if g is None else g * g_total.to(g.dtype) for g in (g_h, g_w, g_b)]
        return (*grads, None, None, None, None, None)


def head_loss(hidden_NE: torch.Tensor, head: torch.nn.Module, targets_N: torch.Tensor, loss_fn: UncertaintyLoss, *,
              chunk: int | None, denom: int, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective of the trained positions, ``head`` (a Linear: the LM head) applied ``chunk`` positions at a time
    (None: all at once). Returns (the sum of the per-token objective over these N positions / ``denom``, with
    gradient; the :data:`STATS` summed the same way, detached). ``denom`` is the number of trained tokens the step's
    loss averages over (N itself when this is the whole batch; the rank's tokens across its micro-batches)."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
    return _ChunkedHeadLoss.apply(hidden_NE, head.weight, head.bias, targets_N, loss_fn, chunk, max(int(denom), 1),
                                  bool(entropy))


__all__ = ["head_loss", "STATS"]
