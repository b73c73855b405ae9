"""The scaling study (issue 24): the power-law fit and its intervals on synthetic losses with known exponents, the
held-out loss and parameter counts of a model, the table and figure, and the runs `snakemake -n scaling_study` plans."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import tiny_var
from test_train import assets  # noqa: F401  (the tiny tokenizer and token cache)
from tinydag import REPO, planned_jobs, smk
from varup.config import plan
from varup.config.schema import validate
from varup.models.checkpoint import model_payload
from varup.report.scaling import make_scaling_report
from varup.studies.heldout import run_heldout
from varup.studies.scaling import fit_offset_power_law, fit_power_law, run_scaling, scaling_fit

SIZES = {1: 8.3e4, 2: 6.3e5, 3: 2.1e6, 4: 5.0e6}


def synthetic(alphas: dict[str, float], rng, *, seeds=5, noise=0.02, shared=0.0, a=20.0) -> dict:
    """losses[method][size][seed] = a·N^−α·exp(ε): ε = a seed effect shared by the methods at a size (sd ``shared``,
    as a seed fixes initialisation and data order) plus each run's own noise (sd ``noise``)."""
    common = {d: rng.normal(0, shared, seeds) for d in SIZES}
    return {m: {d: {s: a * n ** -al * math.exp(common[d][s] + rng.normal(0, noise)) for s in range(seeds)}
                for d, n in SIZES.items()} for m, al in alphas.items()}


def test_the_fit_recovers_a_known_exponent():
    exact = fit_power_law(list(SIZES.values()), [20.0 * n ** -0.3 for n in SIZES.values()])
    assert exact["alpha"] == pytest.approx(0.3, abs=1e-12) and exact["a"] == pytest.approx(20.0, rel=1e-10)
    assert exact["r2"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for _ in range(40):  # the interval is calibrated: it covers the true exponent in most noisy replicates
        r = scaling_fit(synthetic({"baseline": 0.3, "ours": 0.3}, rng), SIZES, "baseline", n_boot=400, seed=1)
        f = r["methods"]["baseline"]
        assert r["interval"] == "bootstrap" and r["n_boot"] == 400
        assert abs(f["alpha"] - 0.3) < 0.03
        covered += f["ci_low"] <= 0.3 <= f["ci_high"]
        widths.append(f["ci_high"] - f["ci_low"])
    assert covered >= 34, covered  # nominal 95 % of 40 (31 without the sqrt(n / (n - 1)) spread of the seeds)
    assert 0 < np.median(widths) < 0.03


def test_the_paired_difference_excludes_zero_only_when_the_exponents_differ():
    rng = np.random.default_rng(3)
    # a large seed effect shared by both methods at each size: pairing by seed removes it from the difference
    same = scaling_fit(synthetic({"baseline": 0.3, "ours": 0.3}, rng, shared=0.08, noise=0.01), SIZES, "baseline",
                       n_boot=1000)
    d = same["differences"]["ours"]
    assert d["ci_low"] <= 0 <= d["ci_high"] and not d["excludes_zero"]
    apart = scaling_fit(synthetic({"baseline": 0.3, "ours": 0.34}, rng, shared=0.08, noise=0.01), SIZES, "baseline",
                        n_boot=1000)
    d = apart["differences"]["ours"]
    assert d["excludes_zero"] and d["ci_low"] > 0 and d["diff"] == pytest.approx(0.04, abs=0.015)
    # each exponent's own interval carries the shared seed effect, wider than the difference's
    f = apart["methods"]["ours"]
    assert f["ci_high"] - f["ci_low"] > 2 * (d["ci_high"] - d["ci_low"])


def test_one_seed_per_size_falls_back_to_ols_and_two_sizes_have_no_interval():
    rng = np.random.default_rng(5)
    one = {m: {d: {0: v[0]} for d, v in per.items()} for m, per in
           synthetic({"baseline": 0.3, "ours": 0.4}, rng, noise=0.01).items()}
    r = scaling_fit(one, SIZES, "baseline")
    f = r["methods"]["ours"]
    assert r["interval"] == "ols" and r["n_boot"] == 0 and "OLS standard error" in r["note"]
    half = f["ci_high"] - f["alpha"]
    from scipy import stats
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * f["se_alpha"])
    assert r["differences"]["ours"]["ci_low"] > 0
    two = {m: {d: v for d, v in per.items() if d in (1, 2)} for m, per in one.items()}
    r2 = scaling_fit(two, {1: SIZES[1], 2: SIZES[2]}, "baseline")
    assert r2["interval"] == "none" and math.isnan(r2["methods"]["ours"]["ci_low"])
    assert math.isnan(r2["differences"]["ours"]["ci_low"]) and "exact" in r2["note"]


