"""The toy DAG through a real single-node Slurm (../shared/slurm, fake GPUs): sbatch submission by the Snakemake
executor plugin, every rule as a Slurm job, training on 2 (fake) GPUs with torchrun starting 2 gloo processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_e2e import REPO, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SLURM_DIR = Path(os.environ.get("VARUP_SLURM_SCRIPTS", REPO.parent / "shared" / "slurm"))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("starting a local Slurm needs root")
    start = SLURM_DIR / "start-local-slurm.sh"
    if not start.exists():
        pytest.skip(f"no local Slurm scripts at {SLURM_DIR}")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "FAKE_GPUS": "2"}
    r = subprocess.run(["bash", str(start), str(state)], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.skip(f"could not start a local Slurm: {(r.stdout + r.stderr)[-800:]}")
    try:
        yield {**os.environ, "SLURM_CONF": str(state / "etc" / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(SLURM_DIR / "stop-local-slurm.sh"), str(state), "--purge"], capture_output=True,
                       timeout=300)


def test_toy_dag_runs_through_slurm_with_a_two_gpu_torchrun_training(slurm, tmp_path):
    work = tmp_path / "work"
    cfg = tiny_config(work / "results")
    cfg["train"]["gpus"] = 2  # every training job: 2 GPUs from Slurm, torchrun --nproc_per_node=2
    cfg["threads"] = 1
    # the core DAG only (data, tokenizer, tokens, training, sampling, metrics, tables, figures): every Slurm job pays
    # a Snakemake start-up, and the studies' rules are the same kind of job (test_e2e runs them)
    cfg["experiments"] = {}
    cfg["uncertainty"]["enabled"] = False
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(cfg))
    cmd = ["timeout", "-s", "INT", "-k", "30", "2400", sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
           "-d", str(work), "--configfile", str(f), "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm-ci")]
    env = {**slurm, "VARUP_NO_PROGRESS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=2700)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    out = r.stdout + r.stderr
    assert "sbatch" in out or "Job " in out  # jobs were submitted by the slurm executor
    res = work / "results" / "toy"
    for method in ("baseline", "ours"):
        for seed in (0, 1):
            s = json.loads((res / "shapes" / "d1" / method / f"seed{seed}" / "train" / "summary.json").read_text())
            assert s["world_size"] == 2 and s["global_batch"] == 16
    t2 = pd.read_csv(res / "tables" / "table2.csv")
    assert sorted(t2["method"]) == ["baseline", "ours"] and (t2["seeds"] == 2).all() and (t2["fid_mean"] > 0).all()
    # Slurm really ran them: the accounting database knows the training jobs and their 2 GPUs
    acct = subprocess.run(["sacct", "-X", "-n", "-P", "--format=JobName,State,AllocTRES"], env=slurm,
                          capture_output=True, text=True, timeout=60).stdout
    train_rows = [ln for ln in acct.splitlines() if "COMPLETED" in ln and "gres/gpu=2" in ln]
    assert len(train_rows) >= 4, acct[-3000:]
