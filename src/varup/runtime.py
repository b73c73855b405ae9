"""What every long-running job shares: device and precision, torchrun/DDP setup, resumable checkpoints with RNG
state, and a preemption guard that turns SIGTERM/SIGUSR1 (sent by Slurm before a time limit) into a checkpoint and
a clean, retryable exit."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from varup.models.common import read_checkpoint
from varup.utils import atomic_torch_save

log = logging.getLogger("varup.runtime")

#: exit status of a job that stopped on a preemption signal after writing its checkpoint (EX_TEMPFAIL): Snakemake
#: sees a failure and its ``retries`` restart the rule, which resumes from the checkpoint.
EXIT_PREEMPTED = 75


class NonFiniteLossError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ device
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


# ------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set): NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local), device


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


def save_training_state(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        step: int, config: dict, extra: dict | None = None, scaler=None) -> None:
    """One atomic file with everything a resume needs (weights, optimizer, step, RNG); plain tensors and
    Python scalars only, so it loads with ``weights_only=True``."""
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
    atomic_torch_save(state, path)


def load_training_state(path: str | os.PathLike, map_location="cpu") -> dict | None:
    p = Path(path)
    if not p.exists():
        return None
    return read_checkpoint(p, map_location)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


# ---------------------------------------------------------------------------------------- preemption
class PreemptionGuard:
    """Record SIGTERM / SIGUSR1 / SIGINT instead of dying mid-step; the loop checks :attr:`requested` after each
    step, writes a checkpoint and exits with :data:`EXIT_PREEMPTED`. A second signal of the same kind while the
    checkpoint is written is ignored (Slurm may repeat SIGTERM)."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self) -> None:
        self.requested: str | None = None
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

    def any_rank_requested(self, d: Dist, device: torch.device) -> bool:
        """All ranks agree (one of them may have been signalled first)."""
        flag = self.requested is not None
        if not d.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t)
        return bool(t.item() > 0)


def exit_preempted(reason: str) -> None:
    log.warning("checkpoint written; exiting with status %d (%s) so the job can be resumed", EXIT_PREEMPTED, reason)
    sys.exit(EXIT_PREEMPTED)
