"""Input checks shared by the models and the sampler: clear errors that name what is wrong."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


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
    """A list of SN LongTensors (B, pn*pn) with indices in [0, V). The value ranges of all scales are read in one
    host transfer (one device sync on a GPU, not two per scale)."""
    if len(idx_Bl) != len(patch_nums):
        raise ValueError(f"got {len(idx_Bl)} token maps, but patch_nums {tuple(patch_nums)} has {len(patch_nums)} scales")
    B = idx_Bl[0].shape[0]
    for si, (t, pn) in enumerate(zip(idx_Bl, patch_nums)):
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"token map of scale {si} must be an integer tensor, got {t.dtype}")
        if t.ndim != 2 or t.shape[0] != B or t.shape[1] != pn * pn:
            raise ValueError(f"token map of scale {si} must have shape ({B}, {pn * pn}) for patch_num {pn}, got {tuple(t.shape)}")
    filled = [(si, t) for si, t in enumerate(idx_Bl) if t.numel()]
    if not filled:
        return
    ranges = torch.stack([torch.stack((t.min(), t.max())).to(device=filled[0][1].device, dtype=torch.int64)
                          for _, t in filled]).tolist()
    for (si, _), (lo, hi) in zip(filled, ranges):
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token map of scale {si} has indices outside [0, {vocab_size}): min {lo}, max {hi}")


def check_labels(labels: torch.Tensor, num_classes: int, allow_null: bool = True, *, sync_free: bool = False,
                 where: str = "") -> None:
    """Integer class labels in ``0..num_classes-1`` (and ``num_classes``, the null class, if ``allow_null``).

    ``sync_free`` (the per-step model forward): the range is read only where that costs no device sync and no
    torch.compile graph break, i.e. for a CPU tensor outside compilation; labels on a GPU (or inside a compiled
    graph) are then checked by the caller once where they are loaded (the sampler checks its labels; a training
    run's come from the token cache, made from the dataset's class folders). ``where`` (a file, a config key)
    prefixes the message."""
    prefix = f"{where}: " if where else ""
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{prefix}class labels must be an integer tensor, got {labels.dtype}")
    if not labels.numel() or sync_free and (labels.device.type != "cpu" or torch.compiler.is_compiling()):
        return
    hi = num_classes if allow_null else num_classes - 1
    lo_seen, hi_seen = torch.stack((labels.min(), labels.max())).tolist()  # one host read
    if lo_seen < 0 or hi_seen > hi:
        raise ValueError(f"{prefix}class label out of range: got [{lo_seen}, {hi_seen}], "
                         f"valid are 0..{num_classes - 1}" + (f" (and {num_classes} = null class)" if allow_null else ""))


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for the duration; nothing on the meta device (shape-only dry runs, e.g. of the paper-scale
    model), which autocast does not know."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the autocast region computes in on ``x``'s device, or ``x``'s own outside autocast."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if dev != "meta" and torch.is_autocast_enabled(dev) else x.dtype


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no class dropout, no DropPath) for the duration, restoring each module's previous mode."""
    was = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, t in zip(modules, was):
            m.train(t)


def check_pair(var, vae) -> None:
    """A tokenizer and a transformer made for each other: the same scales, vocabulary and latent width."""
    if tuple(vae.patch_nums) != tuple(var.patch_nums) or vae.V != var.V or vae.Cvae != var.Cvae:
        raise ValueError(f"tokenizer (patch_nums {tuple(vae.patch_nums)}, V {vae.V}, Cvae {vae.Cvae}) does not match "
                         f"the transformer (patch_nums {tuple(var.patch_nums)}, V {var.V}, Cvae {var.Cvae})")
