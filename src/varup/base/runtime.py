"""What every long-running job shares: device and precision, torchrun/DDP setup, resumable checkpoints with RNG
state and a log that survives a retry, and a preemption guard that turns SIGTERM/SIGUSR1/SIGINT, or the Slurm time
limit coming close (:class:`SlurmClock`), into a checkpoint and a requeue or a clean, retryable exit."""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from varup.base.checkpoint import CheckpointError, read_checkpoint
from varup.base.utils import (
    NoSpaceError,
    atomic_path,
    atomic_write_text,
    is_out_of_space,
    no_space_error,
    sweep_temp_files,
)

log = logging.getLogger("varup.base.runtime")

#: exit status of a job that stopped on a preemption signal after writing its checkpoint (EX_TEMPFAIL): Snakemake
#: sees a failure and its ``retries`` restart the rule, which resumes from the checkpoint.
EXIT_PREEMPTED = 75


class NonFiniteLossError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ device
class DeviceError(RuntimeError):
    pass


#: environment variables that say GPUs were given to this process (Slurm sets them for --gpus / --gres=gpu)
GPU_ENV_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
_NO_GPU_VALUES = ("", "-1", "none", "nodevfiles")  # and a count of 0 in SLURM_GPUS* (a 0 elsewhere is GPU index 0)

#: ``auto`` and its policies: ``auto`` refuses the CPU where GPUs were allocated; ``auto:gpu`` (the workflow's GPU
#: rules) also refuses it in any Slurm job; ``auto:any`` (config ``allow_cpu_fallback: true``) never refuses it
AUTO_POLICIES = ("", "gpu", "any")


def allocated_gpus(env) -> str | None:
    """``VAR=value`` of the first variable saying that GPUs were allocated to this process, else None."""
    names = [*GPU_ENV_VARS, *sorted(k for k in env if k.startswith("SLURM_GPUS"))]
    for k in names:
        v = str(env.get(k, "")).strip()
        if v.lower() not in _NO_GPU_VALUES and not (k.startswith("SLURM_GPUS") and v == "0"):
            return f"{k}={v}"
    return None


def cpu_fallback_refusal(policy: str, env) -> str | None:
    """Why ``auto`` (with ``policy``) must not fall back to the CPU in this environment; None when it may."""
    if policy not in AUTO_POLICIES:
        raise ValueError(f"device 'auto:{policy}': the policy must be one of {[p for p in AUTO_POLICIES if p]}")
    if policy == "any":
        return None
    gpus = allocated_gpus(env)
    if gpus:
        return f"GPUs were allocated to this job ({gpus})"
    job = slurm_job_id(env)
    if policy == "gpu" and job:
        return (f"this GPU rule runs in Slurm job {job}, which was given no GPU (no {'/'.join(GPU_ENV_VARS)}, "
                f"SLURM_GPUS*: does the profile's set-resources request gpu for the rule?)")
    return None


def cuda_unavailable_reason() -> str:
    """What torch says about CUDA when ``torch.cuda.is_available()`` is False (driver too old, no driver, ...)."""
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - the message is the point
        return f"{type(e).__name__}: {e}".strip()
    return f"torch.cuda.device_count() = {torch.cuda.device_count()}"


def _refuse_cpu(name: str, why: str) -> DeviceError:
    return DeviceError(
        f"device {name!r}: refusing to fall back to the CPU: {why}, but torch.cuda.is_available() is False "
        f"({cuda_unavailable_reason()}; torch {torch.__version__}, CUDA build {torch.version.cuda}). A GPU job on the "
        f"CPU would run for days instead of failing. Fix the node's GPU setup (driver, torch build), or run on the CPU "
        f"on purpose: config `device: cpu`, or `allow_cpu_fallback: true` (a GPU where one works, else the CPU); "
        f"on the command line --device cpu or --device auto:any.")


