"""Warm start from official ImageNet-1k VAR weights (``var_d16.pth`` / ``var_d20.pth``).

Every tensor is taken from the checkpoint, shapes checked, except the class embedding when the dataset has
other classes: with a ``class_map`` (ImageNet-1k index of each of our classes, e.g. the ImageNet-100 subset) rows
are picked from the official table and the null class (row 1000) is kept; without one (AFHQ) the freshly
initialised embedding is kept and only the null-class row is copied.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from varup.base.checkpoint import CheckpointError, extract_state_dict, read_checkpoint
from varup.models.var import VAR

log = logging.getLogger("varup.training.warmstart")


@torch.no_grad()
def warm_start(model: VAR, path: str, class_map: Sequence[int] | None = None) -> dict:
    sd = extract_state_dict(read_checkpoint(path), path)
    own = model.state_dict()
    src_classes = sd["class_emb.weight"].shape[0] - 1 if "class_emb.weight" in sd else None
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{path}: cannot warm-start this VAR (depth {model.depth}): missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    new = dict(sd)
    cls = own["class_emb.weight"].clone()
    src = sd["class_emb.weight"]
    if src.shape[1] != cls.shape[1]:
        raise CheckpointError(f"{path}: class embedding width {src.shape[1]} != model width {cls.shape[1]}")
    if class_map is not None:
        if len(class_map) != model.num_classes:
            raise ValueError(f"class_map has {len(class_map)} entries for {model.num_classes} classes")
        bad = [i for i in class_map if not 0 <= int(i) < src_classes]
        if bad:
            raise ValueError(f"class_map indices out of range 0..{src_classes - 1}: {bad[:5]}")
        cls[: model.num_classes] = src[torch.as_tensor(list(class_map), dtype=torch.long)]
    cls[model.num_classes] = src[src_classes]  # the null (unconditional) class
    new["class_emb.weight"] = cls
    shapes = [k for k in own if tuple(new[k].shape) != tuple(own[k].shape)]
    if shapes:
        raise CheckpointError(f"{path}: shape mismatch for {shapes[:8]} (depth or patch_nums differ?)")
    model.load_state_dict(new, strict=True)
    info = {"path": str(path), "source_classes": src_classes, "class_map": class_map is not None}
    log.info("warm start from %s (%s class embedding)", path, "mapped" if class_map is not None else "fresh")
    return info
