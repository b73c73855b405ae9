"""The toy DAG through a real single-node Slurm (../shared/slurm, fake GPUs): sbatch submission by the Snakemake
executor plugin, every rule it runs as a Slurm job, training on 2 (fake) GPUs with torchrun starting 2 gloo processes.
What training reads (data, tokenizer, token cache, references) comes from the shared finished tiny DAG (conftest),
made with the same settings, so no Slurm test re-trains the tokenizer."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tinydag import REPO, tiny_config

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


#: what the test cluster's single 2-CPU node admits, for every submitted rule (cluster.all over cluster.sizes)
CI_SIZES = {"mem_mb": 1500, "cpus_per_task": 1, "runtime": 30}


def test_toy_dag_runs_through_slurm_with_a_two_gpu_torchrun_training(slurm, finished, tmp_path):
    work = tmp_path / "work"
    cfg = tiny_config(work / "results")
    cfg["train"]["gpus"] = 2  # every training job: 2 GPUs from Slurm, torchrun --nproc_per_node=2
    cfg["threads"] = 1
    cfg["device"] = "cpu"  # the test cluster's GPUs are fake (torch sees none): device auto would refuse the CPU
    # the core DAG from training on (training, sampling, metrics, tables, figures): every Slurm job pays a Snakemake
    # start-up, so what training reads (data, tokenizer, token cache, references, the real set's features) is the
    # shared finished tiny DAG's, made with the same settings; the studies' rules are the same kind of job
    # (test_e2e runs them)
    cfg["experiments"] = {}
    cfg["uncertainty"]["enabled"] = False
    cfg["cluster"] = {"all": CI_SIZES}  # the rules carry the paper's sizes: this 2-CPU node would refuse them
    seed_upstream(finished, work, UPSTREAM + DAG_UPSTREAM)
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(cfg))
    cmd = ["timeout", "-s", "INT", "-k", "30", "2400", sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
           "-d", str(work), "--configfile", str(f), "--workflow-profile", str(REPO / "profiles" / "slurm-ci")]
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


# ------------------------------------------------------------------- time limits, preemption, multi-node launch
#: what a training run reads, as the shared finished tiny DAG made it (same data, tokenizer and references settings)
UPSTREAM = ("data", "tokenizer", "tokens", "refs.pt", "refs.pt.prov.json", "refs.json", "mode_classifier.pt")


#: and what the metrics read besides: the real set's features and the toy-feature floor
DAG_UPSTREAM = ("real_features.npz", "real_features.npz.prov.json", "real_clean_features.npy",
                "real_clean_features.npy.prov.json", "toy_metrics_floor.json", "toy_metrics_floor.json.prov.json")


def seed_upstream(finished, work: Path, names) -> None:
    """Copy ``names`` of the shared finished tiny DAG's dataset folder into ``work``'s, with their times: Snakemake
    finds them complete (no metadata to compare) and submits only the jobs after them."""
    shared, ds = finished[0] / "results" / "toy" / "shapes", work / "results" / "toy" / "shapes"
    ds.mkdir(parents=True, exist_ok=True)
    for name in names:
        copy = shutil.copytree if (shared / name).is_dir() else shutil.copy2
        copy(shared / name, ds / name)


def _one_run_config(tmp_path: Path, finished, runtime_min: int = 30, steps: int = 1600,
                    **train) -> tuple[Path, Path, dict]:
    """A tiny config with one training run per seed (baseline only) and nothing after training. What training reads
    (data, tokenizer and its gate, token cache, references) is copied, with its times, from the shared finished
    tiny DAG built with the same settings: Snakemake finds it complete and submits only the training job, so no
    Slurm test re-trains the tokenizer (the first test above runs every rule through Slurm)."""
    work = tmp_path / "work"
    cfg = tiny_config(work / "results")
    cfg.update(device="cpu", threads=1, experiments={}, seeds=[0, 1, 2])
    cfg["methods"] = {"baseline": cfg["methods"]["baseline"]}
    cfg["uncertainty"]["enabled"] = False
    cfg["train"].update(steps=steps, log_every=100, ckpt_every=100, nonfinite_check_every=50, **train)
    # the training job's Slurm resources come from the config (a --set-resources would replace the profile's)
    cfg["cluster"] = {"train_cpus_per_gpu": 1, "train_mem_mb_per_gpu": 1500, "train_runtime_min": runtime_min}
    seed_upstream(finished, work, UPSTREAM)
    f = work / "run.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return work, f, cfg


def _smk_slurm(env, work: Path, cfgfile: Path, *args, timeout=1500) -> subprocess.CompletedProcess:
    cmd = ["timeout", "-s", "INT", "-k", "30", str(timeout), sys.executable, "-m", "snakemake", "-s",
           str(REPO / "Snakefile"), "-d", str(work), "--configfile", str(cfgfile), "--workflow-profile",
           str(REPO / "profiles" / "slurm-ci"), *args]
    return subprocess.run(cmd, env={**env, "VARUP_NO_PROGRESS": "1"}, capture_output=True, text=True,
                          timeout=timeout + 120)


@contextmanager
def _requeue_holds_lifted(env):
    """While the block runs, start every requeued job as soon as Slurm holds it: Slurm gives a requeued job a begin
    time about 2 minutes ahead (pending, reason BeginTime), which the test would only sit through. Setting its start
    time to now changes nothing the job does; it saves CI the wait."""
    stop = threading.Event()

    def lift():
        while not stop.wait(2):
            pending = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], env=env, capture_output=True,
                                     text=True, timeout=30).stdout
            for jobid, reason in (ln.split(maxsplit=1) for ln in pending.splitlines() if len(ln.split()) == 2):
                if reason.strip() == "BeginTime":
                    subprocess.run(["scontrol", "update", f"JobId={jobid}", "StartTime=now"], env=env,
                                   capture_output=True, timeout=30)

    thread = threading.Thread(target=lift, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


def _model(work: Path, seed: int) -> Path:
    return work / "results" / "toy" / "shapes" / "d1" / "baseline" / f"seed{seed}" / "model.pt"


def _reference_run(work: Path, cfg: dict, seed: int, out: Path) -> Path:
    """The same run trained in one go, outside Slurm, from the same token cache, tokenizer and references."""
    import varup.config.plan as vp
    import varup.config.schema as vs

    full = vs.validate(yaml.safe_load(yaml.safe_dump(cfg)))
    spec = vp.run_spec(full, vp.Run("shapes", 1, "baseline", seed))
    ds = work / "results" / "toy" / "shapes"
    subprocess.run([sys.executable, "-m", "varup", "train", "--threads", "1", "--device", "cpu", "--spec",
                    json.dumps(spec), "--tokens", str(ds / "tokens"), "--tokenizer", str(ds / "tokenizer" / "vqvae.pt"),
                    "--refs", str(ds / "refs.pt"), "--out", str(out / "model.pt"), "--work", str(out / "train")],
                   check=True, capture_output=True, env={**os.environ, "VARUP_NO_PROGRESS": "1"}, timeout=900)
    return out


def _curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("imgs_per_s", "tokens_per_s", "elapsed_s")} for r in rows]


def _same_weights(a: Path, b: Path) -> bool:
    import torch

    sa, sb = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _train_jobs(env, work: Path) -> list[tuple[str, str]]:
    """(state, exit code) of every run of the training jobs of ``work`` (their ids from the executor's Slurm logs;
    -D lists each requeued run of a job as its own row)."""
    ids = sorted({p.stem for p in (work / ".snakemake" / "slurm_logs" / "rule_train").glob("*/*.log")}, key=int)
    if not ids:
        return []
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", ",".join(ids), "--format=JobID,State,ExitCode"],
                         env=env, capture_output=True, text=True, timeout=60).stdout
    return [tuple(ln.split("|")[1:3]) for ln in out.splitlines() if ln.strip()]


def _steps_for(finished, seconds: float) -> int:
    """Training steps that take about ``seconds`` on this machine, read from the speed of the same model (depth 1,
    width 64, batch 16, one thread) in the shared finished tiny DAG; a multiple of the log interval (100)."""
    summary = json.loads((finished[0] / "results" / "toy" / "shapes" / "d1" / "baseline" / "seed0" / "train"
                          / "summary.json").read_text())
    return max(600, 100 * math.ceil(seconds / summary["s_per_step"] / 100))


def test_a_training_job_stops_before_its_time_limit_requeues_and_resumes_identically(slurm, finished, tmp_path):
    """Slurm gives the job 3 minutes; the trainer asks Slurm for the time left, stops 150 s before the limit
    (no signal has to reach it), checkpoints and requeues its job, which Slurm restarts under the same id with a
    fresh limit while Snakemake keeps waiting; the resumed run ends with the weights and the whole loss curve of an
    uninterrupted one."""
    # a window is 3 min − 150 s margin − start-up, about 15 s of training: 60 s of this machine's steps (read from the
    # shared tiny DAG's speed) need several windows whatever its speed, and still more than one if the DAG was timed
    # on a machine twice as busy (30 s once fitted in one window then). Slurm's 2-minute hold of each requeued job is
    # lifted as soon as Slurm sets it (_requeue_holds_lifted), so a window costs its start-up and its training only
    steps = _steps_for(finished, 60)
    work, f, cfg = _one_run_config(tmp_path, finished, runtime_min=3, steps=steps, stop_before_limit_s=150)
    with _requeue_holds_lifted(slurm):
        r = _smk_slurm(slurm, work, f, str(_model(work, 0)))
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    jobs = _train_jobs(slurm, work)
    assert {s for s, _ in jobs} == {"REQUEUED", "COMPLETED"} and jobs[-1][0] == "COMPLETED", jobs
    log = (work / "results" / "toy" / "logs" / "train" / "shapes_d1_baseline_seed0.log").read_text()
    assert "resumed from" in log, log[-3000:]
    ref = _reference_run(work, cfg, 0, tmp_path / "ref")
    assert _same_weights(ref / "model.pt", _model(work, 0))
    assert _curve(_model(work, 0).parent) == _curve(ref) and len(_curve(ref)) == steps // 100


def test_a_sigterm_through_slurm_checkpoints_and_the_retry_resumes_identically(slurm, finished, tmp_path):
    """`scancel --signal=TERM` (what a preemption sends to every process of the job step) while a training job
    runs: the job step's Snakemake waits, the trainer checkpoints and exits 75, the retry resumes."""
    # the signal goes out once step 100 is logged; 25 s of this machine's steps (at least 600) leave it 20 s or more
    # to land in the running trainer, and cost the job and its reference a third of the 1,600 steps once used
    work, f, cfg = _one_run_config(tmp_path, finished, steps=_steps_for(finished, 25), stop_before_limit_s=0)
    live = _model(work, 1).parent / "train" / "ckpt" / "metrics.jsonl"
    proc = subprocess.Popen(
        ["timeout", "-s", "INT", "-k", "30", "1500", sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
         "-d", str(work), "--configfile", str(f), "--workflow-profile", str(REPO / "profiles" / "slurm-ci"),
         str(_model(work, 1))], env={**slurm, "VARUP_NO_PROGRESS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not live.exists():  # the first training job has logged a line: preempt it
        assert proc.poll() is None and time.time() - t0 < 1200, "training never started"
        time.sleep(0.5)
    jobid = next(p.stem for p in (work / ".snakemake" / "slurm_logs" / "rule_train").glob("*/*.log"))
    subprocess.run(["scancel", "--signal=TERM", jobid], env=slurm, check=True)
    out, _ = proc.communicate(timeout=1600)
    assert proc.returncode == 0, out[-6000:]
    log = (work / "results" / "toy" / "logs" / "train" / "shapes_d1_baseline_seed1.log").read_text()
    assert "resumed from" in log, log[-3000:]
    jobs = _train_jobs(slurm, work)  # the signalled job failed (its trainer exited 75) and the retry finished
    assert jobs[0][0] == "FAILED" and jobs[-1][0] == "COMPLETED" and len(jobs) == 2, jobs
    ref = _reference_run(work, cfg, 1, tmp_path / "ref")
    assert _same_weights(ref / "model.pt", _model(work, 1))
    assert _curve(_model(work, 1).parent) == _curve(ref)


def test_a_two_node_training_job_meets_at_the_rendezvous_its_tasks_resolve(slurm, finished, tmp_path):
    """train.nodes: 2 through the executor plugin (nodes=K, tasks=K, mpi=srun). The test cluster has one node, so
    the job's two tasks (one torchrun agent each) share it: each task reads the node list srun gave it and they
    meet at task 0's store, making one world of 2 ranks."""
    work, f, _ = _one_run_config(tmp_path, finished, steps=200, nodes=2, gpus=1)
    r = _smk_slurm(slurm, work, f, str(_model(work, 2)), "--set-resources", "train:nodes=1")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    s = json.loads((_model(work, 2).parent / "train" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 200
