"""Class-conditional next-scale sampling with the official CFG schedule and top-k / top-p semantics.

* :func:`sample` — the official ``autoregressive_infer_cfg`` (linear CFG ramp ``t = cfg * si / (SN-1)``, logits
  ``(1+t)·cond - t·uncond``, top-k then top-p on the masked logits, one ``multinomial`` per scale, optional
  ``more_smooth`` Gumbel blending), driven by an explicit ``torch.Generator`` so that (seed, labels) always
  gives the same images on the same device. It optionally teacher-forces given tokens where a mask says so
  (in-/out-painting, class-conditional editing as in the official zero-shot edit demo), mixes class embeddings
  (class entanglement), and returns the raw logits of both CFG halves for inspection.
* :func:`mc_dropout` — a context that keeps DropPath active at inference with seeded masks (MC-dropout), drawn
  per call (as the official code) or held per pass.
* :func:`edit_masks` — per-scale force masks from a box, as the official ``get_edit_mask``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from varup.base.runtime import autocast, autocast_dtype, tf32_matmuls
from varup.base.seeding import derive_seed, make_generator
from varup.models.common import check_labels, check_pair, check_token_maps
from varup.models.var import VAR
from varup.models.vqvae import VQVAE


@dataclass
class SampleOutput:
    images: torch.Tensor | None  # (B, 3, H, W) float in [0, 1]; None when decode=False
    tokens: list[torch.Tensor]  # per scale (B, pn*pn) int64
    labels: torch.Tensor  # (B,)
    raw_logits: list[torch.Tensor] = field(default_factory=list)  # per scale (2B, pn*pn, V), before CFG


@dataclass
class TextCondition:
    """A caption's text embedding (E,) and the unconditional one (E,; None: the model's learned null vector), for
    a text-conditioned VAR (:class:`varup.models.textvar.TextVAR`)."""
    emb: torch.Tensor
    null: torch.Tensor | None = None

    def cond_BD(self, var, B: int) -> torch.Tensor:
        dev = var.lvl_1L.device
        null = None if self.null is None else self.null.to(dev)
        return var.guided_condition(self.emb.to(dev).reshape(1, -1).expand(B, -1), null)


def condition_kwargs(var, condition, B: int) -> dict:
    """:func:`sample` keyword arguments that condition B images on ``condition``: a class index, a
    (num_classes+1,) class-weight vector (an equal mix: class entanglement) or a :class:`TextCondition`."""
    dev = var.lvl_1L.device
    if isinstance(condition, TextCondition):
        return {"labels": None, "cond_BD": condition.cond_BD(var, B)}
    w = torch.as_tensor(condition, dtype=torch.float32)
    if w.ndim == 0:
        return {"labels": torch.full((B,), int(w), dtype=torch.long, device=dev)}
    if w.ndim != 1 or w.shape[0] != var.num_classes + 1:
        raise ValueError(f"class weights must have shape ({var.num_classes + 1},), got {tuple(w.shape)}")
    label = torch.full((B,), int(w[:var.num_classes].argmax()), dtype=torch.long, device=dev)
    return {"labels": label, "class_weights": w.to(dev).view(1, -1).expand(B, -1)}


def top_k_top_p_filter_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask logits in place, official order and semantics: top-k keeps ties with the k-th value; top-p on the
    top-k-masked logits removes the low tail whose cumulative mass is <= 1 - top_p, always keeping the top token."""
    V = logits_BlV.shape[-1]
    if top_k > 0 and top_k < V:
        kth = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits_BlV.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    return logits_BlV


# one generator for the batch, or one per image (a list of B): image b's noise then comes from its own generator,
# drawn as in a batch of one (batched MC-dropout passes that reproduce the passes made one at a time)
Generators = torch.Generator | Sequence[torch.Generator] | None


def _per_image(generator: Generators, B: int) -> bool:
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for a batch of {B} images (one per image)")
        return True
    return False


def sample_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                        generator: Generators = None) -> torch.Tensor:
    """(B, l, V) logits -> (B, l) indices; the logits are masked in place (as the official helper)."""
    B, l, V = logits_BlV.shape
    top_k_top_p_filter_(logits_BlV, top_k, top_p)
    probs = logits_BlV.softmax(dim=-1)
    if _per_image(generator, B):
        return torch.stack([torch.multinomial(p, num_samples=1, replacement=True, generator=g).view(l)
                            for p, g in zip(probs, generator)])
    return torch.multinomial(probs.view(-1, V), num_samples=1, replacement=True, generator=generator).view(B, l)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: Generators) -> torch.Tensor:
    if generator is None:
        return F.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
    if _per_image(generator, logits.shape[0]):
        return torch.cat([gumbel_softmax(logits[b:b + 1], tau, g) for b, g in enumerate(generator)])
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=generator).log()
    return ((logits + gumbels) / tau).softmax(-1)


