"""Reading checkpoint files safely (``torch.load(weights_only=True)``) and loading state dicts strictly, with errors
that name the file."""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn as nn

# --------------------------------------------------------------------------------------------------
# checkpoints
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    pass


def extract_state_dict(obj: Any, path: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """A plain state dict from: a released ``var_d*.pth`` (plain), an official training checkpoint
    (``['trainer']['var_wo_ddp']``), or our own checkpoint (``['model']``); DDP/compile prefixes stripped."""
    if isinstance(obj, Mapping) and "trainer" in obj and isinstance(obj["trainer"], Mapping) and "var_wo_ddp" in obj["trainer"]:
        obj = obj["trainer"]["var_wo_ddp"]
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of tensors, a training checkpoint with "
                              f"['trainer']['var_wo_ddp'], or a varup checkpoint with ['model'])")
    out = {}
    for k, v in obj.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], path: str = "<checkpoint>") -> None:
    """Strict load with one error message that names every missing/unexpected key and shape mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def fmt(xs, n=20):
            return ", ".join(xs[:n]) + (f", ... ({len(xs) - n} more)" if len(xs) > n else "")
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {fmt(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {fmt(shapes, 10)}")
        raise CheckpointError(f"{path} does not match the {type(model).__name__} architecture:\n  " + "\n  ".join(parts))
    model.load_state_dict(sd, strict=True)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, a pickle with non-tensor objects, ...
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from e
