"""The text arm's DAG end to end on a tiny toy config (`snakemake lm_study`), asserting on Table 6; the paper
config's text jobs in a dry run; the arm's configuration errors name their keys."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from varup.config import ConfigError, validate

REPO = Path(__file__).resolve().parents[1]


def _smk(workdir: Path, cfgfile: Path, *args, timeout=1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "VARUP_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "--configfile", str(cfgfile), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _tiny(results: Path) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["results_dir"] = str(results)
    lm = cfg["lm"]
    lm["corpus"].update(n_train=256, n_pretrain=512, eval_per_prompt=4)
    lm["base"]["train"].update(steps=200, log_every=50, ckpt_every=100)
    lm["train"].update(steps=150, log_every=50, ckpt_every=75)
    lm["seeds"] = [0, 1]
    lm["generate"].update(n_per_prompt=8)
    return cfg


@pytest.mark.slow
def test_lm_study_builds_table_6_with_every_row(tmp_path):
    cfg = _tiny(tmp_path / "results")
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(cfg))
    r = _smk(tmp_path, f, "--cores", "2", "lm_study")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    tables = tmp_path / "results" / "toy" / "tables"
    df = pd.read_csv(tables / "table6.csv")
    assert list(df["method"]) == ["zero_shot", "baseline", "ours"] and (df["seeds"] == 2).all()
    assert df["mauve_mean"].between(0, 1).all() and df["self_bleu_mean"].between(0, 1).all()
    assert df["mauve_std"].notna().all()  # two seeds: a spread
    row = df.set_index("method")
    assert list(row["paper_mauve"]) == [0.5127, 0.7744, 0.9537] and row.loc["ours", "paper_self_bleu"] == 0.0630
    # the base never saw the instruction format; 150 steps of SFT teach it (the toy's modes make this measurable)
    assert row.loc["zero_shot", "valid_mean"] < 0.2 < row.loc["baseline", "valid_mean"]
    assert row.loc["baseline", "coverage_mean"] > row.loc["zero_shot", "coverage_mean"]
    md = (tables / "table6.md").read_text()
    assert "toy-MAUVE" in md and "Zero-shot" in md and "Our Method" in md and "human responses" in md
    lm = tmp_path / "results" / "toy" / "lm"
    assert (lm / "ours" / "seed1" / "model" / "model.safetensors").exists()
    curve = (lm / "ours" / "seed0" / "train" / "metrics.jsonl").read_text().splitlines()
    assert len(curve) == 3 and '"l2nd": 0.0' not in curve[-1]  # the objective's terms were on


def test_the_paper_configs_text_jobs_plan_with_qwen_and_dolly(tmp_path):
    r = _smk(tmp_path, REPO / "config" / "paper.yaml", "-n", "lm_study", "--config", f"results_dir={tmp_path}/r",
             f"resources_dir={tmp_path}/rsc")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = r.stdout
    for rule in ("lm_dolly", "lm_weights", "lm_corpus", "lm_refs", "lm_sft", "lm_generate", "lm_score", "lm_tables"):
        assert f"rule {rule}:" in out, rule
    assert "lm_pretrain" not in out  # the hub base and featurizer are fetched, not trained
    assert "Qwen--Qwen1.5-0.5B/varup_fetch.json" in out and "gpt2-large/varup_fetch.json" in out


def _cfg(**lm) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["lm"].update(lm)
    return cfg


def test_a_toy_base_on_dolly_is_refused_naming_the_key():
    from varup.lm.runs import check_lm

    cfg = validate(_cfg(corpus={"kind": "dolly"}))
    with pytest.raises(ConfigError, match="lm/base/kind: 'toy'.*lm/corpus/kind 'dolly'"):
        check_lm(cfg)
    cfg = validate(_cfg(methods={"zero_shot": {}}))
    with pytest.raises(ConfigError, match="lm/methods: 'zero_shot'"):
        check_lm(cfg)
    with pytest.raises(ConfigError, match="lm/score"):
        validate(_cfg(score=[1]))
