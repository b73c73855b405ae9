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


#: the Slurm resources a config may set per rule (``cluster.rules.<rule>``) or for every submitted rule
#: (``cluster.all``), as snakemake-executor-plugin-slurm reads them (the schema's ``$defs/slurm_rule`` admits these)
RULE_KEYS = ("runtime", "mem_mb", "cpus_per_task", "gpu_model", "constraint", "qos", "slurm_extra")
#: sbatch flags the plugin sets itself from resources: a ``slurm_extra`` that repeats one is refused by the plugin
#: at submit, so the config check refuses it first, naming the key
MANAGED_FLAGS = ("--gres", "--gpus", "-G", "--mem", "-c", "--cpus-per-task", "-t", "--time", "-p", "--partition",
                 "-A", "--account", "--ntasks", "-n", "-C", "--constraint", "-q", "--qos", "--job-name", "-J")
#: the rules sized by the launch (train.gpus / train.nodes, cluster.train_*), not by ``cluster.sizes``
LAUNCH_RULES = ("train", "train_text", "lm_sft")


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


def scaled(base: int, cap: int | None):
    """A resource callable for Snakemake: ``base`` on the first attempt, ``base x attempt`` on a retry (a job that ran
    out of memory or time gets more), never above ``cap`` (None: no cap)."""

    def value(wildcards, attempt):
        v = int(base) * int(attempt)
        return min(v, int(cap)) if cap else v

    return value


def rule_settings(cfg: dict, rule: str) -> dict:
    """A submitted rule's first-attempt Slurm settings: its row of ``cluster.sizes`` (gpu, cpus_per_task, mem_mb,
    runtime), then ``cluster.all`` (``gpu_model`` only for a rule with GPUs; for a training rule, whose size is its
    launch's, no size), then ``cluster.rules.<rule>``."""
    c = cfg["cluster"]
    out = dict(c["sizes"].get(rule, {}))
    launch = rule in LAUNCH_RULES
    gpu = int(out.get("gpu", 0)) > 0 or launch
    skip = {"runtime", "mem_mb", "cpus_per_task"} if launch else set()
    out.update({k: v for k, v in c["all"].items() if (gpu or k != "gpu_model") and k not in skip})
    out.update(c["rules"].get(rule, {}))
    return out


def with_attempt(cfg: dict, settings: dict, scale_runtime: bool = True) -> dict:
    """``settings`` with mem_mb (and runtime unless not ``scale_runtime``) as callables that grow with the attempt,
    capped by ``cluster.max_mem_mb`` / ``cluster.max_runtime_min``."""
    c, out = cfg["cluster"], dict(settings)
    if "mem_mb" in out:
        out["mem_mb"] = scaled(out["mem_mb"], c["max_mem_mb"])
    if scale_runtime and "runtime" in out:
        out["runtime"] = scaled(out["runtime"], c["max_runtime_min"])
    return out


def rule_resources(cfg: dict, rule: str) -> dict:
    """The Slurm resources of a submitted rule besides partition/account (:func:`cluster_resources`): its settings
    (:func:`rule_settings`) with memory and time growing with the attempt (:func:`with_attempt`)."""
    if rule not in cfg["cluster"]["sizes"]:
        raise KeyError(f"cluster.sizes has no row for rule {rule!r}: every submitted rule is sized there "
                       f"(src/varup/config/schema.yaml)")
    return with_attempt(cfg, rule_settings(cfg, rule))


def launch_resources(cfg: dict, rule: str, launch: dict) -> dict:
    """A training rule's resources: the launch's (:func:`train_launch`) with ``cluster.all`` and
    ``cluster.rules.<rule>`` over them (a ``slurm_extra`` is appended to the launch's own), memory growing with the
    attempt. Its time limit does not grow: a training job resumes from its checkpoint on the retry."""
    own = rule_settings(cfg, rule)
    extra = " ".join(x for x in (launch.get("slurm_extra"), own.pop("slurm_extra", None)) if x)
    res = {**launch, **own, **({"slurm_extra": extra} if extra else {})}
    return with_attempt(cfg, res, scale_runtime=False)
