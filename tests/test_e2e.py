"""The whole DAG end to end on a tiny config (the session fixture `finished`, tests/conftest.py), asserting on the
tables it writes; then: editing a loss hyper-parameter re-plans exactly the affected jobs, a corrupt input image is
named, and the prompt study runs on top of the finished DAG."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tinydag import planned_jobs, smk

pytestmark = pytest.mark.slow


def test_tables_have_the_expected_contents(finished):
    work, cfg, _ = finished
    tables = work / "results" / "toy" / "tables"
    t2 = pd.read_csv(tables / "table2.csv")
    assert sorted(t2["method"]) == ["baseline", "ours"] and (t2["seeds"] == 2).all() and (t2["depth"] == 1).all()
    assert (t2["fid_mean"] > 0).all() and np.isfinite(t2["fid_mean"]).all() and (t2["fid_std"] >= 0).all()
    assert np.isfinite(t2["kid_mean"]).all() and np.isfinite(t2["clean_fid_mean"]).all()
    assert t2[["precision_mean", "recall_mean"]].apply(lambda c: c.between(0, 1)).all().all()
    md = (tables / "table2.md").read_text()
    if t2["is_mean"].isna().all():  # offline: FID-only weights
        assert "IS unavailable:" in md and (t2["inception_source"].str.contains("fid-helper")).all()
    assert "± " in md and "\\begin{tabular}" in (tables / "table2.tex").read_text()
    # the table holds the per-seed metrics' mean and std
    ours = [json.loads((work / "results" / "toy" / "shapes" / "d1" / "ours" / f"seed{s}" / "metrics.json").read_text())
            for s in (0, 1)]
    fids = [m["fidelity"]["fid"] for m in ours]
    row = t2[t2["method"] == "ours"].iloc[0]
    assert row["fid_mean"] == pytest.approx(np.mean(fids)) and row["fid_std"] == pytest.approx(np.std(fids, ddof=1))

    t7 = pd.read_csv(tables / "table7.csv")
    assert t7["mean_pairwise_ssim_mean"].between(-1, 1).all()
    assert (t7["ssim_diversity_mean"] + t7["mean_pairwise_ssim_mean"]).round(6).eq(1.0).all()
    assert t7["coverage_mean"].between(0, 1).all() and (t7["density_mean"] >= 0).all()

    cb = pd.read_csv(tables / "codebook_calibration.csv")
    assert (cb["active_total_generated"] > 0).all() and (cb["active_total_real"] > 0).all()
    assert cb["ece_mean"].between(0, 1).all() and (cb["nll_mean"] > 0).all()
    assert all(len(json.loads(x)) == 4 for x in cb["active_codes_real"])  # one entry per scale

    t3 = pd.read_csv(tables / "table3.csv")
    assert sorted(t3["method"]) == ["baseline", "ours"] and t3["auroc_percent_mean"].between(0, 100).all()
    assert (t3["id_nll_per_token_mean"] > 0).all() and t3["paper_auroc_percent"].isna().all()  # toy: no paper row
    mce = t3.set_index("method")["mce_percent_mean"]  # mCE against the baseline of the same depth and seed
    assert mce["baseline"] == pytest.approx(100.0) and np.isfinite(mce["ours"]) and mce["ours"] > 0
    assert t2["paper_fid"].isna().all()

    mc = pd.read_csv(tables / "mode_coverage.csv")
    assert set(mc["method"]) == {"baseline", "ours", "real (val)"}
    real = mc[mc["method"] == "real (val)"].iloc[0]
    gen = mc[mc["method"] != "real (val)"]
    assert (gen["covered_mean"] <= 64).all() and (gen["covered_mean"] >= 1).all() and (gen["n_modes"] == 64).all()
    # tiny data (2 images per mode) trains a weak classifier; test_modes checks its accuracy at toy size
    assert 0 <= real["class_error_mean"] <= 1 and 1 <= real["covered_mean"] <= 64
    gate = json.loads((work / "results" / "toy" / "shapes" / "tokenizer" / "gate.json").read_text())
    assert gate["passed"] and gate["n"] == 48 and 0 <= gate["class_error"] <= 1 and 0 <= gate["real_class_error"] <= 1
    # toy-feature metrics: every run, plus the real-vs-real floor of a disjoint train subset of the sample size
    tm = pd.read_csv(tables / "toy_metrics.csv")
    # and the tokenizer's ceiling: its reconstructions of that floor set (toy features only)
    assert tm["method"].tolist() == ["baseline", "ours", "real vs real (floor)", "tokenizer reconstructions (ceiling)"]
    assert tm["n"].tolist() == [2, 2, 1, 1] and np.isfinite(tm["toy_fd_mean"]).all()
    assert np.isfinite(tm["fid_mean"].iloc[:3]).all() and np.isnan(tm["fid_mean"].iloc[3])
    assert np.isnan(tm["toy_fd_std"].iloc[2:]).all() and (tm["toy_fd_std"].iloc[:2] >= 0).all()  # one set: no std
    floor = json.loads((work / "results" / "toy" / "shapes" / "toy_metrics_floor.json").read_text())
    assert floor["floor_set"]["split"] == "train" and floor["reference"]["split"] == "val"
    assert floor["floor_set"]["n"] == 24 and floor["reference"]["n"] == 32 and np.isfinite(floor["inception"]["fid"])
    assert tm["toy_fd_mean"].iloc[2] == pytest.approx(floor["toy"]["fd"])
    assert tm["toy_fd_mean"].iloc[3] == pytest.approx(floor["reconstruction"]["toy"]["fd"])
    assert floor["reconstruction"]["n"] == floor["floor_set"]["n"]
    floor_line = next(ln for ln in (tables / "toy_metrics.md").read_text().splitlines() if "(floor)" in ln)
    assert "±" not in floor_line
    dp = pd.read_csv(tables / "uncertainty_droppath.csv")
    assert sorted(dp["rate"].unique()) == [0.1, 0.3] and (dp["sigma_mean"] >= 0).all() and np.isfinite(dp["fid_mean"]).all()
    en = pd.read_csv(tables / "uncertainty_entanglement.csv")
    assert sorted(en["concepts"].unique()) == [1, 2] and np.isfinite(en["fid_mean"]).all()

    lr = pd.read_csv(tables / "loss_references.csv").set_index("reference")
    assert lr.loc["semantic_k", "support_median"] == pytest.approx(8.0, rel=0.01)  # references.support_k
    assert lr.loc["semantic", "support_median"] > lr.loc["semantic_k", "support_median"]  # median-NN tau: wider
    ov = pd.read_csv(tables / "overhead.csv")
    assert ov.loc[ov["method"] == "baseline", "step_time_vs_baseline"].iloc[0] == pytest.approx(1.0)
    assert (ov["params_m"] > 0).all() and (ov["global_batch"] == 16).all()


def test_figures_are_real_images(finished):
    work, _, _ = finished
    figs = work / "results" / "toy" / "figures"
    for name in ("samples", "training_curves", "downstream_shapes_d1_outpaint", "downstream_shapes_d1_inpaint",
                 "downstream_shapes_d1_edit", "mc_dropout_sigma", "droppath_sweep"):
        im = np.asarray(Image.open(figs / f"{name}.png").convert("L"))
        assert im.shape[0] > 200 and im.shape[1] > 300 and im.std() > 10  # not blank
        assert (figs / f"{name}.pdf").read_bytes()[:4] == b"%PDF"


def test_editing_a_loss_weight_reruns_exactly_the_affected_jobs(finished):
    work, cfg, _ = finished
    r = smk(work, finished[2], "-n")
    assert "Nothing to be done" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    edited = json.loads(json.dumps(cfg))
    edited["methods"]["ours"]["lambda_se"] = 0.05
    f = finished[2]  # the config that owns results/toy, edited (another file would be refused: varup.config.ownership)
    original = f.read_text()
    f.write_text(yaml.safe_dump(edited))
    try:
        r = smk(work, f, "-n")
    finally:
        f.write_text(original)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = planned_jobs(r.stdout)
    by_rule: dict[str, list[dict]] = {}
    for rule, wc in jobs:
        by_rule.setdefault(rule, []).append(wc)
    assert set(by_rule) == {"train", "sample_shard", "merge_samples", "evaluate", "sample_qualitative", "ood_eval",
                            "corruption_eval", "downstream", "mode_coverage", "mc_dropout", "uncertainty_sets", "score_uncertainty_sets",
                            "toy_metrics", "tables", "figures", "all"}, sorted(by_rule)  # not the floor: no run in it
    for rule in ("train", "sample_shard", "merge_samples", "evaluate", "ood_eval", "corruption_eval", "mode_coverage",
                 "toy_metrics"):
        assert sorted(w["seed"] for w in by_rule[rule]) == ["0", "1"] and {w["method"] for w in by_rule[rule]} == {"ours"}
    assert by_rule["sample_qualitative"] == [{"dataset": "shapes", "depth": "1", "method": "ours", "seed": "0"}]
    assert by_rule["downstream"] == [{"dataset": "shapes", "depth": "1"}]  # it shows ours beside the baseline
    for rule in ("mc_dropout", "uncertainty_sets", "score_uncertainty_sets"):  # the first seed's run only
        assert by_rule[rule] == [{"dataset": "shapes", "depth": "1", "method": "ours", "seed": "0"}], rule


def test_corrupt_input_image_is_named(finished, tmp_path):
    work, cfg, _ = finished
    data = tmp_path / "data"
    shutil.copytree(work / "results" / "toy" / "shapes" / "data", data)
    victim = sorted((data / "images" / "train").rglob("*.png"))[5]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    tok = work / "results" / "toy" / "shapes" / "tokenizer" / "vqvae.pt"
    r = subprocess.run([sys.executable, "-m", "varup", "encode", "--data", str(data), "--tokenizer", str(tok),
                        "--resolution", "32", "--out", str(tmp_path / "tokens")], capture_output=True, text=True)
    assert r.returncode != 0
    assert str(victim) in r.stderr and "corrupt" in r.stderr


@pytest.mark.extends_finished
def test_prompt_study_builds_the_studys_tables_for_both_families(finished):
    """`snakemake prompt_study` on top of the finished toy DAG: it reuses the class-conditional runs, trains the
    text-conditioned ones, and writes the three prompt tables (the study's numbers beside) and the σ figure."""
    work, cfg, f = finished
    edited = json.loads(json.dumps(cfg))
    edited["text"] = {"enabled": True, "prompts": {
        "n_images": 8, "T": 3, "real_per_group": 1, "droppath": {"prompt": "a circle", "rates": [0.1, 0.3]},
        "entanglement": ["a circle", "a circle or a square"],
        "descriptiveness": ["a shape", "a circle", "a large red circle"]}}
    original = f.read_text()
    f.write_text(yaml.safe_dump(edited))
    try:
        plan = planned_jobs(smk(work, f, "-n", "prompt_study").stdout)
        r = smk(work, f, "--cores", "2", "prompt_study")
    finally:
        f.write_text(original)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    rules = sorted({rule for rule, _ in plan})
    assert "train" not in rules and {"train_text", "captions", "prompt_sets", "prompt_scores"} <= set(rules)
    tables = work / "results" / "toy" / "tables"
    dp = pd.read_csv(tables / "prompt_droppath.csv")
    assert len(dp) == 2 * 2 * 2 and set(dp["family"]) == {"var", "text"} and set(dp["method"]) == {"baseline", "ours"}
    assert (dp["sigma_mean"] >= 0).all() and np.isfinite(dp["fid_mean"]).all() and np.isfinite(dp["cmmd_mean"]).all()
    assert dp.loc[dp["rate"] == 0.1, "study_fid"].eq(18.98).all()  # the study's row for the same rate
    assert "toy-CMMD" in (tables / "prompt_droppath.md").read_text()  # never mistaken for CLIP-CMMD
    en = pd.read_csv(tables / "prompt_entanglement.csv")
    assert sorted(en["concepts"].unique()) == [1, 2] and sorted(en["modes_allowed"].unique()) == [16, 32]
    assert en["in_prompt_mean"].between(0, 1).all() and en.loc[en["concepts"] == 2, "study_sigma"].eq(0.1955).all()
    de = pd.read_csv(tables / "prompt_descriptiveness.csv")
    text, var = de[de["family"] == "text"], de[de["family"] == "var"]
    assert sorted(text["modes_allowed"].unique()) == [2, 16, 64] and (text["seeds"] == 1).all()
    assert var.loc[var["prompt"] != "a circle", "seeds"].eq(0).all()  # a class VAR cannot take the other two
    assert var.loc[var["prompt"] != "a circle", "sigma_mean"].isna().all()
    complex_ = de[de["prompt_type"] == "complex"]
    assert set(complex_["prompt"]) == {"a large red circle"} and complex_["study_sigma"].eq(0.1794).all()
    im = np.asarray(Image.open(work / "results" / "toy" / "figures" / "prompt_sigma.png").convert("L"))
    assert im.shape[0] > 200 and im.std() > 10
