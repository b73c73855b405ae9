"""The Slurm resources as Snakemake resolves them for each job (verbose dry runs with profiles/slurm): every
submitted job has its memory, time and CPUs from the config (cluster.sizes); partition, account, cluster.all and
cluster.rules add to them or change one rule; memory and time grow with the attempt; a --default-resources on the
command line drops none of them; the tiny rules run locally."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from varup.config.cluster import LAUNCH_RULES, launch_resources, rule_resources, train_launch
from varup.config.errors import ConfigError
from varup.config.schema import validate

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
SIZES = ("mem_mb", "runtime", "cpus_per_task")
CLUSTER = "cluster={partition: cpuq, gpu_partition: gpuq, account: proj1}"


def rules_text() -> str:
    return "\n".join(p.read_text() for p in sorted((REPO / "workflow" / "rules").glob("*.smk")))


def local_rules() -> set[str]:
    blocks = re.findall(r"localrules:\s*\n((?:\s+\w+,\n)+)", rules_text())
    return {n.strip(" ,") for b in blocks for n in b.split()}


def job_resources(tmp_path: Path, *args) -> dict[str, list[dict]]:
    """rule -> the resources of each of its jobs, from a verbose dry run through profiles/slurm."""
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n",
                        "--verbose", "--workflow-profile", str(PROFILE), *args], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out: dict[str, list[dict]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", r.stdout + r.stderr):
        m, res = re.match(r"(?:local)?rule (\w+):", block), re.search(r"^\s+resources: (.*)$", block, re.M)
        if m and res:
            out.setdefault(m.group(1), []).append(dict(kv.split("=", 1) for kv in res.group(1).split(", ")))
    return out


def submitted(jobs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The jobs that go to sbatch: not localrules, not target rules without a command."""
    targets = {"all", "lambda_study", "prefetch"}
    return {r: j for r, j in jobs.items() if r not in local_rules() | targets}


def test_every_rule_that_is_submitted_is_sized_by_the_config():
    """Static: the rules with a command, but the localrules and the training rules (sized by their launch), are
    exactly the rows of the schema's cluster.sizes, each with memory, time and CPUs; the profile has no
    default-resources or set-resources that would replace the config's."""
    prof = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert "default-resources" not in prof and "set-resources" not in prof
    names = set(re.findall(r"^(?:rule (\w+):|use rule \w+ as (\w+) with:)", rules_text(), re.M))
    names = {a or b for a, b in names} - local_rules() - set(LAUNCH_RULES)
    sizes = validate(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))["cluster"]["sizes"]
    assert names == set(sizes), (sorted(names - set(sizes)), sorted(set(sizes) - names))
    assert all(set(SIZES) <= set(sizes[n]) for n in names)


@pytest.mark.parametrize("extra", [[], ["--default-resources", "slurm_partition=p", "slurm_account=a"]],
                         ids=["profile", "with --default-resources"])
def test_every_submitted_job_has_memory_time_and_cpus(tmp_path, extra):
    jobs = submitted(job_resources(tmp_path, "all", "lambda_study", "bench", *extra))
    assert {"data_toy", "references", "merge_samples", "mode_coverage", "train", "evaluate", "bench",
            "lambda_study_scores"} <= set(jobs)
    for rule, rs in jobs.items():
        for res in rs:
            assert all(re.fullmatch(r"\d+", res.get(k, "")) for k in SIZES), (rule, res)
    if extra:  # the command line's partition reaches the jobs that have none from the config
        assert all(res["slurm_partition"] == "p" and res["slurm_account"] == "a" for rs in jobs.values() for res in rs)


def test_partition_and_account_come_from_the_config_and_drop_no_size(tmp_path):
    plain = submitted(job_resources(tmp_path))
    jobs = submitted(job_resources(tmp_path, "--config", CLUSTER, "--default-resources", "slurm_partition=ignored"))
    for rule, rs in jobs.items():
        for res, before in zip(rs, plain[rule]):
            gpu = int(res.get("gpu", 0)) > 0
            assert res["slurm_partition"] == ("gpuq" if gpu else "cpuq") and res["slurm_account"] == "proj1", (rule, res)
            assert {k: res[k] for k in SIZES} == {k: before[k] for k in SIZES}, rule
    assert int(jobs["train"][0]["gpu"]) >= 1 and int(jobs["merge_samples"][0].get("gpu", 0)) == 0


CLUSTER_RULES = {"partition": "cpuq", "gpu_partition": "gpuq", "all": {"qos": "normal", "gpu_model": "a100"},
                 "rules": {"evaluate": {"mem_mb": 128000, "constraint": "a100|h100", "qos": "long"},
                           "merge_samples": {"runtime": 90}, "train": {"slurm_extra": "--exclusive"}}}


