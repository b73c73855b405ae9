"""The LM arm's DAG end to end on a tiny toy config (`snakemake lm_study`), asserting on Table 6; the paper
config's LM jobs in a dry run; the arm's configuration errors name their keys."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from varup.config.errors import ConfigError
from varup.config.schema import validate

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
    import numpy as np
    from PIL import Image

    im = np.asarray(Image.open(tmp_path / "results" / "toy" / "figures" / "lm_modes.png").convert("L"))
    assert im.shape[0] > 600 and im.std() > 10  # curves and 7 mode panels, not a blank page
    curve = (lm / "ours" / "seed0" / "train" / "metrics.jsonl").read_text().splitlines()
    assert len(curve) == 3 and '"l2nd": 0.0' not in curve[-1]  # the objective's terms were on


def test_the_paper_configs_lm_jobs_plan_with_qwen_and_dolly(tmp_path):
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
    from varup.config.lmplan import check_lm

    cfg = validate(_cfg(corpus={"kind": "dolly"}))
    with pytest.raises(ConfigError, match="lm/base/kind: 'toy'.*lm/corpus/kind 'dolly'"):
        check_lm(cfg)
    cfg = validate(_cfg(methods={"zero_shot": {}}))
    with pytest.raises(ConfigError, match="lm/methods: 'zero_shot'"):
        check_lm(cfg)
    with pytest.raises(ConfigError, match="lm/score"):
        validate(_cfg(score=[1]))


def _serve(root: Path):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _publish_tiny_lm(root: Path, repo: str, words: list[str], seed: int) -> list[str]:
    """A tiny Qwen2 + word-level tokenizer written by save_pretrained where a hub would serve it."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                               eos_token="<eos>")
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, pad_token_id=1, eos_token_id=2))
    folder = root / repo / "resolve" / "main"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_the_cluster_path_dolly_and_hub_models_runs_against_a_local_hub(tmp_path):
    """The paper's LM path offline: dolly-15k (a fixture file) and the base and featurizer models fetched by the
    localrules from a hub-like server on 127.0.0.1, hashes recorded on first use, SFT from the fetched base."""
    import json
    import random

    words = "tell me about the cat dog bird fish it is small big red fast slow and a very".split()
    rng = random.Random(0)
    cats = ["open_qa", "brainstorming", "creative_writing"]
    recs = [{"instruction": " ".join(rng.choices(words, k=6)), "context": "" if i % 3 else " ".join(rng.choices(words, k=4)),
             "response": " ".join(rng.choices(words, k=rng.randint(3, 8))), "category": cats[i % 3]} for i in range(40)]
    served = tmp_path / "served"
    served.mkdir()
    (served / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    files = _publish_tiny_lm(served, "tiny-org/base", words, 0)
    feat_files = _publish_tiny_lm(served, "tiny-org/feat", words, 1)
    srv = _serve(served)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["results_dir"], cfg["resources_dir"] = str(tmp_path / "results"), str(tmp_path / "resources")
    cfg["lm"] = {"enabled": True, "corpus": {"kind": "dolly", "url": f"{url}/dolly.jsonl", "n_eval": 8, "seed": 0},
                 "template": "plain",
                 "base": {"kind": "hub", "repo": "tiny-org/base", "endpoint": url, "files": files},
                 "featurizer": {"kind": "hub", "repo": "tiny-org/feat", "endpoint": url, "files": feat_files},
                 "seeds": [0], "references": {"num_clusters": 4},
                 "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "max_length": 48, "log_every": 3},
                 "generate": {"n_per_prompt": 1, "max_new_tokens": 8, "batch_size": 4},
                 "score": {"self_bleu_over": "all", "max_length": 48}}
    f = tmp_path / "hub.yaml"
    f.write_text(yaml.safe_dump(cfg))
    try:
        r = _smk(tmp_path, f, "--cores", "2", "lm_study")
    finally:
        srv.shutdown()
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    rsc = tmp_path / "resources"
    record = json.loads((rsc / "hf" / "tiny-org--base" / "varup_fetch.json").read_text())
    assert sorted(record["files"]) == files and record["endpoint"] == url
    assert (rsc / "hf" / "tiny-org--base" / "model.safetensors.sha256").read_text().strip() == \
        record["files"]["model.safetensors"]  # trusted on first use, verified by later runs
    assert (rsc / "dolly" / "databricks-dolly-15k.jsonl.sha256").exists()
    lm = tmp_path / "results" / "toy" / "lm"
    assert json.loads((lm / "corpus" / "summary.json").read_text())["n_eval"] == 8
    gens = [json.loads(x) for x in (lm / "ours" / "seed0" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 8 and all(g["prompt"].split("\n")[0] in {rr["instruction"] for rr in recs} for g in gens)
    df = pd.read_csv(tmp_path / "results" / "toy" / "tables" / "table6.csv")
    assert list(df["method"]) == ["zero_shot", "baseline", "ours"] and df["mauve_mean"].between(0, 1).all()
    assert "valid_mean" not in df  # no known modes on dolly
    md = (tmp_path / "results" / "toy" / "tables" / "table6.md").read_text()
    assert "MAUVE (tiny-org/feat)" in md and "toy-MAUVE" not in md
