"""The claims ledger (varup.report.claims): its verdict rules on constructed evidence, the studies outside `all` read
from their files when present, and the ledger of the tiny DAG (the session fixture `finished`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tinydag import planned_jobs, smk
from varup.base.frontier import compare_frontiers
from varup.base.utils import atomic_write_json
from varup.config.claimsplan import fingerprint
from varup.config.reporting import report_config
from varup.report import claims as cl

PAPER = json.loads((Path(cl.__file__).parent / "paper_results.json").read_text())


def _cfg(correction="holm", seeds=(0, 1, 2, 3), tol=0.05):
    return {"datasets": {"toy": {"kind": "toy"}}, "model": {"depths": [1]}, "methods": {"baseline": {}, "ours": {}},
            "seeds": list(seeds), "experiments": {"claims": {"method": "ours", "baseline": "baseline",
                                                             "confidence": 0.95, "correction": correction,
                                                             "overhead_tolerance": tol}},
            "uncertainty": {"enabled": False}}


def _row(cid, diffs, cfg, base=10.0):
    return cl.difference_row(cid, "toy d1", [(i, base + d, base) for i, d in enumerate(diffs)], cfg, PAPER)


def test_a_difference_claim_is_supported_only_beyond_noise_on_the_papers_side():
    cfg = _cfg()
    rows = cl.decide([_row("fid", [-5.0, -5.2, -4.9, -5.1], cfg), _row("ood_auroc", [-5.0, -5.2, -4.9, -5.1], cfg),
                      _row("nll", [0.1, -0.1, 0.2, -0.15], cfg), _row("diversity", [0.01], cfg)], cfg)
    fid, auroc, nll, div = rows
    assert fid["verdict"] == cl.SUPPORTED and fid["p_adjusted"] <= 0.05 and fid["ci_high"] < 0  # FID: lower is better
    assert auroc["verdict"] == cl.NOT_SUPPORTED and "opposite" in auroc["why"]  # AUROC fell beyond noise
    assert nll["verdict"] == cl.NOT_SUPPORTED and "holds 0" in nll["why"] and nll["mde"] > 0
    assert div["verdict"] == cl.NOT_TESTABLE and "one paired seed" in div["why"]
    assert {r["verdict"] for r in rows} <= set(cl.VERDICTS)


def test_the_adjustment_over_the_ledger_can_take_a_claim_back():
    diffs = [1.0, 1.5, 2.0, 3.2]  # paired t p = 0.027: below 0.05 alone, above it once doubled by Holm over 2 tests
    for correction, expected in (("none", cl.SUPPORTED), ("holm", cl.NOT_SUPPORTED)):
        cfg = _cfg(correction)
        rows = cl.decide([_row("diversity", diffs, cfg), _row("mode_collapse", [0.5, -0.4, 0.1, -0.2], cfg)], cfg)
        assert 0.025 < rows[0]["p"] < 0.05 and rows[0]["ci_low"] > 0
        assert rows[0]["verdict"] == expected, rows[0]
    assert "holm-adjusted p over 2 tests" in rows[0]["why"]
    bh = _cfg("bh")  # BH: q = min(0.027 · 2 / 1, 0.027 · 2 / 2) = 0.027 for both (Holm: 0.054 for one)
    rows = cl.decide([_row("diversity", diffs, bh), _row("mode_collapse", diffs, bh)], bh)
    assert all(r["verdict"] == cl.SUPPORTED for r in rows)  # two equal p's: BH q = p, Holm would double one


def test_identical_paired_differences_are_not_called_beyond_noise():
    """Two seeds that both cover one mode fewer: no spread, so no t-interval and no p (a t-test would divide by 0);
    the row says so instead of "beyond noise in the opposite direction", and stays out of the adjusted family."""
    cfg = _cfg(seeds=(0, 1))
    rows = cl.decide([_row("mode_collapse", [-1.0, -1.0], cfg), _row("fid", [-5.0, -5.2, -4.9, -5.1], cfg)], cfg)
    mc = rows[0]
    assert mc["verdict"] == cl.NOT_TESTABLE and "no spread" in mc["why"] and mc["diff_mean"] == -1.0
    assert mc["p"] is None and mc["p_adjusted"] is None and mc["ci_low"] is None
    assert "over 1 tests" in rows[1]["why"]  # the family is the one row with a p


def test_unavailable_metric_is_not_testable_with_its_reason():
    cfg = _cfg()
    row = cl.difference_row("is", "toy d1", [(0, None, None), (1, None, None)], cfg, PAPER, "IS unavailable: no logits")
    assert cl.decide([row], cfg)[0]["verdict"] == cl.NOT_TESTABLE and "IS unavailable" in row["why"]


def _summaries(results: Path, ratios, seeds=(0, 1, 2, 3)):
    for s, r in zip(seeds, ratios):
        for method, step in (("baseline", 0.1), ("ours", 0.1 * r)):
            atomic_write_json(results / f"toy/d1/{method}/seed{s}/train/summary.json",
                              {"s_per_step": step, "peak_mem_mb_per_device": 100.0})


def test_zero_overhead_is_an_equivalence_within_the_tolerance(tmp_path):
    _summaries(tmp_path / "a", [1.0, 1.01, 0.99, 1.005])
    _summaries(tmp_path / "b", [1.3, 1.28, 1.31, 1.29])
    ok, = cl.overhead_rows(_cfg(), tmp_path / "a", PAPER)
    slow, = cl.overhead_rows(_cfg(), tmp_path / "b", PAPER)
    assert ok["verdict"] == cl.SUPPORTED and ok["n"] == 4 and ok["method_mean"] == pytest.approx(1.00125)
    assert slow["verdict"] == cl.NOT_SUPPORTED and "beyond 1 ± 0.05" in slow["why"]
    wide, = cl.overhead_rows(_cfg(tol=0.5), tmp_path / "b", PAPER)
    assert wide["verdict"] == cl.SUPPORTED


def _circle(shift=0.0, radius=1.0, seeds=range(5)):
    th = np.linspace(0.2, 1.4, 8) + shift
    out = {}
    for s in seeds:
        r = radius + np.random.default_rng(s).normal(0, 0.01) + np.random.default_rng(50 + s).normal(0, 0.005)
        out[s] = {"quality": (r * np.cos(th)).tolist(), "diversity": (r * np.sin(th)).tolist(), "default": 3}
    return out


def test_studies_outside_all_are_read_when_present(tmp_path):
    cfg = _cfg()
    res = tmp_path / "results"
    assert cl.frontier_row(res, PAPER, cfg)["verdict"] == cl.NOT_RUN
    assert "`claim_study`" in cl.frontier_row(res, PAPER, cfg)["why"]
    assert "`scaling_study`" in cl.scaling_row(res, PAPER, cfg)["why"]
    before = fingerprint(str(res))
    study = {"frontier": compare_frontiers(_circle(radius=1.08), _circle()), "quality": "toy-precision",
             "diversity": "toy-recall"}
    atomic_write_json(res / "claim_study" / "claim_study.json", study)
    assert fingerprint(str(res)) != before == "{}"  # the tables rule's parameter: a new study re-runs it
    row = cl.decide([cl.frontier_row(res, PAPER, cfg)], cfg)[0]
    assert row["verdict"] == cl.SUPPORTED and row["diff_mean"] > 0 and "toy-recall at matched" in row["metric"]
    study["frontier"] = compare_frontiers(_circle(shift=0.09), _circle())  # a temperature shift only
    atomic_write_json(res / "claim_study" / "claim_study.json", study)
    row = cl.decide([cl.frontier_row(res, PAPER, cfg)], cfg)[0]
    assert row["verdict"] == cl.NOT_SUPPORTED and "moves along the frontier" in row["why"]
    scaling = {"baseline": "baseline", "dataset": "toy", "sizes": ["1", "2"], "seeds": {"1": [0, 1], "2": [0, 1]},
               "interval": "bootstrap", "methods": {"ours": {"alpha": 0.3}, "baseline": {"alpha": 0.2}},
               "differences": {"ours": {"diff": 0.1, "ci_low": 0.02, "ci_high": 0.18}}}
    atomic_write_json(res / "scaling" / "scaling.json", scaling)
    assert cl.scaling_row(res, PAPER, cfg)["verdict"] == cl.SUPPORTED
    scaling["differences"]["ours"].update(ci_low=None, ci_high=None)
    atomic_write_json(res / "scaling" / "scaling.json", scaling)
    assert cl.scaling_row(res, PAPER, cfg)["verdict"] == cl.NOT_TESTABLE


def test_the_tiny_run_fills_every_claim(finished):
    work, cfg, cfgfile = finished
    results = Path(cfg["results_dir"]) / cfg["experiment"]
    df = pd.read_csv(results / "tables" / "claims.csv")
    assert set(cl.ORDER) <= set(df["claim_id"]) and set(df["verdict"]) <= set(cl.VERDICTS)
    from varup.config.schema import validate

    rc = report_config(validate(json.loads(json.dumps(cfg))))
    by = {r["claim_id"]: r for _, r in df.iterrows()}
    ran = ["fid", "diversity", "mode_collapse", "overhead", "ood_auroc", "nll"]  # the tiny DAG runs them
    if rc["experiments"]["ood"]["corruptions"]["enabled"]:
        ran.append("mce")
    for cid in ran:  # tested, or (2 seeds, integer readings such as modes) equal differences: no spread, no test
        assert by[cid]["n"] == len(cfg["seeds"]) and np.isfinite(by[cid]["diff_mean"]), cid
        assert by[cid]["verdict"] in (cl.SUPPORTED, cl.NOT_SUPPORTED) or (
            by[cid]["verdict"] == cl.NOT_TESTABLE and "no spread" in by[cid]["why"]), (cid, by[cid]["why"])
    assert by["is"]["verdict"] != cl.NOT_RUN
    for cid, target in (("mauve", "lm_study"), ("scaling", "scaling_study"), ("frontier", "claim_study"),
                        ("lambda_ranges", "lambda_study")):
        assert by[cid]["verdict"] == cl.NOT_RUN and f"`{target}`" in by[cid]["why"], cid
    again = pd.DataFrame(cl.ledger(rc, results))
    assert list(again["verdict"]) == list(df["verdict"])  # the table is the ledger of the run's own files
    assert (results / "tables" / "claims.md").read_text().startswith("**Claims ledger:")
    # a study outside `all` appearing re-runs `tables` (its digest is a parameter) and nothing upstream
    fake = results / "scaling" / "scaling.json"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("{}")
    try:
        r = smk(work, cfgfile, "-n")
    finally:
        fake.unlink()
        fake.parent.rmdir()
    assert r.returncode == 0, r.stderr[-3000:]
    assert {rule for rule, _ in planned_jobs(r.stdout)} == {"tables", "all"}, r.stdout[-3000:]


@pytest.mark.extends_finished
def test_claim_study_on_the_tiny_run_fills_the_frontier_row(finished):
    """`snakemake claim_study` beside the finished tiny DAG: its own long-tailed dataset and runs (nothing of
    Table 2's re-runs), every run's grid and snapshot curve, the study's table and figure; then `snakemake` (all)
    fills the ledger's frontier row from it."""
    work, cfg, cfgfile = finished
    r = smk(work, cfgfile, "-n", "claim_study", "all")
    planned = planned_jobs(r.stdout)
    assert {w.get("dataset") for rule, w in planned if rule == "train"} == {"shapes_lt"}, r.stdout[-3000:]
    r = smk(work, cfgfile, "--cores", "2", "claim_study")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    r = smk(work, cfgfile, "--cores", "2")  # the next `all` re-runs the tables: the ledger reads the study's file
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    results = Path(cfg["results_dir"]) / cfg["experiment"]
    st = json.loads((results / "claim_study" / "claim_study.json").read_text())
    cs = cfg["experiments"]["claim_study"]
    assert [(c["arm"], c["diversity"]) for c in st["comparisons"]] == [
        ("sum_k8", d) for d in ("neg_kl", "covered", "recall", "rare_recall")]
    fr = st["frontier"]  # both seeds, less any whose two curves share no quality range (then named)
    assert fr["n"] + len(fr["seeds_without_overlap"]) == 2 and st["power"]["mde_planned"] > 0
    for arm in ("baseline", "sum_k8"):
        assert [(p["default"], p["step"]) for p in st["curve"][arm]] == [(True, 12), (True, 24), (False, 12),
                                                                          (False, 24)]
        assert st["curve"][arm][2]["setting"] == "T 0.8 top-p 0.8 cfg 1" and len(st["mean_grid"][arm]) == 3 * 2
        assert all(0 <= p["memorised"] <= 1 and p["covered"] >= 1 for p in st["curve"][arm])
    grid = json.loads((results / "shapes_lt" / "d1" / "cs_baseline" / "seed0" / "claim_grid.json").read_text())
    assert grid["scorer"]["n_rare"] > 0 and len(grid["grid"]) == 3 * len(cs["top_p"]) * len(cs["cfg"])
    final = [c for c in grid["curve"] if c["step"] == 24]  # the final model's curve rows are its grid's points
    assert len(final) == 2 and all(any(c["covered"] == g["covered"] and c["kl_true_gen"] == g["kl_true_gen"]
                                       and c["temperature"] == g["temperature"] for g in grid["grid"]) for c in final)
    guided = {p["temperature"]: p for p in grid["grid"] if p["cfg"] == 2.0}  # the guided copies: other samples
    assert len(guided) == 3 and any(guided[p["temperature"]]["covered"] != p["covered"]
                                    or guided[p["temperature"]]["class_accuracy"] != p["class_accuracy"]
                                    for p in grid["grid"] if p["cfg"] == 1.0)
    assert (results / "figures" / "claim_study.png").stat().st_size > 10_000
    df = pd.read_csv(results / "tables" / "claims.csv")
    row = df[df["claim_id"] == "frontier"].iloc[0]
    assert row["verdict"] != cl.NOT_RUN and row["n"] == fr["n"], row["why"]