def toy_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_cluster_all_and_rules_reach_the_jobs_without_copying_the_profile(tmp_path):
    """cluster.all sets the QoS of every submitted job and the GPU model of every GPU job; cluster.rules changes one
    rule's memory, time, constraint, QoS or sbatch flags; every other size stays the schema's."""
    cfg = toy_config()
    cfg["cluster"] = CLUSTER_RULES
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    plain = submitted(job_resources(tmp_path))
    jobs = submitted(job_resources(tmp_path, "--configfile", str(tmp_path / "c.yaml")))
    for rule, rs in jobs.items():
        for res, before in zip(rs, plain[rule]):
            gpu = int(res.get("gpu", 0)) > 0
            assert res.get("gpu_model") == ("a100" if gpu else None), (rule, res)
            assert res["qos"] == ("long" if rule == "evaluate" else "normal"), (rule, res)
            changed = {"evaluate": {"mem_mb": "128000"}, "merge_samples": {"runtime": "90"}}.get(rule, {})
            assert {k: res[k] for k in SIZES} == {**{k: before[k] for k in SIZES}, **changed}, rule
    assert all(r["constraint"] == "a100|h100" for r in jobs["evaluate"])
    assert all("constraint" not in r for r in jobs["sample_shard"])
    assert all(r["slurm_extra"] == "--exclusive" and r["runtime"] == plain["train"][0]["runtime"] for r in jobs["train"])


def test_memory_and_time_grow_with_the_attempt_up_to_the_caps():
    """A retried job asks for size x attempt memory and time (the first attempt keeps the size), capped by
    cluster.max_mem_mb / max_runtime_min; a training job keeps its time limit (it resumes from its checkpoint)."""
    cfg = validate(toy_config())
    res = rule_resources(cfg, "evaluate")
    assert [res["mem_mb"](None, a) for a in (1, 2, 3)] == [64000, 128000, 192000]
    assert [res["runtime"](None, a) for a in (1, 2)] == [360, 720]
    cfg["cluster"].update(max_mem_mb=100000, max_runtime_min=600)
    res = rule_resources(cfg, "evaluate")
    assert (res["mem_mb"](None, 2), res["runtime"](None, 2), res["runtime"](None, 1)) == (100000, 600, 360)
    train = launch_resources(cfg, "train", train_launch(cfg)[1])
    assert train["runtime"] == cfg["cluster"]["train_runtime_min"] and train["mem_mb"](None, 2) == 100000


@pytest.mark.parametrize("cluster, key", [
    ({"rules": {"evalute": {"qos": "x"}}}, "cluster/rules/evalute"),
    ({"rules": {"tables": {"qos": "x"}}}, "cluster/rules/tables"),  # a local rule: never submitted
    ({"rules": {"merge_samples": {"gpu_model": "a100"}}}, "cluster/rules/merge_samples/gpu_model"),
    ({"all": {"slurm_extra": "--exclusive --mem=4G"}}, "cluster/all/slurm_extra"),
    ({"rules": {"evaluate": {"partition": "x"}}}, "cluster/rules/evaluate"),  # not a key the rules pass on
], ids=["misspelt rule", "local rule", "gpu model of a CPU rule", "a flag the plugin sets", "unknown key"])
def test_cluster_settings_are_checked_naming_the_key(cluster, key):
    cfg = toy_config()
    cfg["cluster"] = cluster
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(cfg)


def test_tiny_rules_run_beside_snakemake():
    """tables, figures and the studies' table rules (seconds, on small JSON) are local rules, never sized for Slurm;
    the merges (48 GB at paper size) are submitted. (A dry run does not mark local jobs, so this reads the rules.)"""
    tiny = {"tables", "figures", "lambda_study_table", "prompt_tables", "lm_tables"}
    sizes = validate(toy_config())["cluster"]["sizes"]
    assert tiny <= local_rules() and not tiny & set(sizes)
    assert {"merge_samples", "merge_cfg_samples"} <= set(sizes) and not {"merge_samples"} & local_rules()


def test_sample_shards_are_temporary(tmp_path):
    """Once merged, a run's sample shards (and the CFG sweep's) are removed: Snakemake holds them as temp() outputs,
    so --delete-temp-output lists them (the shards of a paper run are ~10 GB beside the merged file)."""
    import varup.config.plan as vp
    cfg = validate(toy_config())
    cfg["experiments"]["figure4"] = {"dataset": "shapes", "depth": cfg["model"]["depths"][0], "cfg": [1.5]}
    validate(cfg)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run, (srun, c) = list(vp.runs(cfg))[0], list(vp.cfg_sweep(cfg))[0]
    n = vp.sample_settings(cfg, run.dataset)["shards"]
    res = tmp_path / "results" / "toy"
    shards = [res / run.path / "samples" / f"shard{i}of{n}.npz" for i in range(n)]
    shards.append(res / srun.path / "cfg_sweep" / f"cfg{c:g}" / "samples" / f"shard0of{n}.npz")
    for f in shards:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n",
                        "--configfile", str(tmp_path / "c.yaml"), "--delete-temp-output"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    listed = set(re.findall(r"^Would delete (\S+)$", r.stdout + r.stderr, re.M))
    assert {str(f.relative_to(tmp_path)) for f in shards} <= listed
