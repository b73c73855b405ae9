"""The objective against straightforward float64 computations written here, values and gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from varup.training.losses import LossConfig, UncertaintyLoss, token_losses
from varup.training.references import (
    build_references,
    code_clusters,
    codebook_tau,
    dataset_reference,
    semantic_reference,
)

torch.manual_seed(0)


# ------------------------------------------------------------------ float64 reference, written plainly
def ref_terms(logits, targets, s_star, clusters, C, ls, kind, eps):
    """Per-token ce, d, H in float64 from an explicit softmax (no tricks)."""
    z = logits.double()
    V = z.shape[-1]
    p = torch.softmax(z, -1)
    logp = torch.log_softmax(z, -1)
    ce = -(1 - ls) * logp.gather(1, targets[:, None]).squeeze(1) - ls * logp.mean(-1)
    s = V * p.var(-1, unbiased=False)  # V · Var_v[p_v]
    ss = s_star.double().expand_as(s)
    if kind == "squared":
        d = (s - ss) ** 2
    elif kind == "wasserstein":
        d = (torch.sqrt(s + eps) - torch.sqrt(ss + eps)) ** 2
    else:
        r = (s + eps) / (ss + eps)
        d = 0.5 * (r - 1 - torch.log(r))
    P = torch.stack([p[:, clusters == c].sum(-1) for c in range(C)], -1)
    H = -(torch.where(P > 0, P * torch.log(P), torch.zeros_like(P))).sum(-1)
    return ce, d, H


def onehot_assign(clusters, C):
    return F.one_hot(clusters, C).float()


@pytest.mark.parametrize("V,C,N", [(8, 3, 40), (4096, 64, 24)])
@pytest.mark.parametrize("kind", ["squared", "wasserstein", "kl"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_token_losses_match_float64_reference(V, C, N, kind, ls):
    g = torch.Generator().manual_seed(V + N)
    logits = (torch.randn(N, V, generator=g) * 3).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g)
    s_star = torch.rand(N, generator=g) * 0.5
    clusters = torch.randint(0, C, (V,), generator=g)
    clusters[:C] = torch.arange(C)  # every cluster non-empty
    w = torch.rand(N, 3, generator=g)  # arbitrary upstream gradient

    out = token_losses(logits, targets, s_star=s_star, cluster_assign=onehot_assign(clusters, C), label_smoothing=ls,
                       discrepancy=kind, eps=1e-6)
    (out * w).sum().backward()
    ours_grad = logits.grad.clone()

    ref_logits = logits.detach().double().requires_grad_(True)
    ce, d, H = ref_terms(ref_logits, targets, s_star, clusters, C, ls, kind, 1e-6)
    ref = torch.stack([ce, d, H], -1)
    (ref * w.double()).sum().backward()

    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(ours_grad.double(), ref_logits.grad, atol=2e-6, rtol=2e-3)
    assert torch.isfinite(ours_grad).all()


def test_cross_entropy_part_equals_torch():
    logits = torch.randn(30, 16)
    t = torch.randint(0, 16, (30,))
    for ls in (0.0, 0.2):
        ours = token_losses(logits, t, want_2nd=False, want_se=False, label_smoothing=ls)[:, 0]
        torch.testing.assert_close(ours, F.cross_entropy(logits, t, reduction="none", label_smoothing=ls))


def test_bf16_logits_are_supported():
    logits = torch.randn(20, 32).bfloat16().requires_grad_(True)
    t = torch.randint(0, 32, (20,))
    out = token_losses(logits, t, s_star=torch.zeros(20), cluster_assign=onehot_assign(torch.arange(32) % 4, 4))
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()
    ref = token_losses(logits.detach().float(), t, s_star=torch.zeros(20), cluster_assign=onehot_assign(torch.arange(32) % 4, 4))
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("kind", ["squared", "wasserstein", "kl"])
def test_second_order_term_is_zero_at_the_reference(kind):
    V = 64
    q = torch.softmax(torch.randn(10, V), -1)
    s_of_q = (q * q).sum(-1) - 1 / V
    logits = q.log().requires_grad_(True)
    out = token_losses(logits, torch.zeros(10, dtype=torch.long), s_star=s_of_q, discrepancy=kind, want_se=False)
    assert out[:, 1].abs().max() < 1e-10
    out[:, 1].sum().backward()
    assert logits.grad.abs().max() < 1e-6
    # and strictly positive away from it
    out2 = token_losses(logits.detach(), torch.zeros(10, dtype=torch.long), s_star=s_of_q + 0.1, discrepancy=kind, want_se=False)
    assert (out2[:, 1] > 0).all()


def test_extreme_distributions_have_finite_gradients():
    V = 4096
    logits = torch.zeros(4, V)
    logits[0] = 0.0  # uniform: s = 0
    logits[1, 7] = 80.0  # one-hot
    logits[2, :2] = 60.0
    logits[3] = torch.linspace(-50, 50, V)
    logits.requires_grad_(True)
    clusters = torch.arange(V) % 64
    for kind in ("squared", "wasserstein", "kl"):
        logits.grad = None
        out = token_losses(logits, torch.tensor([0, 7, 1, 5]), s_star=torch.zeros(4), cluster_assign=onehot_assign(clusters, 64),
                           discrepancy=kind)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all(), kind


def test_uncertainty_loss_totals_and_per_scale_components():
    PN = (1, 2, 3)
    V, B = 32, 5
    L = 14
    codebook = torch.randn(V, 4)
    tokens = torch.randint(0, V, (50, L))
    refs = build_references(codebook, tokens, PN, num_clusters=6)
    logits = torch.randn(B, L, V, requires_grad=True)
    targets = torch.randint(0, V, (B, L))
    for reference in ("uniform", "dataset", "semantic"):
        cfg = LossConfig(lambda_2nd=0.3, lambda_se=0.2, reference=reference, discrepancy="squared")
        loss = UncertaintyLoss(cfg, PN, refs)
        out = loss(logits, targets)
        if reference == "uniform":
            s_star = torch.zeros(B * L)
        elif reference == "dataset":
            s_star = refs["dataset_s_star"][torch.tensor([0] + [1] * 4 + [2] * 9)].repeat(B)
        else:
            s_star = refs["semantic_s_star"][targets.reshape(-1)]
        ce, d, H = ref_terms(logits.detach().reshape(-1, V), targets.reshape(-1), s_star, refs["clusters"], 6, 0.0, "squared", 0)
        torch.testing.assert_close(out.ce.double(), ce.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.l2nd.double(), d.mean(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.lse.double(), H.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.total.double(), ce.mean() + 0.3 * d.mean() + 0.2 * H.mean(), rtol=1e-5, atol=1e-6)
        # per-scale rows: token-count weighted mean over scales = overall mean
        counts = torch.tensor([1.0, 4.0, 9.0])
        torch.testing.assert_close((out.per_scale * counts).sum(1) / L, torch.stack([out.ce, out.l2nd, out.lse]), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.per_scale[0, 0].double(), ce.view(B, L)[:, 0].mean(), rtol=1e-5, atol=1e-6)


def test_baseline_gradient_is_plain_cross_entropy():
    PN = (1, 2)
    refs = build_references(torch.randn(16, 4), None, PN, num_clusters=4)
    logits = torch.randn(3, 5, 16, requires_grad=True)
    t = torch.randint(0, 16, (3, 5))
    loss = UncertaintyLoss(LossConfig(), PN, refs)
    out = loss(logits, t)  # λ1 = λ2 = 0: the regularisers are not computed in training...
    assert out.l2nd == 0 and out.lse == 0
    diag = loss.diagnostics(logits, t)  # ...but read on log steps, outside the gradient
    assert diag["l2nd"] > 0 and diag["lse"] > 0 and diag["gshare_2nd"] == 0 and diag["gshare_se"] == 0
    assert diag["gshare_2nd_per_lambda"] > 0 and diag["gshare_se_per_lambda"] > 0
    out.total.backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(ref_logits.view(-1, 16), t.view(-1)).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_references_against_direct_computation():
    g = torch.Generator().manual_seed(3)
    E = torch.randn(40, 5, generator=g)
    D = torch.cdist(E.double(), E.double())
    nn = (D + torch.diag(torch.full((40,), math.inf, dtype=torch.float64))).min(1).values
    tau = codebook_tau(E)
    assert abs(tau - float(nn.median())) < 1e-5
    s, tau2 = semantic_reference(E)
    assert tau2 == tau
    q = torch.exp(-D**2 / (2 * tau**2))
    q = q / q.sum(1, keepdim=True)
    torch.testing.assert_close(s.double(), 40 * q.var(1, unbiased=False), rtol=1e-5, atol=1e-7)
    # dataset reference: dispersion of the per-scale code histogram
    tokens = torch.randint(0, 40, (30, 1 + 4), generator=g)
    ds = dataset_reference(tokens, (1, 2), 40)
    h1 = torch.bincount(tokens[:, 1:].reshape(-1), minlength=40).double()
    h1 /= h1.sum()
    assert abs(float(ds[1]) - float((h1**2).sum() - 1 / 40)) < 1e-6
    # k-means clusters are deterministic for a seed and cover all clusters
    c1, c2 = code_clusters(E, 6, seed=1), code_clusters(E, 6, seed=1)
    assert torch.equal(c1, c2) and set(c1.tolist()) == set(range(6))


def test_loss_config_validation():
    with pytest.raises(ValueError, match="loss.reference"):
        LossConfig(reference="gaussian")
    with pytest.raises(ValueError, match="loss.discrepancy"):
        LossConfig(discrepancy="l1")
    with pytest.raises(ValueError, match="dataset_s_star"):
        UncertaintyLoss(LossConfig(lambda_2nd=0.1, reference="dataset"), (1, 2), {"clusters": torch.zeros(4, dtype=torch.long)})
