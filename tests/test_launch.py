"""The cluster launch path without a cluster: Slurm host lists, the per-task torchrun command, the training rule's
resources, the time-limit clock and the log that survives a retry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import varup.config.cluster as vcl
import varup.config.plan as vp
import varup.config.schema as vs
from varup.base.launch import BASE_PORT, PORT_SPAN, LaunchError, expand_hostlist, torchrun_argv
from varup.base.runtime import PreemptionGuard, ResumableLog, SlurmClock, parse_slurm_duration

#: what `srun -n 2` puts into each task's environment when its parent (the executor plugin's job step) kept only
#: SLURM_JOB_ID (recorded on the local Slurm of ../shared/slurm)
TASK_ENV = {"SLURM_JOB_ID": "4321", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_NODEID": "1"}


@pytest.mark.parametrize("spec, hosts", [
    ("vm", ["vm"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[8-11]b,c[1,3]", ["a8b", "a9b", "a10b", "a11b", "c1", "c3"]),
])
def test_hostlists_expand_like_scontrol_show_hostnames(spec, hosts):
    assert expand_hostlist(spec) == hosts


def test_each_task_gets_a_static_rendezvous_on_the_first_host():
    cmd = torchrun_argv(TASK_ENV, 4, ["train", "--spec", "{}"])
    assert cmd[1:7] == ["--nnodes=2", "--node-rank=1", "--nproc-per-node=4", "--master-addr=gpu07",
                        f"--master-port={BASE_PORT + 4321 % PORT_SPAN}", "-m"]
    assert cmd[-4:] == ["varup", "train", "--spec", "{}"]


def test_the_batch_shells_stripped_environment_is_refused_with_advice():
    with pytest.raises(LaunchError, match="SLURM_STEP_NODELIST.*inside a Slurm task"):
        torchrun_argv({"SLURM_JOB_ID": "1"}, 1, ["train"])


def _cfg(**train):
    """The toy config, validated (so with the schema's cluster defaults), with these train settings."""
    cfg = vs.load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml")
    cfg["train"].update(train)
    return cfg


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_training_resources_scale_with_the_gpus_of_a_node(gpus):
    cmd, res = vcl.train_launch(_cfg(gpus=gpus))
    assert res["gpu"] == gpus and res["nodes"] == 1
    assert res["cpus_per_task"] == 8 * gpus and res["mem_mb"] == 60000 * gpus and res["runtime"] == 2880
    assert "signal" not in json.dumps(res)  # SIGUSR1 would kill the job step's Snakemake / torchrun
    assert cmd == ("varup" if gpus == 1 else f"torchrun --standalone --nproc_per_node={gpus} -m varup")


def test_multi_node_training_starts_the_launcher_once_per_node():
    cfg = _cfg(gpus=4, nodes=3)
    cfg["cluster"].update(train_cpus_per_gpu=6, train_mem_mb_per_gpu=1000, gpu_partition="a100")
    cmd, res = vcl.train_launch(cfg)
    assert res == {"slurm_partition": "a100", "cpus_per_task": 24, "mem_mb": 4000, "runtime": 2880, "nodes": 3,
                   "tasks": 3, "mpi": "srun", "slurm_extra": "--gpus-per-task=4"}
    assert cmd.format(cpus=24) == ("srun -n 3 --cpus-per-task=24 --gpus-per-task=4 python -m varup.base.launch "
                                   "--nproc-per-node=4 --")


def test_launch_keys_are_not_part_of_the_run_specification():
    cfg = vs.load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml")
    run = vp.runs(cfg)[0]
    a = vp.run_spec(cfg, run)
    cfg["train"].update(gpus=4, nodes=2, stop_before_limit_s=60)
    assert vp.run_spec(cfg, run) == a


@pytest.mark.parametrize("text, s", [("4:58", 298), ("1:02:03", 3723), ("2-00:00:10", 172810),
                                     ("INVALID", None), ("UNLIMITED", None), ("", None)])
def test_slurm_durations_parse(text, s):
    assert parse_slurm_duration(text) == s


class _Time:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_the_clock_is_due_margin_seconds_before_the_limit_and_follows_an_extension():
    now, asked = _Time(), []
    left = {"v": 1000.0}

    def query():
        asked.append(now.t)
        return left["v"] - now.t

    clock = SlurmClock(margin_s=100, query=query, now=now, requery_s=300)
    assert not clock.due()
    now.t = 299
    assert not clock.due() and asked == [0.0]  # asked once, then counted locally
    now.t = 899
    left["v"] = 5000.0  # the administrator extended the limit: seen at the next query (t=899 >= 300)
    assert not clock.due() and asked == [0.0, 899]
    now.t = 4901
    assert clock.due()


def test_the_guard_turns_a_due_clock_into_a_stop_request():
    from varup.base.runtime import Dist

    clock = SlurmClock(margin_s=10, query=lambda: 5.0)
    guard = PreemptionGuard(clock)
    assert guard.any_rank_requested(Dist(), None) and "time limit" in guard.requested
    assert not PreemptionGuard(SlurmClock(margin_s=10, query=lambda: 50.0)).any_rank_requested(Dist(), None)


def test_outside_slurm_there_is_no_clock(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOBID", raising=False)
    assert SlurmClock.for_job(600) is None


def test_the_log_keeps_its_lines_up_to_the_checkpoint_and_is_published_whole(tmp_path):
    log = ResumableLog(tmp_path / "ckpt" / "metrics.jsonl", tmp_path / "metrics.jsonl")
    log.resume_at(0)
    for step in (10, 20, 30):
        log.append({"step": step, "loss": step / 10})
    log.resume_at(20)  # the retry resumes from the step-20 checkpoint: step 30 will be logged again
    for step in (30, 40):
        log.append({"step": step, "loss": step / 10})
    log.publish()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40] and log.live.exists()  # a copy: kept until discarded
    log.discard()
    assert not log.live.exists() and (tmp_path / "metrics.jsonl").exists()