def test_the_offset_form_recovers_an_exponent_above_an_irreducible_loss(monkeypatch):
    monkeypatch.setenv("VARUP_NO_PROGRESS", "1")
    n = list(SIZES.values()) + [2e7]
    exact = fit_offset_power_law(n, [1.2 + 30.0 * x ** -0.35 for x in n])
    assert exact["alpha"] == pytest.approx(0.35, abs=1e-6) and exact["c"] == pytest.approx(1.2, abs=1e-6)
    assert fit_power_law(n, [1.2 + 30.0 * x ** -0.35 for x in n])["alpha"] < 0.2  # a pure power law flattens
    rng = np.random.default_rng(11)
    sizes = dict(enumerate(n))
    losses = {m: {i: {s: (1.2 + 30.0 * x ** -0.35) * math.exp(rng.normal(0, 0.003)) for s in range(3)}
                  for i, x in sizes.items()} for m in ("baseline", "ours")}
    r = scaling_fit(losses, sizes, "baseline", n_boot=100, form="offset")
    f = r["methods"]["ours"]
    assert r["form"] == "offset" and f["ci_low"] <= 0.35 <= f["ci_high"] and abs(f["c"] - 1.2) < 0.1
    with pytest.raises(ValueError, match="at least 4 sizes"):
        fit_offset_power_law(n[:3], [1.5, 1.4, 1.3])


def test_held_out_loss_is_the_teacher_forced_cross_entropy_and_counts_exclude_embeddings(assets, tmp_path):  # noqa: F811
    from varup.models.vqvae import load_vqvae, split_tokens
    from varup.tokenizer.tokens import TokenCache

    var = tiny_var(num_classes=4)
    torch.save(model_payload(var), tmp_path / "model.pt")
    r = run_heldout(tmp_path / "model.pt", assets / "vqvae.pt", assets / "tokens", tmp_path / "h.json",
                    split="val", max_images=20, class_mode="label", batch_size=8, device="cpu")
    cache = TokenCache(assets / "tokens", "val")
    rows = np.concatenate([np.flatnonzero(cache.labels == c)[:5] for c in range(4)])
    rows.sort()
    tok = torch.from_numpy(cache.tokens[rows].astype(np.int64))
    vae = load_vqvae(assets / "vqvae.pt")
    with torch.no_grad():
        logits = var.eval()(torch.from_numpy(cache.labels[rows].astype(np.int64)),
                            vae.idxBl_to_var_input(split_tokens(tok, var.patch_nums)))
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok.reshape(-1)).item()
    assert r["n"] == 20 and r["mean_nll_per_token"] == pytest.approx(ce, rel=1e-5)
    assert json.loads((tmp_path / "h.json").read_text())["mean_nll_per_token"] == r["mean_nll_per_token"]
    p = r["params"]
    blocks = sum(x.numel() for x in var.blocks.parameters()) + sum(x.numel() for x in var.head_nm.parameters())
    assert p["non_embedding"] == blocks and p["total"] == sum(x.numel() for x in var.parameters())
    assert p["by_part"]["head"] == 32 * 64 + 64 and p["by_part"]["pos_1LC"] == var.L * 32
    null = run_heldout(tmp_path / "model.pt", assets / "vqvae.pt", assets / "tokens", tmp_path / "n.json",
                       split="val", max_images=20, class_mode="null", batch_size=8, device="cpu")
    assert null["mean_nll_per_token"] != pytest.approx(r["mean_nll_per_token"], rel=1e-6)