def edit_masks(patch_nums: Sequence[int], edit_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per-scale boolean force masks (B, pn*pn) from a latent-resolution mask (h, w) or (B, h, w) in {0, 1}
    (1 = keep the given token). Downsampled bilinearly and thresholded at 0.5; scales with pn*pn <= 3 are always
    forced, exactly as the official zero-shot edit demo."""
    if edit_mask.ndim == 2:
        edit_mask = edit_mask.unsqueeze(0)
    out = []
    for pn in patch_nums:
        m = F.interpolate(edit_mask.unsqueeze(1).float(), size=(pn, pn), mode="bilinear", align_corners=False).gt(0.5)
        if pn * pn <= 3:
            m.fill_(True)
        out.append(m.view(m.shape[0], pn * pn))
    return out


def box_mask(patch_nums: Sequence[int], y0: float, x0: float, y1: float, x1: float, inpainting: bool) -> torch.Tensor:
    """Latent-resolution {0,1} mask of a box given in [0,1] image coordinates (official ``get_edit_mask``):
    out-painting keeps the box (1 inside), in-painting regenerates it (0 inside)."""
    p = patch_nums[-1]
    m = torch.zeros(p, p)
    m[round(y0 * p):round(y1 * p), round(x0 * p):round(x1 * p)] = 1
    return 1 - m if inpainting else m


@torch.no_grad()
def sample(var: VAR, vae: VQVAE, labels: torch.Tensor | int | None, *, batch_size: int | None = None,
           cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False, temperature: float = 1.0,
           generator: Generators = None, class_weights: torch.Tensor | None = None,
           teacher_tokens: Sequence[torch.Tensor] | None = None, force_masks: Sequence[torch.Tensor] | None = None,
           return_raw_logits: bool = False, decode: bool = True, cond_BD: torch.Tensor | None = None) -> SampleOutput:
    """Generate B images.

    labels: LongTensor (B,), an int shared by all (negative = null class), or None (drawn uniformly from the
    generator, as the official code). ``class_weights`` (B, num_classes+1) replaces the class embedding of the
    conditional half by a weighted mix. ``teacher_tokens``/``force_masks``: per-scale (B, pn*pn) tokens and
    boolean masks; where a mask is True the given token's embedding replaces the sampled one. ``cond_BD`` (2B, D):
    the conditional then the unconditional condition embeddings, for a model not conditioned on classes
    (:meth:`varup.models.textvar.TextVAR.guided_condition`); ``labels`` are then only carried into the output.
    ``generator``: one generator for the batch, or a list of one per image (image b is then drawn from its own, as
    :func:`sample` with that generator alone would draw it; the labels must be given). ``temperature`` divides the
    guided logits before top-k / top-p (1.0: the official sampler, unchanged).
    """
    labels = _batch_labels(var, labels, batch_size, generator, cond_BD)
    _check_inputs(var, vae, labels, cond_BD, teacher_tokens, force_masks)
    cond_BD = _guided_condition(var, labels, class_weights, cond_BD)
    teacher = None if teacher_tokens is None else (teacher_tokens, force_masks)
    f_hat, tokens, raw = _next_scale_loop(var, vae, cond_BD, labels.shape[0], cfg=cfg, top_k=top_k, top_p=top_p,
                                          more_smooth=more_smooth, temperature=temperature, generator=generator,
                                          teacher=teacher,
                                          return_raw_logits=return_raw_logits)
    images = vae.fhat_to_img(f_hat).add_(1).mul_(0.5) if decode else None
    return SampleOutput(images=images, tokens=tokens, labels=labels, raw_logits=raw)


def _batch_labels(var: VAR, labels: torch.Tensor | int | None, batch_size: int | None,
                  generator: Generators, cond_BD: torch.Tensor | None) -> torch.Tensor:
    """:func:`sample`'s ``labels`` as a (B,) LongTensor on the model's device (drawn from ``generator`` when None;
    -1 per image with ``cond_BD`` and no labels given)."""
    device = var.lvl_1L.device
    if cond_BD is not None:
        B = cond_BD.shape[0] // 2
        labels = (torch.full((B,), -1, dtype=torch.long) if labels is None or isinstance(labels, int) else labels)
        return labels.to(device)
    if not (isinstance(labels, int) or labels is None):
        return labels.to(device)
    if batch_size is None:
        raise ValueError("batch_size is required when labels is an int or None")
    B = batch_size
    if labels is None:
        if isinstance(generator, (list, tuple)):
            raise ValueError("labels drawn at random need one generator for the batch, not one per image")
        uniform = torch.full((var.num_classes,), 1.0 / var.num_classes, device=device)
        return torch.multinomial(uniform, num_samples=B, replacement=True, generator=generator).reshape(B)
    return torch.full((B,), var.num_classes if labels < 0 else labels, device=device, dtype=torch.long)


def _check_inputs(var: VAR, vae: VQVAE, labels: torch.Tensor, cond_BD: torch.Tensor | None,
                  teacher_tokens: Sequence[torch.Tensor] | None, force_masks: Sequence[torch.Tensor] | None) -> None:
    if cond_BD is None:
        check_labels(labels, var.num_classes)
    check_pair(var, vae)
    if (teacher_tokens is None) != (force_masks is None):
        raise ValueError("teacher_tokens and force_masks must be given together")
    if teacher_tokens is not None:
        check_token_maps(teacher_tokens, var.patch_nums, var.V)
        if len(force_masks) != len(var.patch_nums):
            raise ValueError(f"got {len(force_masks)} force masks for {len(var.patch_nums)} scales")


def _guided_condition(var: VAR, labels: torch.Tensor, class_weights: torch.Tensor | None,
                      cond_BD: torch.Tensor | None) -> torch.Tensor:
    """The (2B, D) condition embeddings: the conditional half (labels, a class mix or the given ``cond_BD``'s), then
    the unconditional half (the null class)."""
    B = labels.shape[0]
    null = torch.full_like(labels, var.num_classes)
    if cond_BD is not None:
        if cond_BD.ndim != 2 or cond_BD.shape[0] != 2 * B:
            raise ValueError(f"cond_BD must have shape (2B, D) = ({2 * B}, {var.D}), got {tuple(cond_BD.shape)}")
        return cond_BD
    if class_weights is not None:
        uncond = F.one_hot(null, var.num_classes + 1).to(class_weights)
        return var.class_condition(class_weights=torch.cat((class_weights.to(var.lvl_1L.device), uncond), 0))
    return var.class_condition(torch.cat((labels, null), dim=0))


# the tokens an edit keeps: per-scale (B, pn*pn) tokens and per-scale force masks (True = keep the given token)
_Teacher = tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]


def _next_scale_loop(var: VAR, vae: VQVAE, cond_BD: torch.Tensor, B: int, *, cfg: float, top_k: int, top_p: float,
                     more_smooth: bool, temperature: float, generator: Generators, teacher: _Teacher | None,
                     return_raw_logits: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The official ``autoregressive_infer_cfg`` loop over the scales, KV-cached: returns the final f_hat
    (B, Cvae, p, p), the per-scale tokens and, if asked, the raw logits of both CFG halves per scale.
    ``teacher``: None, or the per-scale tokens and force masks to keep."""
    patch_nums, SN = var.patch_nums, len(var.patch_nums)
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    next_token_map = (cond_BD.unsqueeze(1).expand(2 * B, var.first_l, -1)
                      + var.pos_start.expand(2 * B, var.first_l, -1) + lvl_pos[:, :var.first_l])
    f_hat = cond_BD.new_zeros(B, var.Cvae, patch_nums[-1], patch_nums[-1])
    tokens: list[torch.Tensor] = []
    raw: list[torch.Tensor] = []
    cur_L = 0
    var.kv_caching(True)
    try:
        for si, pn in enumerate(patch_nums):
            ratio = si / (SN - 1) if SN > 1 else 1.0
            cur_L += pn * pn
            logits_BlV = var.step(next_token_map, cond_BD)
            if return_raw_logits:
                raw.append(logits_BlV.clone())
            h, idx_Bl = _scale_tokens(var, vae, logits_BlV, B, si, ratio, cfg=cfg, top_k=top_k, top_p=top_p,
                                      more_smooth=more_smooth, temperature=temperature, generator=generator,
                                      teacher=teacher)
            tokens.append(idx_Bl)
            h_BChw = h.transpose_(1, 2).reshape(B, var.Cvae, pn, pn)
            f_hat, next_map = vae.quantize.get_next_autoregressive_input(si, SN, f_hat, h_BChw)
            if si != SN - 1:
                next_map = next_map.view(B, var.Cvae, -1).transpose(1, 2)
                next_token_map = var.word_embed(next_map) + lvl_pos[:, cur_L:cur_L + patch_nums[si + 1] ** 2]
                next_token_map = next_token_map.repeat(2, 1, 1)  # the unconditional half sees the guided map
    finally:
        var.kv_caching(False)
    return f_hat, tokens, raw


def _scale_tokens(var: VAR, vae: VQVAE, logits_BlV: torch.Tensor, B: int, si: int, ratio: float, *, cfg: float,
                  top_k: int, top_p: float, more_smooth: bool, temperature: float, generator: Generators,
                  teacher: _Teacher | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale's tokens from the (2B, l, V) logits of both CFG halves: guided (ramp ``cfg * ratio``), top-k /
    top-p sampled, the given tokens kept where the teacher's force mask says so. Returns their embeddings
    (B, l, Cvae; Gumbel-blended with ``more_smooth``) and indices (B, l)."""
    emb = vae.quantize.embedding
    t = cfg * ratio
    logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
    if temperature != 1.0:
        logits_BlV = logits_BlV / temperature
    idx_Bl = sample_top_k_top_p_(logits_BlV, top_k=top_k, top_p=top_p, generator=generator)
    if not more_smooth:
        h = emb(idx_Bl)
    else:
        gum_t = max(0.27 * (1 - ratio * 0.95), 0.005)
        h = gumbel_softmax(logits_BlV.mul(1 + ratio), tau=gum_t, generator=generator) @ emb.weight.unsqueeze(0)
    if teacher is not None:
        device, pn = var.lvl_1L.device, var.patch_nums[si]
        teacher_tokens, force_masks = teacher
        force = force_masks[si].to(device).view(B if force_masks[si].shape[0] == B else 1, pn * pn)
        gt = teacher_tokens[si].to(device)
        h = torch.where(force.unsqueeze(-1), emb(gt), h)
        idx_Bl = torch.where(force, gt, idx_Bl)
    return h, idx_Bl


MASK_DRAWS = ("per_call", "per_pass")


@contextlib.contextmanager
def mc_dropout(var: VAR, rate: float, batch_size: int, generator: Generators, masks: str = "per_call"
               ) -> Iterator[None]:
    """Keep DropPath active at inference (MC-dropout): block i drops its residual branches with probability
    ``linspace(0, rate, depth)[i]`` (the official per-block schedule). ``masks`` (``uncertainty.droppath_masks``):

    * ``per_call`` -- as the official VAR / VAR-CLIP with DropPath on: a fresh mask on every call of a DropPath
      module, i.e. per branch (attention, FFN), per scale and per row of the CFG-doubled batch (the cond and
      uncond halves draw their own), from ``generator`` (or, given one generator per image, image b's rows from
      its own, as in a batch of one); blocks at rate 0 draw nothing;
    * ``per_pass`` -- one mask per image and block drawn here (per image: from its own generator), held for both
      branches and every scale of the generation, both CFG halves sharing it (one sub-network per pass)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"MC-dropout rate must be in [0, 1), got {rate}")
    if masks not in MASK_DRAWS:
        raise ValueError(f"DropPath masks must be one of {MASK_DRAWS} (uncertainty.droppath_masks), got {masks!r}")
    device = var.lvl_1L.device
    rates = torch.linspace(0, rate, len(var.blocks)).tolist()
    _per_image(generator, batch_size)  # one generator per image: as many as images
    try:
        for b, p in zip(var.blocks, rates):
            keep = 1.0 - p
            if masks == "per_call":
                b.drop_path.set_mc_draw(keep, generator)
                continue
            if _per_image(generator, batch_size):
                m = torch.cat([torch.empty(1, 1, 1, device=device).bernoulli_(keep, generator=g) for g in generator])
            else:
                m = torch.empty(batch_size, 1, 1, device=device).bernoulli_(keep, generator=generator)
            m.div_(keep)
            b.drop_path.set_mc_mask(m.repeat(2, 1, 1))
        yield
    finally:
        for b in var.blocks:
            b.drop_path.set_mc_mask(None)
            b.drop_path.set_mc_draw(None)


__all__ = ["sample", "SampleOutput", "mc_dropout", "MASK_DRAWS", "edit_masks", "box_mask", "top_k_top_p_filter_", "sample_top_k_top_p_"]


# ------------------------------------------------------------------------------------- sampling stage
def class_major_labels(num_classes: int, n_per_class: int) -> torch.Tensor:
    """0,0,..,0,1,1,..: the label of every image of an evaluation sample set."""
    return torch.arange(num_classes).repeat_interleave(n_per_class)


def shard_batches(n_images: int, batch_size: int, shard: int, num_shards: int) -> list[tuple[int, int, int]]:
    """Global batches (index, start, end) that belong to ``shard``. Batches are fixed globally and every batch
    has its own seed, so the merged set does not depend on the number of shards."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    n_batches = -(-n_images // batch_size)
    return [(b, b * batch_size, min(n_images, (b + 1) * batch_size)) for b in range(n_batches) if b % num_shards == shard]


@contextlib.contextmanager
def sampling_precision(device: torch.device | str, precision: str = "auto"):
    """The numerics of a sampling call, the same for the pipeline (:func:`sample_shard`, config ``sample.precision``)
    and the benchmark (:func:`varup.bench.suite.sample_benchmark`): ``precision``'s autocast (``auto``: bf16 on CUDA,
    fp32 elsewhere, so CPU results do not change) with TF32 matrix products on CUDA."""
    dev = torch.device(device)
    with tf32_matmuls(dev), autocast(dev, autocast_dtype(precision, dev)):
        yield


def sample_shard(var: VAR, vae: VQVAE, *, n_per_class: int, batch_size: int, seed: int, shard: int = 0,
                 num_shards: int = 1, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
                 device: torch.device | str = "cpu", desc: str = "sample", precision: str = "auto",
                 temperature: float = 1.0) -> dict:
    """Generate this shard's part of the class-major evaluation set, under :func:`sampling_precision`; returns
    numpy arrays (images uint8 NHWC, labels, tokens (N, L), batch seeds)."""
    import numpy as np

    from varup.base.utils import progress
    from varup.data.folder import to_uint8
    from varup.tokenizer.tokens import token_dtype

    labels_all = class_major_labels(var.num_classes, n_per_class)
    batches = shard_batches(len(labels_all), batch_size, shard, num_shards)
    top_k = min(top_k, var.V)
    images, labels, tokens, seeds = [], [], [], []
    bar = progress(total=sum(e - s for _, s, e in batches), desc=desc, unit="img")
    for b, s, e in batches:
        bseed = derive_seed(seed, "sample", b)
        with sampling_precision(device, precision):
            out = sample(var, vae, labels_all[s:e].to(device), cfg=cfg, top_k=top_k, top_p=top_p,
                         more_smooth=more_smooth, temperature=temperature, generator=make_generator(bseed, device))
        images.append(to_uint8(out.images.float().cpu()))
        labels.append(out.labels.cpu().numpy())
        tokens.append(torch.cat(out.tokens, 1).cpu().numpy().astype(token_dtype(var.V)))
        seeds.append(bseed)
        bar.update(e - s)
    bar.close()
    R = vae.resolution
    L = var.L
    return {
        "images": np.concatenate(images) if images else np.zeros((0, R, R, 3), np.uint8),
        "labels": np.concatenate(labels) if labels else np.zeros((0,), np.int64),
        "tokens": np.concatenate(tokens) if tokens else np.zeros((0, L), token_dtype(var.V)),
        "batch_seeds": np.array(seeds, dtype=np.int64),
        "batch_index": np.array([b for b, _, _ in batches], dtype=np.int64),
        "batch_sizes": np.array([e - s for _, s, e in batches], dtype=np.int64),
    }


def merge_shards(paths: Sequence[str]) -> dict:
    """Concatenate shard files in global batch order, so the merged set is independent of the shard count."""
    import numpy as np

    pieces = []  # (global batch index, arrays of that batch)
    for p in paths:
        with np.load(p) as z:
            start = 0
            for b, n in zip(z["batch_index"], z["batch_sizes"]):
                pieces.append((int(b), {k: z[k][start:start + n] for k in ("images", "labels", "tokens")}))
                start += int(n)
    pieces.sort(key=lambda t: t[0])
    idx = [b for b, _ in pieces]
    if len(set(idx)) != len(idx):
        raise ValueError(f"sample shards overlap (duplicate batches among {list(paths)})")
    return {k: np.concatenate([a[k] for _, a in pieces]) for k in ("images", "labels", "tokens")}
