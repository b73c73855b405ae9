"""How strong is each term of the objective, and what does it cost? ``python -m varup.bench.strength``.

Prints (and with ``--json`` writes):

* ``cost`` — loss forward + backward time on (B·L, V) logits for plain ``F.cross_entropy``, the baseline as
  trained (``UncertaintyLoss`` with λ1 = λ2 = 0: cross-entropy only) and the full objective, at V = 256 (the toy)
  and V = 4096 (the official tokenizer).
* ``shares`` — on calibrated synthetic logits (targets drawn from the predicted distribution, temperature set for
  a given mean entropy), the logit-gradient norm of each weighted regulariser as a share of CE's, for each
  reading at the λ values given, exactly as the training logs report them.
* ``references`` — s* statistics (median, quantiles, effective support) of a Gaussian codebook (V = 4096, 32-d by
  default) under the median-nearest-neighbour τ and the support-k τ.

The toy's own codebook statistics are in ``results/<exp>/<dataset>/refs.json`` and the ``loss_references`` table.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from varup.bench.suite import timeit
from varup.training.losses import LossConfig, UncertaintyLoss
from varup.training.references import build_references, reference_stats

READINGS = {
    "paper (token mean, semantic)": {},
    "image_sum, semantic_k": {"l2nd_reduction": "image_sum", "reference": "semantic_k"},
    "raw dispersion": {"dispersion_scale": "raw"},
}


def calibrated_logits(n: int, V: int, entropy: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian logits scaled (bisection) to a mean predictive entropy of ``entropy`` nats, and targets drawn
    from the predicted distributions (a calibrated model)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g)
    lo, hi = 0.0, 50.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        h = float(-(torch.softmax(mid * z, -1) * torch.log_softmax(mid * z, -1)).sum(-1).mean())
        lo, hi = (mid, hi) if h > entropy else (lo, mid)
    z = z * 0.5 * (lo + hi)
    return z, torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)


def gaussian_references(V: int, dim: int, seed: int = 0, support_k: float = 8.0) -> dict:
    """Loss references of a Gaussian codebook (V codes of dimension ``dim``)."""
    E = torch.randn(V, dim, generator=torch.Generator().manual_seed(seed))
    return build_references(E, None, [1], num_clusters=min(64, V), support_k=support_k)


def shares(V: int, L: int, entropy: float, lambdas_2nd, lambdas_se, refs: dict, B: int = 4) -> list[dict]:
    z, t = calibrated_logits(B * L, V, entropy)
    z, t = z.view(B, L, V), t.view(B, L)
    pn = [1] * L  # L one-token scales: only L matters for the readings
    out = []
    for name, reading in READINGS.items():
        for l1 in lambdas_2nd:
            d = UncertaintyLoss(LossConfig(lambda_2nd=l1, **reading), pn, refs).diagnostics(z, t)
            out.append({"reading": name, "lambda_2nd": l1, "gshare_2nd": d["gshare_2nd"],
                        "pred_dispersion": d["pred_dispersion"], "ref_dispersion": d["ref_dispersion"]})
    for l2 in lambdas_se:
        d = UncertaintyLoss(LossConfig(lambda_se=l2), pn, refs).diagnostics(z, t)
        out.append({"reading": "L_SE", "lambda_se": l2, "gshare_se": d["gshare_se"]})
    return out


def cost(V: int, N: int, refs: dict, repeats: int = 10) -> dict:
    z0 = torch.randn(1, N, V)
    t = torch.randint(0, V, (1, N))
    pn = [1] * N
    fns = {"ce_only_torch": lambda z: F.cross_entropy(z.view(-1, V), t.view(-1)),
           "baseline_as_trained": UncertaintyLoss(LossConfig(), pn, refs),
           "full_objective": UncertaintyLoss(LossConfig(lambda_2nd=0.002, lambda_se=0.01), pn, refs)}
    res = {"V": V, "tokens": N}
    for name, f in fns.items():
        def step(f=f):
            z = z0.clone().requires_grad_(True)
            out = f(z, t) if name != "ce_only_torch" else f(z)
            (out.total if hasattr(out, "total") else out).backward()
        ts = timeit(step, torch.device("cpu"), warmup=2, repeats=repeats)
        res[f"{name}_ms"] = 1000 * sorted(ts)[len(ts) // 2]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m varup.bench.strength", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2720, help="tokens per loss call in the cost test (4 x 680)")
    ap.add_argument("--dim", type=int, default=32, help="codebook dimension of the Gaussian V = 4096 codebook")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    results = {"cost": [], "shares": {}, "references": {}}
    for V, L, H in ((256, 85, 3.4), (4096, 680, 5.0)):
        refs = gaussian_references(V, a.dim if V == 4096 else 16)
        results["references"][str(V)] = reference_stats(refs)
        results["shares"][str(V)] = shares(V, L, H, [0.002, 0.02, 0.2], [0.01, 0.1], refs)
        results["cost"].append(cost(V, a.tokens if V == 4096 else 32 * 85, refs))
    for c in results["cost"]:
        print(f"cost V={c['V']} ({c['tokens']} tokens): CE (torch) {c['ce_only_torch_ms']:.1f} ms, baseline as "
              f"trained {c['baseline_as_trained_ms']:.1f} ms, full objective {c['full_objective_ms']:.1f} ms")
    for V, rows in results["shares"].items():
        for r in rows:
            print(f"shares V={V}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in r.items()))
    for V, st in results["references"].items():
        for name in ("semantic", "semantic_k"):
            s = st[name]
            print(f"references V={V} {name}: tau {s['tau']:.4g}, s* median {s['s_star']['median']:.3g} "
                  f"[{s['s_star']['q10']:.3g}, {s['s_star']['q90']:.3g}], effective support median "
                  f"{s['effective_support']['median']:.1f} codes")
    if a.json:
        from varup.base.utils import atomic_write_json

        atomic_write_json(a.json, results)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