def test_the_table_and_figure_show_both_exponents_and_their_difference(tmp_path):
    rng = np.random.default_rng(7)
    losses = synthetic({"baseline": 0.3, "ours": 0.36}, rng, seeds=3)
    entries = []
    for m, per in losses.items():
        for d, by_seed in per.items():
            for s, v in by_seed.items():
                f = tmp_path / f"{m}_{d}_{s}.json"
                f.write_text(json.dumps({"mean_nll_per_token": v, "n": 64, "split": "val", "class_mode": "label",
                                         "params": {"non_embedding": SIZES[d], "total": SIZES[d] + 1000}}))
                entries.append({"method": m, "depth": d, "seed": s, "run": f"x/d{d}/{m}/seed{s}", "heldout": str(f)})
    st = run_scaling(entries, tmp_path / "scaling.json", baseline="baseline", n_boot=500, seed=0, confidence=0.95)
    df = make_scaling_report(tmp_path / "scaling.json", tmp_path / "tables", tmp_path / "figures")
    fit = df[df["kind"] == "fit"].set_index("method")
    assert fit.loc["ours", "alpha"] == pytest.approx(st["methods"]["ours"]["alpha"])
    assert fit.loc["baseline", "loss_d3_mean"] == pytest.approx(np.mean(list(losses["baseline"][3].values())))
    diff = df[df["kind"] == "difference"].iloc[0]
    assert diff["alpha"] == pytest.approx(st["methods"]["ours"]["alpha"] - st["methods"]["baseline"]["alpha"])
    md = (tmp_path / "tables" / "scaling.md").read_text()
    assert "α ours − α baseline" in md and f"{diff['alpha']:+.4f} [" in md and "500 bootstrap resamples" in md
    png = (tmp_path / "figures" / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "figures" / "scaling.pdf").stat().st_size > 1000


def test_the_toy_config_plans_the_study_runs(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = smk(tmp_path, tmp_path / "c.yaml", "-n", "scaling_study", "--cores", "2", timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = planned_jobs(r.stdout)
    sc = validate(cfg)["experiments"]["scaling"]
    want = {(str(d), f"{m}_steps{sc['steps']}", str(s)) for d in sc["depths"] for m in sc["methods"] for s in sc["seeds"]}
    train = {(w["depth"], w["method"], w["seed"]) for rule, w in jobs if rule == "train"}
    assert train == want and len(want) == 12
    assert sum(rule == "scaling_heldout" for rule, _ in jobs) == 12
    assert {rule for rule, _ in jobs} >= {"scaling_fit", "scaling_report"} and "evaluate" not in {j[0] for j in jobs}
    v = validate(cfg)
    run = next(r_ for _, r_ in plan.scaling_runs(v) if r_.depth == 3)
    assert plan.run_spec(v, run)["optim"]["steps"] == sc["steps"] != v["train"]["steps"]
    # steps null: the default runs (Table 2's method folders) are the study's, so `all`'s d2 runs are reused
    cfg["experiments"]["scaling"]["steps"] = None
    v = validate(cfg)
    assert {r_.path for _, r_ in plan.scaling_runs(v) if r_.depth == 2} == {r_.path for r_ in plan.main_runs(v)}
    cfg["experiments"]["scaling"]["baseline"] = "nope"
    cfg["experiments"]["scaling"]["form"] = "offset"  # 3 depths: too few for c + a·N^-α
    problems = plan.scaling_problems(validate(cfg))
    assert any("experiments/scaling/baseline" in p for p in problems)
    assert any("experiments/scaling/depths" in p and "at least 4" in p for p in problems)
