"""Start one node's share of a multi-node training job: ``srun`` runs ``python -m varup.base.launch`` once per node (one
Slurm task each), and each task turns what Slurm put in *its own* environment into a torchrun command line.

Why not ``torchrun --rdzv_endpoint=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)`` in the rule: the
Slurm executor plugin's job step strips every ``SLURM_*`` variable but the job id before it runs the rule's shell
command, so that expansion gives ``:29500``. ``srun`` sets the step's variables again for each task it starts
(``SLURM_STEP_NODELIST``, ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ...), so they are read here, inside the task.

The rendezvous is torchrun's static one: task ``SLURM_PROCID`` is node rank R of ``SLURM_STEP_NUM_TASKS`` agents and
task 0, on the first host of the step's node list, hosts the store on a port derived from the job id (two jobs
sharing a node do not collide)."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys

#: the store's port is BASE_PORT + job id mod PORT_SPAN
BASE_PORT, PORT_SPAN = 29500, 2000
_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


class LaunchError(RuntimeError):
    pass


def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compressed host list (``gpu[01-03,07],login1``) as host names, in order."""
    hosts = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,]*)", spec):
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{width}d}{suffix}")
    if not hosts:
        raise LaunchError(f"empty Slurm host list {spec!r}")
    return hosts


def _need(env: dict, *names: str) -> str:
    for n in names:
        if env.get(n):
            return env[n]
    raise LaunchError(f"none of {', '.join(names)} is set: run this inside a Slurm task (srun), not in the job's "
                      f"batch shell")


def torchrun_argv(env: dict, nproc_per_node: int, args: list[str]) -> list[str]:
    """The torchrun command of this Slurm task (pure: a function of the task's environment)."""
    host = expand_hostlist(_need(env, *_NODELIST_VARS))[0]
    nnodes = int(_need(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"))
    rank = int(_need(env, "SLURM_PROCID"))
    port = BASE_PORT + int(_need(env, "SLURM_JOB_ID", "SLURM_JOBID")) % PORT_SPAN
    torchrun = shutil.which("torchrun") or "torchrun"
    return [torchrun, f"--nnodes={nnodes}", f"--node-rank={rank}", f"--nproc-per-node={nproc_per_node}",
            f"--master-addr={host}", f"--master-port={port}", "-m", "varup", *args]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m varup.base.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc-per-node", type=int, required=True, help="torchrun processes (GPUs) on this node")
    p.add_argument("--print", action="store_true", help="print the torchrun command instead of running it")
    p.add_argument("args", nargs=argparse.REMAINDER, help="`varup` arguments after --, e.g. -- train --spec ...")
    a = p.parse_args(argv)
    rest = a.args[1:] if a.args[:1] == ["--"] else a.args
    try:
        cmd = torchrun_argv(dict(os.environ), a.nproc_per_node, rest)
    except LaunchError as e:
        sys.exit(f"varup.base.launch: {e}")
    if a.print:
        print(" ".join(cmd), flush=True)
        return
    os.execv(cmd[0], cmd) if os.path.isabs(cmd[0]) else os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
