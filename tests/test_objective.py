"""The objective's readings (issue 11): each against a direct float64 implementation, gradient shares against
autograd, the support-k reference bandwidth, the baseline paying for CE alone, dtype and autocast handling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import varup.training.losses as Lmod
from varup.training.losses import LossConfig, UncertaintyLoss, token_losses
from varup.training.references import (
    build_references,
    dispersion,
    effective_support,
    max_distance,
    reference_stats,
    semantic_reference,
    support_tau,
)

PN = (1, 2, 3)
L = 14
V = 24


@pytest.fixture(scope="module")
def refs():
    E = torch.randn(V, 4, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, V, (20, L), generator=torch.Generator().manual_seed(1))
    return build_references(E, tokens, PN, num_clusters=5, support_k=4.0)


def direct_total(logits, t, refs, cfg: LossConfig):
    """The objective written out in float64 from its definition, with autograd doing the calculus."""
    B, Lq, Vq = logits.shape
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    ce = -logp.gather(-1, t[..., None]).squeeze(-1)
    c = 1.0 if cfg.dispersion_scale == "vocab" else 1.0 / Vq
    s = c * (p.var(-1, unbiased=False) * Vq)  # V·Var_v[p_v] (times 1/V for the raw variance)
    key = {"semantic": "semantic_s_star", "semantic_k": "semantic_k_s_star"}[cfg.reference]
    s_star = c * refs[key].double()[t]
    d = (s - s_star) ** 2
    P = torch.stack([p[..., refs["clusters"] == k].sum(-1) for k in range(int(refs["clusters"].max()) + 1)], -1)
    H = -(P * P.clamp_min(1e-300).log()).sum(-1)
    l2nd = d.sum(1).mean() if cfg.l2nd_reduction == "image_sum" else d.mean()
    sign = -1.0 if cfg.se_direction == "maximize" else 1.0
    return ce.mean() + cfg.lambda_2nd * l2nd + sign * cfg.lambda_se * H.mean()


READINGS = [
    dict(),
    dict(l2nd_reduction="image_sum"),
    dict(dispersion_scale="raw"),
    dict(se_direction="maximize"),
    dict(reference="semantic_k", l2nd_reduction="image_sum", se_direction="maximize"),
]


@pytest.mark.parametrize("reading", READINGS, ids=lambda r: "-".join(f"{v}" for v in r.values()) or "paper")
def test_each_reading_matches_a_direct_float64_implementation(refs, reading):
    cfg = LossConfig(lambda_2nd=0.7, lambda_se=0.3, **reading)
    loss = UncertaintyLoss(cfg, PN, refs)
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, L, V, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randint(0, V, (3, L), generator=g)
    out = loss(logits, t)
    assert out.total.dtype == torch.float64  # float64 logits stay float64
    ref = direct_total(logits, t, refs, cfg)
    torch.testing.assert_close(out.total, ref, rtol=1e-10, atol=1e-12)
    g1, = torch.autograd.grad(out.total, logits)
    g2, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12)
    small = logits[:1, :, :].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: loss(z, t[:1]).total, (small,))


def test_gradient_shares_equal_autograd_norm_ratios(refs):
    cfg = LossConfig(lambda_2nd=0.05, lambda_se=0.2, reference="semantic_k", l2nd_reduction="image_sum",
                     se_direction="maximize")
    loss = UncertaintyLoss(cfg, PN, refs)
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(4, L, V, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.randint(0, V, (4, L), generator=g)
    diag = loss.diagnostics(logits, t)
    per = token_losses(logits.view(-1, V), t.view(-1), s_star=refs["semantic_k_s_star"][t.view(-1)],
                       cluster_assign=loss.assign).view(4, L, 3)
    ce, l2, se = per[..., 0].mean(), per[..., 1].sum(1).mean(), per[..., 2].mean()
    gce, = torch.autograd.grad(ce, logits, retain_graph=True)
    g2, = torch.autograd.grad(0.05 * l2, logits, retain_graph=True)
    gse, = torch.autograd.grad(-0.2 * se, logits)
    assert diag["gshare_2nd"] == pytest.approx(float(g2.norm() / gce.norm()), rel=1e-8)
    assert diag["gshare_se"] == pytest.approx(float(gse.norm() / gce.norm()), rel=1e-8)
    p = torch.softmax(logits.detach(), -1)
    assert diag["pred_dispersion"] == pytest.approx(float(dispersion(p).mean()), rel=1e-8)
    assert diag["pred_entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-8)
    assert diag["ref_dispersion"] == pytest.approx(float(refs["semantic_k_s_star"][t].double().mean()), rel=1e-6)


def test_support_tau_gives_the_configured_effective_support():
    E = torch.randn(300, 16, generator=torch.Generator().manual_seed(5))
    for k in (2.0, 8.0, 40.0):
        tau = support_tau(E, k)
        s, _ = semantic_reference(E, tau)
        assert float(torch.quantile(effective_support(s, 300), 0.5)) == pytest.approx(k, rel=0.01)
    with pytest.raises(ValueError, match="support_k"):
        support_tau(E, 300.0)


def test_support_tau_never_holds_a_vocabulary_by_vocabulary_matrix(monkeypatch):
    """At V = 151,936 (the LM arm's vocabulary) a V×V float64 matrix is 185 GB: every distance block support_tau
    computes has at most ``chunk`` rows, and its bracket's upper end is the exact largest distance."""
    E = torch.randn(300, 16, generator=torch.Generator().manual_seed(6))
    full_max = float(torch.cdist(E.double(), E.double()).max())
    rows, cdist = [], torch.cdist

    def counting_cdist(a, b, *args, **kw):
        rows.append(a.shape[0])
        return cdist(a, b, *args, **kw)

    monkeypatch.setattr(torch, "cdist", counting_cdist)
    assert max_distance(E.double(), chunk=64) == full_max
    support_tau(E, 8.0, iters=3, chunk=64)
    assert rows and max(rows) <= 64


def test_reference_stats_describe_each_reference(refs):
    st = reference_stats(refs)
    assert st["semantic_k"]["effective_support"]["median"] == pytest.approx(4.0, rel=0.01)
    assert st["semantic"]["tau"] == pytest.approx(float(refs["tau"]))
    assert len(st["dataset"]["s_star_per_scale"]) == len(PN)
    assert st["uniform"]["effective_support"] == V
    # s* and effective support are two views of the same number, 1 / (s* + 1/V): a sharper reference, fewer codes
    assert st["semantic_k"]["tau"] < st["semantic"]["tau"] or st["semantic_k"]["effective_support"]["median"] >= \
        st["semantic"]["effective_support"]["median"]
    assert 1 <= st["semantic"]["effective_support"]["q10"] <= st["semantic"]["effective_support"]["q90"] <= V


def test_a_zero_lambda_step_runs_no_regulariser_kernel(refs, monkeypatch):
    calls = {"disc": 0, "ent": 0}
    real_d, real_e = Lmod._discrepancy, Lmod._entropy_grad

    def count_d(*a, **k):
        calls["disc"] += 1
        return real_d(*a, **k)

    def count_e(*a, **k):
        calls["ent"] += 1
        return real_e(*a, **k)

    monkeypatch.setattr(Lmod, "_discrepancy", count_d)
    monkeypatch.setattr(Lmod, "_entropy_grad", count_e)
    logits = torch.randn(2, L, V, requires_grad=True)
    t = torch.randint(0, V, (2, L))
    UncertaintyLoss(LossConfig(), PN, refs)(logits, t).total.backward()
    assert calls == {"disc": 0, "ent": 0}
    UncertaintyLoss(LossConfig(lambda_2nd=0.1, lambda_se=0.1), PN, refs)(logits, t).total.backward()
    assert calls["disc"] > 0 and calls["ent"] > 0


def test_kl_with_the_uniform_reference_is_rejected():
    with pytest.raises(ValueError, match="kl.*uniform"):
        LossConfig(lambda_2nd=0.002, reference="uniform", discrepancy="kl")


def test_loss_kernel_ignores_autocast(refs):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(64, V, generator=g) * 4
    t = torch.randint(0, V, (64,), generator=g)
    A = F.one_hot(refs["clusters"], 5).float()
    kw = dict(s_star=refs["semantic_s_star"][t], cluster_assign=A)
    plain = token_losses(logits, t, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = token_losses(logits, t, **kw)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=0, atol=0)
    assert math.isfinite(float(plain.sum()))