def resolve_device(name: str = "auto", env=None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, or ``auto[:policy]`` = CUDA when torch sees a GPU, else the CPU unless
    :func:`cpu_fallback_refusal` says the job was meant for a GPU (then :class:`DeviceError`, naming why)."""
    if name.split(":")[0] == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        why = cpu_fallback_refusal(name.partition(":")[2], os.environ if env is None else env)
        if why:
            raise _refuse_cpu(name, why)
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``bf16`` / ``fp16`` autocast on CUDA, ``fp32`` (no autocast) otherwise; ``auto`` = bf16 on CUDA."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return None
    if device.type != "cuda":
        log.warning("precision %s requested on %s: running in fp32", precision, device)
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def tf32_matmuls(device: torch.device):
    """TF32 for float32 matrix products and convolutions on CUDA for the duration (what stays fp32 under autocast:
    the VQVAE decode, softmax inputs), restoring the previous settings; nothing on other devices."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


#: cuBLAS's workspace setting for reproducible results (one of the two values NVIDIA documents, ``:4096:8`` and
#: ``:16:8``; read at the process's first cuBLAS call): a user's own choice of the two is kept
CUBLAS_WORKSPACE = ":4096:8"
#: the environment variable by which the workflow passes config ``deterministic`` to its jobs (workflow/rules/common.smk)
DETERMINISTIC_ENV = "VARUP_DETERMINISTIC"


def deterministic_requested(env=None) -> bool:
    """Whether :data:`DETERMINISTIC_ENV` asks for :func:`set_deterministic` (``1``/``true``; unset, ``0``/``false``:
    no). Any other value is refused, naming the variable."""
    v = str((os.environ if env is None else env).get(DETERMINISTIC_ENV, "")).strip().lower()
    if v in ("", "0", "false"):
        return False
    if v in ("1", "true"):
        return True
    raise ValueError(f"environment variable {DETERMINISTIC_ENV}={v!r}: use 1 or 0 (the workflow sets it from config "
                     f"key `deterministic`, workflow/rules/common.smk)")


def set_deterministic(on: bool) -> dict[str, Any]:
    """Config ``deterministic: true``: torch's deterministic algorithms (``warn_only=False``: an operation without a
    deterministic implementation stops the job, naming it), cuDNN deterministic with its autotuner off, and
    ``CUBLAS_WORKSPACE_CONFIG`` (call this before the first cuBLAS call). Logs and returns what it set; off
    (the default) changes nothing and returns ``{}``. It makes a GPU run repeat itself on the same GPU model,
    driver, torch/CUDA versions and world size; it does not make runs agree across GPU models or world sizes."""
    if not on:
        return {}
    if torch.cuda.is_initialized() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        log.warning("deterministic: CUDA was initialised before CUBLAS_WORKSPACE_CONFIG was set: cuBLAS may not "
                    "use it in this process")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    done = {"use_deterministic_algorithms": True, "CUBLAS_WORKSPACE_CONFIG": os.environ["CUBLAS_WORKSPACE_CONFIG"],
            "cudnn.deterministic": True, "cudnn.benchmark": False}
    log.info("deterministic: %s", ", ".join(f"{k}={v}" for k, v in done.items()))
    return done

# ------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: bool = False  # in a process group (torchrun), even of one rank: DDP, all-reduces

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1 or self.group


def init_distributed(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun (RANK and WORLD_SIZE set; NCCL on GPU, gloo on CPU), at
    world size 1 too (``torchrun --nproc_per_node=1``: the DDP code path on one GPU, what ``varup gpu-check`` runs);
    a plain start (no RANK) runs without one."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(), resolve_device(device_name)
    world = int(os.environ["WORLD_SIZE"])
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, group=True), device


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel, set for a model whose buffers are constants (the VAR's level index, its
    block-causal mask, the attention's zero key bias, the caption table): no broadcast of the buffers before every
    forward (the mask alone is 1.85 MB at 256 px), only the one when DDP is built (parameters and buffers from
    rank 0); gradients as views of the all-reduce buckets (no copy between them, one gradient-sized allocation
    less). No ``find_unused_parameters``: every trainable parameter must get a gradient in every step (the trainer
    checks the first step; what a configuration never uses is frozen, e.g. the learned null caption of a
    ``text.null_condition: empty_caption`` run)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:  # torch >= 2.13
        no_forward_sync = {"forward_sync_buffers": False}
    else:  # the older flag also skips the buffers' sync when DDP is built: done here instead
        no_forward_sync = {"broadcast_buffers": False}
        for b in module.buffers():
            dist.broadcast(b, 0)
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
               **no_forward_sync)


def any_rank(d: Dist, device: torch.device, *flags) -> list[bool]:
    """Each flag (a bool or a 0-d tensor on ``device``) OR-ed over the ranks: one all-reduce and one host read for
    all of them (a host sync: the trainer calls it on log and check steps only). One rank: the flags as read."""
    if not d.enabled:
        return [bool(f) for f in flags]
    t = torch.stack([torch.as_tensor(f, device=device).reshape(()).float() for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -------------------------------------------------------------------------------------- checkpoints
def rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


#: the checkpoint kept beside ``last.pt``: the one before it, the fallback when ``last.pt`` cannot be read
PREVIOUS_CHECKPOINT = "prev.pt"
#: what a training checkpoint holds, at least
_STATE_KEYS = ("model", "optimizer", "step", "rng")


def previous_checkpoint(path: str | os.PathLike) -> Path:
    return Path(path).with_name(PREVIOUS_CHECKPOINT)


def save_training_state(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        step: int, config: dict, extra: dict | None = None, scaler=None) -> None:
    """One atomic, fsynced file with everything a resume needs (weights, optimizer, step, RNG); plain tensors and
    Python scalars only, so it loads with ``weights_only=True``. The checkpoint it replaces becomes ``prev.pt``."""
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "rng": rng_state(),
        "config": config,
        "extra": extra or {},
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    path = Path(path)
    with atomic_path(path, durable=True) as tmp:
        torch.save(state, tmp)
        if path.exists():
            _keep_as_previous(path)


def _keep_as_previous(last: Path) -> None:
    """``prev.pt`` := ``last.pt`` (a hard link, else a copy), atomically; ``last.pt`` stays in place throughout. A
    failed copy (a full disk) leaves no temporary file."""
    prev = previous_checkpoint(last)
    tmp = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(last, tmp)
        except OSError:  # a file system without hard links
            shutil.copy2(last, tmp)
        os.replace(tmp, prev)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, NoSpaceError) or not is_out_of_space(e, prev.parent):
            raise
        raise no_space_error(prev, e) from e


def load_training_state(path: str | os.PathLike, map_location="cpu", *, run_hash: str | None = None,
                        d: Dist | None = None, outputs: tuple = ()) -> dict | None:
    """The training state to resume from ``path`` (``ckpt/last.pt``), or None: start afresh.

    First the temporary files a killed job left are removed (logged): every one in the checkpoint's folder, and
    those of the job's ``outputs`` (paths) beside them. An unreadable ``last.pt`` (truncated, not a training
    checkpoint) is set aside as ``corrupt-<time>.pt`` and the previous one (``prev.pt``) takes its place when it
    can be read; one written under another ``run_hash`` is set aside as ``stale-<hash>.pt``; a ``prev.pt`` without
    ``last.pt`` (a finished or deliberately restarted run) is removed. A WARNING names the file set aside and says
    where the run resumes. With several ranks (``d``) rank 0 settles the files and the others then read what it
    left."""
    path, d = Path(path), d or Dist()
    state = None
    if d.is_main:
        sweep_temp_files(path.parent)
        for out in outputs:
            sweep_temp_files(Path(out).parent, [Path(out).name])
        state = _settle_checkpoint(path, run_hash, map_location)
    if d.enabled:
        dist.barrier()
        if not d.is_main and path.exists():
            state = _read_state(path, map_location)
    return state


def _settle_checkpoint(last: Path, run_hash: str | None, map_location) -> dict | None:
    prev = previous_checkpoint(last)
    if not last.exists():
        if prev.exists():
            log.info("removed %s: there is no %s beside it (a finished or restarted run)", prev, last.name)
            prev.unlink()
        return None
    try:
        state = _read_state(last, map_location)
    except CheckpointError as e:
        state = _recover_previous(last, e, map_location)
    if state is not None and run_hash is not None and state.get("extra", {}).get("run_hash") != run_hash:
        stale = _set_aside(last, f"stale-{state.get('extra', {}).get('run_hash', 'unknown')}")
        prev.unlink(missing_ok=True)
        log.warning("checkpoint %s was written under another configuration: moved to %s, starting afresh", last, stale)
        return None
    return state


def _read_state(path: Path, map_location) -> dict:
    """A training checkpoint (``weights_only``), or :class:`CheckpointError` naming the file."""
    state = read_checkpoint(path, map_location)
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (no {', '.join(missing)})")
    return state


def _recover_previous(last: Path, err: CheckpointError, map_location) -> dict | None:
    """``last`` cannot be read: set it aside and resume from ``prev.pt`` (moved onto ``last``) if that one can be."""
    aside, prev = _set_aside(last, "corrupt"), previous_checkpoint(last)
    why = f"{last} cannot be read ({err}): set aside as {aside.name}"
    if not prev.exists():
        log.warning("%s; there is no previous checkpoint (%s): starting afresh", why, prev.name)
        return None
    try:
        state = _read_state(prev, map_location)
    except CheckpointError as e:
        log.warning("%s; the previous checkpoint cannot be read either (%s): set aside as %s; starting afresh", why, e,
                    _set_aside(prev, "corrupt").name)
        return None
    os.replace(prev, last)
    log.warning("%s; resuming from the previous checkpoint %s at step %d", why, prev.name, int(state["step"]))
    return state


def _set_aside(path: Path, kind: str) -> Path:
    """Rename ``path`` to ``<kind>-<time>.pt`` beside it (``corrupt-20250101-120000.pt``); never overwrites."""
    stem = kind if kind.startswith("stale-") else f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    dst, n = path.with_name(f"{stem}.pt"), 1
    while dst.exists():
        dst, n = path.with_name(f"{stem}-{n}.pt"), n + 1
    os.replace(path, dst)
    return dst


def discard_training_state(path: str | os.PathLike, live_log: ResumableLog | None = None) -> None:
    """Remove a finished run's ``last.pt`` and the ``prev.pt`` kept beside it (the model file is the result), then
    the live log ``live_log`` (already published): a kill before this leaves the checkpoint with the whole log, a
    retry resumes with the whole curve; a kill in it leaves a log without a checkpoint, a retry starts afresh."""
    for p in (Path(path), previous_checkpoint(path)):
        p.unlink(missing_ok=True)
    if live_log is not None:
        live_log.discard()


def kept_checkpoint_note(path: str | os.PathLike, step: int | None) -> str:
    """What a failing run (a non-finite loss) leaves for a retry: its last good checkpoint, or none yet."""
    if step is None:
        return f"no checkpoint was written yet ({path} does not exist: a retry starts afresh)"
    return f"the last good checkpoint ({path}, step {step}) is kept"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


# ------------------------------------------------------------------------------------------- logs
class ResumableLog:
    """A job's ``metrics.jsonl``, kept beside its checkpoint while the job runs and copied to the declared
    output only when the job finishes. Snakemake deletes a failed job's declared outputs, so a log written there
    would lose everything before the checkpoint the retry resumes from; this one keeps the lines up to it (the
    lines after it are dropped on resume: the resumed job writes them again)."""

    def __init__(self, live: str | os.PathLike, published: str | os.PathLike):
        self.live, self.published = Path(live), Path(published)

    def resume_at(self, step: int) -> None:
        """Keep the lines of steps <= ``step`` (0: a fresh start keeps none); a line cut short by a crash is dropped."""
        self.live.parent.mkdir(parents=True, exist_ok=True)
        lines = self.live.read_text().splitlines() if self.live.exists() else []
        keep = [ln for ln in lines if (s := _logged_step(ln)) is not None and s <= step]
        if any(ln.strip() and _logged_step(ln) is None for ln in lines):
            log.warning("%s: dropped line(s) that are not complete JSON records (cut short by a crash)", self.live)
        atomic_write_text(self.live, "".join(k + "\n" for k in keep))

    def append(self, record: dict) -> None:
        with open(self.live, "a") as f:
            f.write(json.dumps(record) + "\n")

    def publish(self) -> None:
        """Copy the whole log onto the declared output (atomically). The live log stays until :meth:`discard`
        (:func:`discard_training_state`, after the checkpoint is gone): a kill while the job finishes then leaves
        either the checkpoint with the whole log, or the finished outputs."""
        with atomic_path(self.published) as tmp:
            shutil.copyfile(self.live, tmp)

    def discard(self) -> None:
        """Remove the live log (once it is published and the checkpoint it goes with is gone)."""
        self.live.unlink(missing_ok=True)


def _logged_step(line: str) -> int | None:
    """The step of one log line, or None for a blank or incomplete one."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------- preemption
class PreemptionGuard:
    """Record SIGTERM / SIGUSR1 / SIGINT instead of dying mid-step; the loop checks :attr:`requested` after each
    step, writes a checkpoint and exits with :data:`EXIT_PREEMPTED`. A second signal of the same kind while the
    checkpoint is written is ignored (Slurm may repeat SIGTERM)."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, clock: "SlurmClock | None" = None) -> None:
        self.requested: str | None = None
        self.time_limit = False  # the stop was asked by the clock (this rank's): requeue the job
        self.clock = clock
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        name = signal.Signals(signum).name
        if self.requested is None:
            log.warning("received %s: will checkpoint after this step and exit", name)
        self.requested = name

    def __enter__(self) -> "PreemptionGuard":
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self._old[sig] = signal.signal(sig, self._handler)
                except ValueError:  # not the main thread
                    pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested_here(self) -> bool:
        """Whether this process was signalled or its clock is due (no device, no other rank: no sync)."""
        if self.requested is None and self.clock is not None and self.clock.due():
            self.requested = f"Slurm time limit in {self.clock.left_s():.0f} s"
            self.time_limit = True
            log.warning("%s (train.stop_before_limit_s = %d): will checkpoint after this step and exit",
                        self.requested, self.clock.margin_s)
        return self.requested is not None

    def any_rank_requested(self, d: Dist, device: torch.device) -> bool:
        """All ranks agree (one of them may have been signalled first, or be the one that reads the clock); with
        several ranks an all-reduce and a host read (:func:`any_rank`)."""
        return any_rank(d, device, self.requested_here())[0]


def parse_slurm_duration(text: str) -> float | None:
    """Seconds of a Slurm duration (``[days-]hours:minutes:seconds``, ``minutes:seconds``, ``INVALID`` → None)."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not m:
        return None
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return float(((d * 24 + h) * 60 + mi) * 60 + s)


def slurm_job_id(env=None) -> str | None:
    """This process's Slurm job id, or None outside Slurm. The executor plugin's job step keeps ``SLURM_JOB_ID``
    (it strips the other ``SLURM_*`` variables)."""
    env = os.environ if env is None else env
    return env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or None


def slurm_time_left_s(env: dict | None = None) -> float | None:
    """Seconds until this Slurm job's time limit (``squeue -o %L``), or None outside Slurm / without a limit."""
    job = slurm_job_id(env)
    if not job or not shutil.which("squeue"):
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("could not ask Slurm for the time left of job %s (%s): relying on signals", job, e)
        return None
    return parse_slurm_duration(out.stdout) if out.returncode == 0 else None


class SlurmClock:
    """A training job stops itself ``margin_s`` before its Slurm time limit, checkpoints, requeues its Slurm job
    (:func:`requeue_slurm_job`; else it exits with :data:`EXIT_PREEMPTED` for a retry): no signal has to reach it.
    (``sbatch --signal`` goes to every process of the job step, whose first process is the executor plugin's
    Snakemake or torchrun: SIGUSR1 kills them.) The time left is asked again every ``requery_s`` (an administrator
    may extend the limit)."""

    def __init__(self, margin_s: float, query=slurm_time_left_s, now=time.monotonic, requery_s: float = 300.0):
        self.margin_s, self._query, self._now, self._requery_s = margin_s, query, now, requery_s
        self._end: float | None = None
        self._asked = -float("inf")

    @classmethod
    def for_job(cls, margin_s: float | None) -> "SlurmClock | None":
        """A clock for this process's Slurm job, or None outside Slurm (or when ``margin_s`` is 0 / None)."""
        left = slurm_time_left_s() if margin_s else None
        if left is None:
            return None
        clock = cls(margin_s)
        clock._asked, clock._end = clock._now(), clock._now() + left  # this first answer counts: no second query
        return clock

    def left_s(self) -> float:
        t = self._now()
        if t - self._asked >= self._requery_s:
            self._asked = t
            left = self._query()
            if left is not None:
                self._end = t + left
        return float("inf") if self._end is None else self._end - t

    def due(self) -> bool:
        return self.left_s() <= self.margin_s


def requeue_slurm_job(env: dict | None = None) -> bool:
    """Ask Slurm to requeue this job (``scontrol requeue``): it restarts under the same job id with a fresh time
    limit, and Snakemake, which sees it pending again, keeps waiting (no retry is used). False where Slurm refuses
    (``JobRequeue=0``, ``--no-requeue``) or outside Slurm: the caller then exits for a retry."""
    job = slurm_job_id(env)
    if not job or not shutil.which("scontrol"):
        return False
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("scontrol requeue %s failed (%s): exiting for a retry instead", job, e)
        return False
    if r.returncode != 0:
        log.warning("Slurm did not requeue job %s (%s): exiting for a retry instead", job, (r.stderr or r.stdout).strip())
        return False
    log.warning("requeued Slurm job %s: it restarts from this checkpoint with a fresh time limit", job)
    return True


def exit_preempted(reason: str) -> None:
    log.warning("checkpoint written; exiting with status %d (%s) so the job can be resumed", EXIT_PREEMPTED, reason)
    sys.exit(EXIT_PREEMPTED)
