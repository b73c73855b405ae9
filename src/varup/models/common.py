"""Input checks shared by the models and the sampler: clear errors that name what is wrong."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn


def check_image_batch(img: torch.Tensor, resolution: int, name: str = "image batch") -> None:
    """A float batch (B, 3, R, R) with values in [-1, 1] (the VAR normalisation ``2x - 1``)."""
    if not isinstance(img, torch.Tensor) or not img.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor, got {type(img).__name__}"
                        + (f" of dtype {img.dtype}" if isinstance(img, torch.Tensor) else ""))
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"{name}: expected shape (B, 3, {resolution}, {resolution}), got {tuple(img.shape)}")
    if img.shape[2] != resolution or img.shape[3] != resolution:
        raise ValueError(f"{name}: image size {img.shape[2]}x{img.shape[3]} does not match the tokenizer "
                         f"resolution {resolution}x{resolution} (patch_nums[-1] x downsample factor)")
    lo, hi = float(img.min()), float(img.max())
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        hint = " (looks like [0, 255]: divide by 255 first)" if hi > 2 else " (looks like [0, 1]: use 2x-1)" if lo >= 0 and hi <= 1 else ""
        raise ValueError(f"{name}: values must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}]{hint}")


def check_token_maps(idx_Bl: Sequence[torch.Tensor], patch_nums: Sequence[int], vocab_size: int) -> None:
    """A list of SN LongTensors (B, pn*pn) with indices in [0, V)."""
    if len(idx_Bl) != len(patch_nums):
        raise ValueError(f"got {len(idx_Bl)} token maps, but patch_nums {tuple(patch_nums)} has {len(patch_nums)} scales")
    B = idx_Bl[0].shape[0]
    for si, (t, pn) in enumerate(zip(idx_Bl, patch_nums)):
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"token map of scale {si} must be an integer tensor, got {t.dtype}")
        if t.ndim != 2 or t.shape[0] != B or t.shape[1] != pn * pn:
            raise ValueError(f"token map of scale {si} must have shape ({B}, {pn * pn}) for patch_num {pn}, got {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
            raise ValueError(f"token map of scale {si} has indices outside [0, {vocab_size}): "
                             f"min {int(t.min())}, max {int(t.max())}")


def check_labels(labels: torch.Tensor, num_classes: int, allow_null: bool = True) -> None:
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"class labels must be an integer tensor, got {labels.dtype}")
    hi = num_classes if allow_null else num_classes - 1
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > hi):
        raise ValueError(f"class label out of range: got [{int(labels.min())}, {int(labels.max())}], "
                         f"valid are 0..{num_classes - 1}" + (f" (and {num_classes} = null class)" if allow_null else ""))


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
