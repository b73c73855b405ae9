"""The Snakemake workflow: schema validation before any job, lint, log/benchmark on every rule, the DAG."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from varup.config.errors import ConfigError
from varup.config.plan import run_spec, runs
from varup.config.schema import load_config, validate

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def default_cfg() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def snakemake(*args, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def job_counts(out: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run."""
    m = re.search(r"Job stats:\n(.*?)\n\n", out, re.S)
    assert m, out[-3000:]
    counts = {}
    for line in m.group(1).splitlines()[2:]:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def test_default_config_is_valid_and_fills_defaults():
    cfg = validate(default_cfg())
    assert cfg["metrics"]["calibration"]["n_bins"] == 15
    assert cfg["methods"]["baseline"]["reference"] == "semantic"  # schema default
    assert len(list(runs(cfg))) == len(cfg["model"]["depths"]) * len(cfg["methods"]) * len(cfg["seeds"])
    s = run_spec(cfg, next(iter(runs(cfg))))
    assert set(s) == {"model", "loss", "optim", "seed", "extra"}


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c["train"].__setitem__("stpes", 5), "train: Additional properties are not allowed ('stpes'"),
    (lambda c: c["methods"]["ours"].__setitem__("reference", "gaussian"), "methods/ours/reference: 'gaussian' is not one of"),
    (lambda c: c["sample"].__setitem__("top_p", 1.5), "sample/top_p: 1.5 is greater than the maximum of 1"),
    (lambda c: c["datasets"]["shapes"].__setitem__("tokenizer", "nope"), "datasets/shapes/tokenizer: 'nope' is not defined"),
    (lambda c: c.pop("seeds"), "'seeds' is a required property"),
    (lambda c: c["uncertainty"].__setitem__("sweep_n_per_class", 1), "uncertainty/sweep_n_per_class: its image sets hold 4"),
    (lambda c: c["uncertainty"].__setitem__("entanglement_mixes", [[0, 7]]), "uncertainty/entanglement_mixes/0/1: class 7 is out of range"),
])
def test_schema_errors_name_the_key(mutate, needle):
    cfg = default_cfg()
    mutate(cfg)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value)


