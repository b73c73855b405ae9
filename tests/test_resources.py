"""The Slurm profile's resources as Snakemake resolves them for each job (verbose dry runs with profiles/slurm):
every submitted job has its memory, time and CPUs; partition and account come from the config and add to them;
a --default-resources on the command line drops none of them."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def test_every_rule_that_is_submitted_is_sized_by_the_profile():
    """Static: each rule with a command, but the localrules and the training rules (sized by the config), is listed in
    the profile's set-resources with memory, time and CPUs; the profile has no default-resources that a command-line
    --default-resources could replace."""
    prof = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert "default-resources" not in prof
    names = set(re.findall(r"^(?:rule (\w+):|use rule \w+ as (\w+) with:)", rules_text(), re.M))
    names = {a or b for a, b in names} - local_rules() - {"train", "train_text", "lm_sft"}  # sized by the config
    missing = {n: [k for k in SIZES if k not in prof["set-resources"].get(n, {})] for n in sorted(names)}
    assert not {n: k for n, k in missing.items() if k}, "rules not sized in profiles/slurm (set-resources)"


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
