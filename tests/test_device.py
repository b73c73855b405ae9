"""device auto never lets a GPU job crawl on the CPU unnoticed: where Slurm gave the job GPUs, or a GPU rule runs in
a Slurm job, and torch sees no GPU, the job stops, naming why and the key that allows the CPU."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import varup.config.cluster as vcl
import varup.config.schema as vs
from varup.base.runtime import DeviceError, allocated_gpus, cpu_fallback_refusal, resolve_device

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": ""}, None),  # every GPU hidden
    ({"CUDA_VISIBLE_DEVICES": "-1", "SLURM_GPUS_ON_NODE": "0"}, None),
    ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),  # GPU index 0 is a GPU
    ({"SLURM_JOB_GPUS": "2,3"}, "SLURM_JOB_GPUS=2,3"),
    ({"SLURM_STEP_GPUS": "1"}, "SLURM_STEP_GPUS=1"),
    ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE=4"),
    ({"SLURM_GPUS": "a100:2"}, "SLURM_GPUS=a100:2"),
])
def test_allocated_gpus_reads_what_slurm_sets(env, expected):
    assert allocated_gpus(env) == expected


@pytest.mark.parametrize("policy,env,refused", [
    ("", {}, None),  # a laptop without GPU: the CPU is fine
    ("", {"SLURM_JOB_ID": "7"}, None),  # a CPU rule in a Slurm job
    ("", {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0,1"}, "GPUs were allocated to this job (CUDA_VISIBLE_DEVICES=0,1)"),
    ("gpu", {}, None),  # a GPU rule run locally without GPU (the toy on a laptop)
    ("gpu", {"SLURM_JOB_ID": "7"}, "this GPU rule runs in Slurm job 7, which was given no GPU"),
    ("gpu", {"SLURM_JOB_GPUS": "0"}, "GPUs were allocated to this job (SLURM_JOB_GPUS=0)"),
    ("any", {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0"}, None),  # allow_cpu_fallback
])
def test_the_decision_to_refuse_the_cpu(policy, env, refused):
    why = cpu_fallback_refusal(policy, env)
    assert (why is None) if refused is None else (why is not None and why.startswith(refused)), why
    with pytest.raises(ValueError, match="policy"):
        cpu_fallback_refusal("sometimes", env)


def test_auto_stops_with_the_reason_and_the_key_when_torch_sees_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(DeviceError) as e:
        resolve_device("auto")
    msg = str(e.value)
    assert "CUDA_VISIBLE_DEVICES=0,1" in msg and "torch.cuda.is_available() is False" in msg
    assert "device: cpu" in msg and "allow_cpu_fallback: true" in msg
    assert resolve_device("auto:any") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", env={}) == torch.device("cpu")  # nothing allocated: the CPU is fine
    with pytest.raises(DeviceError, match="Slurm job 9"):
        resolve_device("auto:gpu", env={"SLURM_JOB_ID": "9"})


def test_auto_takes_a_gpu_that_works(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto:gpu", env={"SLURM_JOB_ID": "9", "CUDA_VISIBLE_DEVICES": "0"}) == torch.device("cuda")


def test_the_workflow_passes_gpu_rules_the_strict_policy(tmp_path):
    cfg = vs.validate(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    assert cfg["allow_cpu_fallback"] is False
    assert (vcl.job_device(cfg, gpu_rule=True), vcl.job_device(cfg, gpu_rule=False)) == ("auto:gpu", "auto")
    assert vcl.job_device({**cfg, "allow_cpu_fallback": True}, gpu_rule=True) == "auto:any"
    assert vcl.job_device({**cfg, "device": "cpu"}, gpu_rule=True) == "cpu"
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", "-p"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    devices = {}
    for block in re.split(r"\n(?=rule \w+:)", r.stdout):
        m, d = re.match(r"rule (\w+):", block), re.search(r"--device (\S+)", block)
        if m and d:
            devices.setdefault(d.group(1), set()).add(m.group(1))
    assert devices["auto"] == {"mode_coverage", "toy_metrics"}  # CPU rules
    assert {"train", "sample_shard", "evaluate", "encode", "tokenizer_train"} <= devices["auto:gpu"]
