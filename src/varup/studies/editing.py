"""Downstream tasks: zero-shot editing (paper Figures 2/3) and token-likelihood OOD detection (paper Table 3).

Zero-shot editing follows the official VAR zero-shot edit demo, which :func:`varup.sampling.sampler.sample` implements with
``teacher_tokens`` / ``force_masks`` (a True mask keeps the given token at that position of that scale):

* **out-painting** keeps the tokens inside a box (``box_mask(..., inpainting=False)``) and generates the rest;
* **in-painting** regenerates the box (``inpainting=True``);
* **class-conditional editing** is class-conditional in-painting of the box with a *target* class (official:
  "class-conditional editing is implemented as class-conditional in-painting").

The box is snapped to the latent cells of the last scale (``box_mask``). Keeping the input's tokens there does not
keep its pixels: coarser scales regenerate every token whose cell straddles the box, their contribution is upsampled
into the kept cells, and the decoder sees across cell borders. So the decoded samples are composited with the input
image: pixels of the kept cells are the input's, exactly (:func:`composite`, :func:`pixel_keep`; the official demo
does not composite).

Out-/in-painting use the null class (label ``num_classes``), as the official demo; with the null class both CFG
halves are identical, so ``cfg`` has no effect there. Sample ``j`` of image ``i`` is drawn with its own generator,
seeded ``derive_seed(seed, task, image_id_i, j)`` (one ``sample`` call per (image, sample), batch 1), so every method
receives exactly the same inputs and seeds, and an image's samples do not depend on which other images are shown.

OOD detection scores an image by the negative log-likelihood of its token map under the teacher-forced transformer
(``-log p(r_k | r_<k, c)`` summed over the L tokens of all scales, no CFG). The AUROC treats OOD as the positive
class and NLL as the score. The conditioning is the null class by default (``class_mode='null'``) for both ID and
OOD images: OOD images have no in-distribution label, and scoring ID images with their true label would give them
an unfair advantage.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from varup.base.seeding import derive_seed, make_generator
from varup.models.common import check_pair, eval_mode
from varup.models.var import VAR
from varup.models.vqvae import VQVAE, split_tokens
from varup.sampling.sampler import box_mask, edit_masks, sample

log = logging.getLogger("varup.studies.editing")

TASKS = ("outpaint", "inpaint", "edit")
TASK_TITLES = {
    "outpaint": "Out-painting: the box is kept, everything outside it is generated (null class)",
    "inpaint": "In-painting: the box is regenerated from its surroundings (null class)",
    "edit": "Class-conditional editing: the box is regenerated conditioned on the target class",
}
def _check_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise ValueError(f"box must be (y0, x0, y1, x1), got {box!r}")
    y0, x0, y1, x1 = (float(v) for v in box)
    if not (0.0 <= y0 < y1 <= 1.0 and 0.0 <= x0 < x1 <= 1.0):
        raise ValueError(f"box must satisfy 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1, got {box!r}")
    return y0, x0, y1, x1


def keep_mask(patch_nums: Sequence[int], task: str, box: Sequence[float]) -> torch.Tensor:
    """Latent-resolution (p, p) {0,1} mask of the task, 1 = keep the input token (the official ``get_edit_mask``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (expected one of {TASKS})")
    return box_mask(patch_nums, *_check_box(box), inpainting=task != "outpaint")


# ------------------------------------------------------------------------------------------------ editing
@dataclass
class EditResult:
    tokens: list[torch.Tensor]  # per scale (B, n_samples, pn*pn) int64: forced + generated tokens
    masks: list[torch.Tensor]  # per scale (pn*pn,) bool: True = the input token was kept
    keep: torch.Tensor  # (p, p) float {0,1}: the latent-resolution keep mask
    labels: torch.Tensor  # (B,) the class each image was generated with (num_classes = null class)
    seeds: list[list[int]]  # (B, n_samples) generator seeds
    images: torch.Tensor | None  # (B, n_samples, 3, H, W) float in [0, 1], composited; None when decode=False


def _task_labels(var: VAR, task: str, labels: torch.Tensor | None, target_labels, B: int, device) -> torch.Tensor:
    if task != "edit":
        return torch.full((B,), var.num_classes, dtype=torch.long, device=device)
    if target_labels is None:
        if labels is None:
            raise ValueError("task 'edit' needs target_labels (or the images' labels, to edit to the next class)")
        target = (torch.as_tensor(labels, dtype=torch.long) + 1) % var.num_classes
    elif isinstance(target_labels, int):
        target = torch.full((B,), int(target_labels), dtype=torch.long)
    else:
        target = torch.as_tensor(target_labels, dtype=torch.long).reshape(-1)
    if target.shape != (B,):
        raise ValueError(f"target_labels must give one class per image ({B}), got shape {tuple(target.shape)}")
    if int(target.min()) < 0 or int(target.max()) >= var.num_classes:
        raise ValueError(f"target_labels must be in [0, {var.num_classes}), got {target.tolist()}")
    return target.to(device)


@torch.no_grad()
def edit_tokens(var: VAR, vae: VQVAE, tokens: Sequence[torch.Tensor], labels: torch.Tensor | Sequence[int] | None,
                task: str, *, box: Sequence[float], target_labels=None, n_samples: int = 3, seed: int = 0,
                cfg: float = 3.0, top_k: int = 900, top_p: float = 0.95, more_smooth: bool = False,
                image_ids: Sequence | None = None, decode: bool = True,
                input_images: torch.Tensor | None = None) -> EditResult:
    """Out-paint / in-paint / class-conditionally edit B token maps, ``n_samples`` samples each.

    ``tokens``: per-scale (B, pn*pn) index maps of the inputs; ``labels``: their classes (only used by 'edit' when
    ``target_labels`` is None: the next class, ``(label + 1) % num_classes``). ``target_labels``: int or (B,).
    ``image_ids`` (default ``0..B-1``) name the images in the seeds: sample j of image i uses the generator seed
    ``derive_seed(seed, task, image_ids[i], j)``. One sampler call per (image, sample), batch 1.
    The decoded samples keep the pixels of ``input_images`` (B, 3, H, W) in [0, 1] (default: the decoding of
    ``tokens``) in the kept latent cells, exactly (:func:`composite`).
    """
    check_pair(var, vae)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    device = var.lvl_1L.device
    patch_nums = tuple(var.patch_nums)
    tokens = [t.to(device=device, dtype=torch.long) for t in tokens]
    B = tokens[0].shape[0]
    ids = list(range(B)) if image_ids is None else [i.item() if hasattr(i, "item") else i for i in image_ids]
    if len(ids) != B:
        raise ValueError(f"got {len(ids)} image_ids for {B} images")
    if input_images is not None and (input_images.ndim != 4 or tuple(input_images.shape[:2]) != (B, 3)):
        raise ValueError(f"input_images must be ({B}, 3, H, W), got {tuple(input_images.shape)}")
    keep = keep_mask(patch_nums, task, box)
    masks = edit_masks(patch_nums, keep)  # per scale (1, pn*pn)
    gen_labels = _task_labels(var, task, labels, target_labels, B, device)
    top_k = min(int(top_k), var.V)
    out_tokens = [torch.empty(B, n_samples, pn * pn, dtype=torch.long) for pn in patch_nums]
    images = None
    seeds = [[derive_seed(seed, task, ids[i], j) for j in range(n_samples)] for i in range(B)]
    with eval_mode(var, vae):
        for i in range(B):
            teacher = [t[i:i + 1] for t in tokens]
            for j in range(n_samples):
                out = sample(var, vae, gen_labels[i:i + 1], cfg=cfg, top_k=top_k, top_p=top_p,
                             more_smooth=more_smooth, generator=make_generator(seeds[i][j], device),
                             teacher_tokens=teacher, force_masks=[m.to(device) for m in masks], decode=decode)
                for si, t in enumerate(out.tokens):
                    out_tokens[si][i, j] = t[0].cpu()
                if decode:
                    if images is None:
                        images = torch.empty(B, n_samples, *out.images.shape[1:])
                    images[i, j] = out.images[0].float().clamp(0, 1).cpu()
        if decode:
            images = composite(_input_images(vae, tokens, input_images, images.shape), images, keep)
    return EditResult(tokens=out_tokens, masks=[m[0].cpu() for m in masks], keep=keep, labels=gen_labels.cpu(),
                      seeds=seeds, images=images)


def _input_images(vae: VQVAE, tokens: Sequence[torch.Tensor], images: torch.Tensor | None, shape) -> torch.Tensor:
    """The (B, 3, H, W) images in [0, 1] an edit keeps: ``images`` as given, else the decoding of the input tokens
    (one image at a time, like the samples: an image's result does not depend on the others of the batch)."""
    if images is None:
        images = torch.cat([vae.idxBl_to_img([t[i:i + 1] for t in tokens]) for i in range(shape[0])]).add(1).mul(0.5)
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape != (shape[0], *shape[2:]):
        raise ValueError(f"input_images must be (B, 3, H, W) = {(shape[0], *shape[2:])}, got {tuple(images.shape)}")
    return images


def pixel_keep(keep: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(H, W) bool: the pixels of the kept latent cells of a (p, p) keep mask (nearest upsampling: each cell is an
    (H/p) x (W/p) block). The same region is hatched in the figure's input column and composited."""
    return torch.nn.functional.interpolate(keep[None, None].float(), size=(H, W), mode="nearest")[0, 0].bool()


def composite(inputs: torch.Tensor, samples: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``samples`` (B, n, 3, H, W) with the pixels of the kept latent cells replaced by those of ``inputs``
    (B, 3, H, W): outside the edited region every pixel is the input's."""
    m = pixel_keep(keep, *samples.shape[-2:])
    return torch.where(m, inputs[:, None].to(samples.dtype), samples)


def edit_images(var: VAR, vae: VQVAE, tokens: Sequence[torch.Tensor], labels, task: str, *, box: Sequence[float],
                target_labels=None, n_samples: int = 3, seed: int = 0, cfg: float = 3.0, top_k: int = 900,
                top_p: float = 0.95, more_smooth: bool = False, image_ids: Sequence | None = None) -> torch.Tensor:
    """(B, n_samples, 3, H, W) in [0, 1]; see :func:`edit_tokens`."""
    return edit_tokens(var, vae, tokens, labels, task, box=box, target_labels=target_labels, n_samples=n_samples,
                       seed=seed, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
                       image_ids=image_ids).images


# ------------------------------------------------------------------------------------------------ figure
def masked_input(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The input column: kept region as is, regenerated region dimmed towards grey and hatched.
    images (B, 3, H, W) in [0, 1]; keep (p, p) latent mask -> (B, 3, H, W)."""
    B, _, H, W = images.shape
    m = pixel_keep(keep, H, W)
    period = max(6, H // 16)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    hatch = ((yy + xx) % period) < max(1, period // 3)
    dim = images.float() * 0.35 + 0.5 * 0.65
    dim = torch.where(hatch, dim * 0.45, dim)
    return torch.where(m, images.float(), dim).clamp(0, 1)


def _u8(x: torch.Tensor) -> np.ndarray:
    from varup.data.folder import to_uint8

    return to_uint8(x)


def edit_grid(inputs: np.ndarray, samples: Mapping[str, np.ndarray], pad: int = 2, gap: int | None = None):
    """Compose the figure: a row per image; the input column, then each method's samples as a column group.
    inputs (B, H, W, 3) uint8; samples name -> (B, n, H, W, 3) uint8. Returns (grid uint8, group centres in px)."""
    B, H, W, _ = inputs.shape
    n = {k: v.shape[1] for k, v in samples.items()}
    gap = max(4, W // 10) if gap is None else gap
    cols = 1 + sum(n.values())
    Wg = cols * (W + pad) + pad + gap * len(samples)
    Hg = B * (H + pad) + pad
    grid = np.full((Hg, Wg, 3), 255, np.uint8)
    centres = {}
    for r in range(B):
        y = pad + r * (H + pad)
        grid[y:y + H, pad:pad + W] = inputs[r]
    centres["input"] = pad + W / 2
    x = pad + W + pad
    for name, arr in samples.items():
        x += gap
        start = x
        for j in range(arr.shape[1]):
            for r in range(B):
                y = pad + r * (H + pad)
                grid[y:y + H, x:x + W] = arr[r, j]
            x += W + pad
        centres[name] = (start + x - pad) / 2
    return grid, centres


def downstream_figure(models: Mapping[str, VAR], vae: VQVAE, tokens: Sequence[torch.Tensor], labels,
                      input_images: torch.Tensor, task: str, out_dir: str | os.PathLike, name: str, *,
                      row_labels: Sequence[str] | None = None, title: str | None = None, **kw) -> dict:
    """Edit the same inputs with every model (same seeds) and save the Figure-2-style grid as PNG + PDF.

    ``models``: name -> VAR, in column-group order (e.g. ours, then baseline); ``input_images`` (B, 3, H, W) in
    [0, 1], shown in the first column with the regenerated region dimmed and hatched; ``kw`` goes to
    :func:`edit_tokens` (``box`` is required). Returns {inputs (B,H,W,3) uint8 as shown, samples: name ->
    (B, n, 3, H, W) float, tokens: name -> per-scale tokens, labels, seeds, keep, grid (uint8)}.
    """
    import matplotlib.pyplot as plt

    from varup.base.plotting import save_figure  # selects the Agg backend (files only) before any figure

    if not models:
        raise ValueError("downstream_figure needs at least one model")
    results = {k: edit_tokens(m, vae, tokens, labels, task, input_images=input_images, **kw)
               for k, m in models.items()}
    first = next(iter(results.values()))
    shown = masked_input(input_images.detach().float().cpu().clamp(0, 1), first.keep)
    inputs_u8 = _u8(shown)
    samples_u8 = {}
    for k, res in results.items():
        B, n = res.images.shape[:2]
        samples_u8[k] = _u8(res.images.reshape(B * n, *res.images.shape[2:])).reshape(B, n, *inputs_u8.shape[1:])
    grid, centres = edit_grid(inputs_u8, samples_u8)
    Hg, Wg = grid.shape[:2]
    cols = 1 + sum(a.shape[1] for a in samples_u8.values())
    fig_w = 1.7 * cols  # ~256 px per cell at the 150 dpi of save_figure
    fig, ax = plt.subplots(figsize=(fig_w, fig_w * Hg / Wg + 0.7))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xlim(-0.5, Wg - 0.5)
    ax.set_ylim(Hg - 0.5, -0.5)
    ax.axis("off")
    for k, cx in centres.items():
        n_k = samples_u8[k].shape[1] if k != "input" else 0
        label = k if k == "input" else f"{k} ({n_k} sample{'s' if n_k != 1 else ''})"
        ax.text(cx, -3, label, ha="center", va="bottom", fontsize=9, fontweight="bold" if k != "input" else "normal")
    if row_labels is not None:
        H = inputs_u8.shape[1]
        for r, text in enumerate(row_labels):
            ax.text(-4, 2 + r * (H + 2) + H / 2, text, ha="right", va="center", fontsize=7)
    fig.suptitle(title or TASK_TITLES.get(task, task), fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_dir, name)
    return {"inputs": inputs_u8, "samples": {k: r.images for k, r in results.items()},
            "tokens": {k: r.tokens for k, r in results.items()}, "labels": first.labels, "seeds": first.seeds,
            "keep": first.keep, "grid": grid}


def run_downstream(models: Mapping[str, str | os.PathLike], tokenizer: str | os.PathLike, tokens_dir: str | os.PathLike,
                   data_dir: str | os.PathLike | None, out_dir: str | os.PathLike, *, dataset_name: str,
                   n_images: int = 4, n_samples: int = 3, tasks: Sequence[str] = TASKS,
                   outpaint_box: Sequence[float] = (0.25, 0.25, 0.75, 0.75),
                   inpaint_box: Sequence[float] = (0.3, 0.3, 0.7, 0.7), edit_box: Sequence[float] | None = None,
                   edit_target: int | Sequence[int] | None = None, seed: int = 0, cfg: float = 3.0, top_k: int = 900,
                   top_p: float = 0.95, more_smooth: bool = False, device: str = "cpu") -> dict:
    """Figures 2/3 for one dataset: ``{out_dir}/downstream_{dataset_name}_{task}.png/.pdf`` per task and the
    summary ``{out_dir}/downstream_{dataset_name}.json`` (images, seeds, boxes, target labels).

    The inputs are ``n_images`` held-out images, class-balanced and deterministic (``balanced_subset`` of the val
    split of the token cache); their cached token maps are the input tokens, and the displayed inputs are their
    tokenizer reconstructions (so the raw image files are not needed; ``data_dir`` is only recorded). ``edit_box``
    defaults to ``inpaint_box``; ``edit_target`` None = the next class of each image.
    """
    from varup.base.runtime import resolve_device
    from varup.base.utils import atomic_write_json, write_provenance

    t0 = time.time()
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r} (expected one of {TASKS})")
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    vae, nets, cache = _load_downstream(models, tokenizer, tokens_dir, dev)
    inp = _downstream_inputs(cache, vae, n_images, edit_target, dev)
    boxes = {"outpaint": tuple(outpaint_box), "inpaint": tuple(inpaint_box),
             "edit": tuple(edit_box if edit_box is not None else inpaint_box)}
    sampling = {"n_samples": n_samples, "seed": seed, "cfg": cfg, "top_k": top_k, "top_p": top_p,
                "more_smooth": more_smooth}
    summary: dict = {"dataset": dataset_name, "methods": list(models), "models": {k: str(p) for k, p in models.items()},
                     "tokenizer": str(tokenizer), "tokens_dir": str(tokens_dir),
                     "data_dir": None if data_dir is None else str(data_dir), "split": "val",
                     "images": {"rows": [int(r) for r in inp.rows], "labels": inp.labels.tolist(),
                                "classes": [inp.names[int(c)] for c in inp.labels]},
                     "sampling": {**sampling, "top_k": min(int(top_k), vae.V), "seed_rule": _SEED_RULE},
                     "protocol": _EDIT_PROTOCOL, "tasks": {}}
    for task in tasks:
        summary["tasks"][task] = _downstream_task(nets, vae, inp, task, boxes[task], out_dir, dataset_name, sampling)
    summary["wall_s"] = round(time.time() - t0, 2)
    out_json = out_dir / f"downstream_{dataset_name}.json"
    atomic_write_json(out_json, summary)
    write_provenance(out_json, config={k: v for k, v in summary.items() if k != "tasks"}, seed=seed, device=str(dev),
                     started=t0)
    return summary


_SEED_RULE = ("derive_seed(seed, task, val_row, sample_index), one generator per (image, sample), identical for "
              "every method")
_EDIT_PROTOCOL = ("official VAR zero-shot edit semantics: force masks from a box at latent resolution, "
                  "bilinearly downsampled per scale (>0.5 kept; scales with <=3 tokens always kept); "
                  "out-/in-painting with the null class, editing = class-conditional in-painting "
                  "with the target class; inputs shown are tokenizer reconstructions of the cached "
                  "val token maps; samples keep the input's pixels in the kept latent cells "
                  "(composited after decoding)")


def _load_downstream(models: Mapping[str, str | os.PathLike], tokenizer, tokens_dir, dev: torch.device):
    """The tokenizer, the models (name -> VAR) and the val token cache, on ``dev``, checked to belong together."""
    from varup.models.checkpoint import load_model
    from varup.models.vqvae import load_vqvae
    from varup.tokenizer.tokens import TokenCache

    vae = load_vqvae(tokenizer).to(dev)
    nets = {k: load_model(p).to(dev) for k, p in models.items()}
    cache = TokenCache(tokens_dir, "val")
    cache.check_made_by(vae)
    for k, m in nets.items():
        check_pair(m, vae)
        if m.num_classes != cache.num_classes:
            raise ValueError(f"model {k!r} has {m.num_classes} classes, the token cache {cache.num_classes}")
    return vae, nets, cache


@dataclass
class _Inputs:
    """The edited images of :func:`run_downstream`."""
    rows: np.ndarray  # their val rows of the token cache
    labels: torch.Tensor  # (B,) their classes
    targets: torch.Tensor  # (B,) the classes 'edit' edits them to
    tokens: list[torch.Tensor]  # their per-scale token maps, on the device
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]: their tokenizer reconstructions, on the CPU
    names: list[str]  # the class names
    num_classes: int


def _downstream_inputs(cache, vae: VQVAE, n_images: int, edit_target, dev: torch.device) -> _Inputs:
    """``n_images`` class-balanced val images of the token cache: tokens, reconstructions and edit targets."""
    from varup.data.subsets import balanced_subset

    rows = balanced_subset(cache.labels, n_images)
    tok = torch.from_numpy(np.asarray(cache.tokens[rows]).astype(np.int64)).to(dev)
    labels = torch.from_numpy(cache.labels[rows].astype(np.int64))
    tokens = split_tokens(tok, vae.patch_nums)
    with torch.no_grad():
        inputs = vae.idxBl_to_img(tokens).add(1).mul(0.5).clamp(0, 1).cpu()
    C = cache.num_classes
    names = cache.class_names
    if edit_target is None:
        targets = (labels + 1) % C
    elif isinstance(edit_target, int):
        targets = torch.full_like(labels, int(edit_target))
    else:
        targets = torch.as_tensor(edit_target, dtype=torch.long).reshape(-1)
    return _Inputs(rows=rows, labels=labels, targets=targets, tokens=tokens, images=inputs, names=names,
                   num_classes=C)


def _downstream_task(nets: Mapping[str, VAR], vae: VQVAE, inp: _Inputs, task: str, box: tuple, out_dir: Path,
                     dataset_name: str, sampling: dict) -> dict:
    """One task's figure over every model, and its record in the summary."""
    names, labels, targets = inp.names, inp.labels, inp.targets
    row_labels = [names[int(c)] for c in labels]
    kw = {}
    if task == "edit":
        kw["target_labels"] = targets
        row_labels = [f"{names[int(a)]} → {names[int(b)]}" for a, b in zip(labels, targets)]
    name = f"downstream_{dataset_name}_{task}"
    log.info("%s: %d images x %d samples x %d methods", name, len(inp.rows), sampling["n_samples"], len(nets))
    res = downstream_figure(nets, vae, inp.tokens, labels, inp.images, task, out_dir, name, row_labels=row_labels,
                            title=f"{dataset_name}: {TASK_TITLES[task]}", box=box, **sampling,
                            image_ids=[int(r) for r in inp.rows], **kw)
    return {
        "box_yxyx": list(box), "kept": "inside the box" if task == "outpaint" else "outside the box",
        "box_cells_yxyx": _cells(keep_mask(vae.patch_nums, task, box), task),
        "labels_used": res["labels"].tolist(), "null_class": inp.num_classes,
        "target_classes": [names[int(c)] for c in targets] if task == "edit" else None,
        "seeds": res["seeds"], "figure": [str(out_dir / f"{name}.png"), str(out_dir / f"{name}.pdf")],
    }


def _cells(keep: torch.Tensor, task: str) -> list[float] | None:
    """The box as snapped to the last scale's latent cells, (y0, x0, y1, x1) in [0, 1] (None: no whole cell)."""
    box = keep.bool() if task == "outpaint" else ~keep.bool()
    ys, xs = torch.nonzero(box, as_tuple=True)
    p = keep.shape[0]
    if len(ys) == 0:
        return None
    return [int(ys.min()) / p, int(xs.min()) / p, (int(ys.max()) + 1) / p, (int(xs.max()) + 1) / p]


__all__ = ["edit_tokens", "edit_images", "EditResult", "keep_mask", "pixel_keep", "composite", "masked_input", "edit_grid", "downstream_figure", "run_downstream", "TASKS"]
