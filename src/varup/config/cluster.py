"""Cluster and device policy of the rules: the ``--device`` of a job, Slurm resources, the training launch. Each
function reads a validated config (:func:`varup.config.schema.validate`), whose schema defaults are filled in."""
from __future__ import annotations


def job_device(cfg: dict, gpu_rule: bool) -> str:
    """The ``--device`` of a rule's job: the configured device, where ``auto`` becomes ``auto:any`` with
    ``allow_cpu_fallback`` and ``auto:gpu`` for a GPU rule (which then refuses the CPU in a Slurm job;
    :func:`varup.base.runtime.resolve_device`)."""
    dev = cfg["device"]
    if dev != "auto":
        return dev
    return "auto:any" if cfg["allow_cpu_fallback"] else ("auto:gpu" if gpu_rule else "auto")


def cluster_resources(cfg: dict, gpu: bool) -> dict:
    """Slurm partition/account resources from ``cluster`` (only the ones set)."""
    c = cfg["cluster"]
    part = (c["gpu_partition"] or c["partition"]) if gpu else c["partition"]
    return {k: v for k, v in (("slurm_partition", part), ("slurm_account", c["account"])) if v}


#: train keys that say how a run is launched (processes, nodes, time-limit margin), not what it computes: they
#: are not part of the run specification, so changing them re-trains nothing
LAUNCH_KEYS = ("gpus", "nodes", "stop_before_limit_s")


def train_launch(cfg: dict) -> tuple[str, dict]:
    """The command prefix that starts ``varup train`` and the Slurm resources of the training rule.

    1 GPU: ``varup``. G > 1 on one node: ``torchrun --standalone --nproc_per_node=G -m varup`` with ``gpu=G,
    nodes=1``. K > 1 nodes: ``srun`` starts ``python -m varup.base.launch`` once per node (``nodes=K, tasks=K, mpi=srun``,
    ``--gpus-per-task=G``), which reads the node list from the task's own environment and starts torchrun
    (:mod:`varup.base.launch`); ``{cpus}`` in the command is the rule's ``cpus_per_task`` resource. CPUs and memory
    scale with the GPUs of a node (``cluster.train_cpus_per_gpu``, ``cluster.train_mem_mb_per_gpu``). No ``--signal`` is requested: the trainer stops itself
    ``train.stop_before_limit_s`` before the time limit (:class:`varup.base.runtime.SlurmClock`)."""
    t, c = cfg["train"], cfg["cluster"]
    g, k = int(t["gpus"]), int(t["nodes"])
    res = cluster_resources(cfg, gpu=True)
    res.update(cpus_per_task=g * int(c["train_cpus_per_gpu"]), mem_mb=g * int(c["train_mem_mb_per_gpu"]),
               runtime=int(c["train_runtime_min"]))
    if k > 1:  # the job step lost the allocation's SLURM_* settings: srun is told the task's CPUs and GPUs again
        res.update(nodes=k, tasks=k, mpi="srun", slurm_extra=f"--gpus-per-task={g}")
        return (f"srun -n {k} --cpus-per-task={{cpus}} --gpus-per-task={g} python -m varup.base.launch "
                f"--nproc-per-node={g} --"), res
    res.update(gpu=g, nodes=1)
    return ("varup" if g == 1 else f"torchrun --standalone --nproc_per_node={g} -m varup"), res