def test_bad_config_stops_snakemake_before_any_job(tmp_path):
    cfg = default_cfg()
    cfg["methods"]["ours"]["lambda_2nd"] = -1.0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake("-n", "--configfile", str(tmp_path / "bad.yaml"), "-d", str(tmp_path))
    assert r.returncode != 0
    assert "methods/ours/lambda_2nd: -1.0 is less than the minimum of 0" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_lint_is_clean():
    r = snakemake("--lint", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Congratulations, your workflow is in a good condition!" in r.stdout + r.stderr


def test_every_rule_has_log_and_benchmark():
    text = "\n".join(p.read_text() for p in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    blocks = re.split(r"\n(?=rule \w+:)", text)
    rules = {m.group(1): b for b in blocks if (m := re.match(r"rule (\w+):", b))}
    assert len(rules) >= 12
    for name, body in rules.items():
        assert re.search(r"^\s+log:", body, re.M), f"rule {name} has no log:"
        assert re.search(r"^\s+benchmark:", body, re.M), f"rule {name} has no benchmark:"


def test_default_dry_run_plans_the_whole_dag(tmp_path):
    r = snakemake("-n", "--cores", "2", "-d", str(tmp_path), timeout=120)  # a fresh working directory
    assert r.returncode == 0, r.stderr[-3000:]
    c = job_counts(r.stdout)
    n_runs = 2 * 2  # methods x seeds x depths(1)
    assert c == {"data_toy": 1, "tokenizer_train": 1, "tokenizer_gate": 1, "encode": 1, "references": 1, "inception_weights": 1,
                 "real_features": 1, "train": n_runs, "sample_shard": n_runs, "merge_samples": n_runs,
                 "evaluate": n_runs, "sample_qualitative": 2, "tables": 1, "figures": 1, "all": 1,
                 "data_ood": 1, "encode_ood": 1, "ood_eval": n_runs, "downstream": 1,
                 "corrupt_data": 1, "encode_corrupt": 1, "corruption_eval": n_runs,  # Table 3's mCE
                 "mode_classifier": 1, "mode_coverage": n_runs, "mc_dropout": 2, "uncertainty_sets": 2,
                 "score_uncertainty_sets": 2,  # uncertainty studies: the first seed's runs
                 "toy_metrics": n_runs, "toy_metrics_floor": 1}  # toy-feature metrics: every run, a floor per dataset


def test_lambda_study_target_pairs_its_points_with_the_default_runs(tmp_path):
    import varup.config.errors as ve
    import varup.config.plan as vp
    import varup.config.schema as vs

    cfg = vs.validate(default_cfg())
    ls = cfg["experiments"]["lambda_study"]
    points = vp.lambda_points(cfg)
    assert points["baseline"] == "baseline" and points["ours"] == "ours"  # identical losses reuse the default runs
    assert all(m == f"lam_{p}" for p, m in points.items() if p not in ("baseline", "ours"))
    r = snakemake("-n", "lambda_study", "--cores", "2", "-d", str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    c = job_counts(r.stdout)
    n = len(ls["points"]) * len(ls["seeds"])
    assert c["train"] == c["mode_coverage"] == c["toy_metrics"] == n and c["lambda_study_scores"] == 1
    assert "evaluate" not in c and "tables" not in c  # no Inception pass: the study scores in the toy's own terms
    for s in ls["seeds"]:
        assert f"shapes/d2/baseline/seed{s}/model.pt" in r.stdout and f"shapes/d2/lam_se_max/seed{s}/model.pt" in r.stdout
    bad = default_cfg()
    bad["experiments"]["lambda_study"]["baseline"] = "nope"
    with pytest.raises(ve.ConfigError, match="experiments/lambda_study/baseline"):
        vs.validate(bad)


def test_kl_with_a_uniform_reference_and_an_unchecked_checkpoint_are_rejected():
    import varup.config.errors as ve
    import varup.config.schema as vs

    bad = default_cfg()
    bad["methods"]["ours"].update(reference="uniform", discrepancy="kl")
    with pytest.raises(ve.ConfigError, match="methods/ours"):
        vs.validate(bad)
    bad = default_cfg()
    bad["train"].update(ckpt_every=350, nonfinite_check_every=100)
    with pytest.raises(ve.ConfigError, match="train/ckpt_every: 350 is not a multiple"):
        vs.validate(bad)


def test_bench_target_passes_the_config_to_the_benchmark(tmp_path):
    cfg = default_cfg()
    cfg["bench"] = {"depth": 3, "batch": 5, "sample_batch": 7, "compile": True, "plain": False}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(cfg))
    r = snakemake("bench", "-n", "-p", "--cores", "2", "-d", str(tmp_path), "--configfile", str(f), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert job_counts(r.stdout) == {"bench": 1}  # no training or data: the benchmark builds its own models
    assert "results/toy/bench/bench.json" in r.stdout
    shell = next(ln for ln in r.stdout.splitlines() if "varup.bench.suite all" in ln)
    assert "--depth 3 --batch 5 --sample-batch 7 --compile --skip-plain" in shell and "--markdown" in shell
    cfg["bench"] = {"depth": 0}
    with pytest.raises(ConfigError, match="bench/depth"):
        validate(cfg)


def test_every_gpu_rule_asks_the_slurm_profile_for_a_gpu():
    """A rule on the GPU partition (resources **GPU) without a gpu request would run on a GPU node with no GPU."""
    gpu_rules = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for m in re.finditer(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", smk.read_text(), re.S | re.M):
            if "**GPU" in m.group(2):
                gpu_rules.add(m.group(1))
    assert {"sample_shard", "evaluate", "mc_dropout", "bench"} <= gpu_rules
    sizes = validate(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))["cluster"]["sizes"]
    missing = sorted(r for r in gpu_rules if sizes.get(r, {}).get("gpu", 0) < 1)
    assert not missing, f"GPU rules without a gpu request in cluster.sizes (src/varup/config/schema.yaml): {missing}"


def test_the_default_profile_is_loaded_beside_the_snakefile(tmp_path):
    """Snakemake looks for profiles/default in the working directory and beside the Snakefile (not in workflow/)."""
    r = snakemake("-n", "-d", str(tmp_path), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Using workflow specific profile {REPO / 'profiles' / 'default'} for setting" in r.stdout + r.stderr


def test_the_default_profile_retries_a_failed_job(tmp_path):
    """A job that fails on its first attempt succeeds on the retry of the default profile's `retries: 1`, in a run
    that passes neither --retries nor --cores (both come from the profile)."""
    prof = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    assert prof["retries"] >= 1 and prof["cores"] >= 1
    (tmp_path / "profiles" / "default").mkdir(parents=True)
    (tmp_path / "profiles" / "default" / "config.yaml").write_text((REPO / "profiles" / "default" / "config.yaml").read_text())
    (tmp_path / "Snakefile").write_text(
        'rule flaky:\n    output: "done.txt"\n    resources: attempt=lambda wildcards, attempt: attempt\n'
        '    shell: "echo {resources.attempt} >> attempts.txt; test {resources.attempt} -gt 1 && touch {output}"\n')
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    r = subprocess.run([*SNAKEMAKE, "-s", str(tmp_path / "Snakefile"), "-d", str(tmp_path)], cwd=sub,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (tmp_path / "attempts.txt").read_text().split() == ["1", "2"]
