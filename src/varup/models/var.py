"""VAR transformer (next-scale prediction), state-dict compatible with FoundationVision/VAR ``var_d16..d30.pth``.

Same keys, shapes and persistent buffers (``lvl_1L``, ``attn_bias_for_masking``, ``*.attn.zero_k_bias``) and the
same numerics as the official ``VAR``: AdaLN chunk order [gamma1, gamma2, scale1, scale2, shift1, shift2],
l2-normalised attention with a learned, clamped log-scale, block-causal mask, DropPath, and class dropout for CFG.

Differences from the official code, none of which changes a result:
* class dropout is applied in training mode only (the official ``forward`` also drops 10% of labels in eval mode,
  so its validation loss is measured with dropped labels);
* the VQVAE is not held inside the model: the trainer and the sampler pass it in;
* the KV cache is preallocated once per sampling call instead of concatenated at every scale;
* DropPath can be switched on at inference with seeded generators (MC-dropout, :mod:`varup.studies.uncertainty`),
  drawing a fresh mask per call as the official code does in training mode, or one mask held for a whole pass;
* ``VAR.activation_checkpointing = True`` recomputes each block in the backward (``torch.utils.checkpoint``,
  non-reentrant, RNG state replayed, so DropPath and dropout draw the same masks): equal gradients, less memory
  (:mod:`varup.training.memplan`).

Attention (``VAR.attn_impl``; every path equals the official one within float rounding):
* ``sdpa_dense`` — the official path: SDPA with the additive (1, 1, L, L) block-causal mask. The default
  (``auto``) on CPU and every non-CUDA device, so CPU numerics stay those of the official code.
* ``sdpa_prefix`` — the default on CUDA. Token i of scale k sees exactly the tokens of scales <= k, a prefix of
  the sequence, so the queries of one scale attend to that prefix with **no mask** (a flash kernel can run). The
  leading small scales (at most ``attn_group_tokens`` tokens in all, 128 by default) share one call with a
  small boolean mask; each later scale is one mask-free call.
* ``flex`` — FlexAttention (torch >= 2.5) with a block mask built once per device; opt-in, for CUDA under
  ``torch.compile`` (it is compiled on first CUDA use). Where torch has no FlexAttention it falls back to
  ``sdpa_prefix``; with attention dropout, or on CPU with gradients (no CPU backward), the same.
KV-cached sampling (:meth:`VAR.step`) needs no mask on any path: each scale attends to all cached tokens and
itself. q and k are cast to the compute dtype (v's: bf16/fp16 under autocast) after the l2 normalisation, so the
KV cache is held in that dtype; in float32 the cast does nothing.
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from varup.base.checkpoint import CheckpointError, extract_state_dict, load_strict, read_checkpoint
from varup.models.common import autocast_off, check_labels, compute_dtype


@dataclass
class VARConfig:
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae, the code embedding width of the VQVAE
    num_classes: int = 1000
    depth: int = 16
    embed_dim: int | None = None  # default 64 * depth (official)
    num_heads: int | None = None  # default depth (official, head dim 64)
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float | None = None  # default 0.1 * depth / 24 (official)
    norm_eps: float = 1e-6
    shared_aln: bool = False
    cond_drop_rate: float = 0.1
    attn_l2_norm: bool = True
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    text_dim: int = 0  # > 0: text-conditioned (VAR-CLIP layout, varup.models.textvar.TextVAR), E of the embedding

    def __post_init__(self) -> None:
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if self.embed_dim is None:
            self.embed_dim = 64 * self.depth
        if self.num_heads is None:
            self.num_heads = self.depth
        if self.drop_path_rate is None:
            self.drop_path_rate = 0.1 * self.depth / 24
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.depth < 1 or self.num_classes < 1:
            raise ValueError(f"depth and num_classes must be >= 1, got {self.depth}, {self.num_classes}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        return d


# --------------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Per-sample stochastic depth (scaled by 1/keep). Active in training, or at inference in MC-dropout mode
    (:func:`varup.sampling.sampler.mc_dropout`), which installs one of two mask draws:

    * :meth:`set_mc_draw` (``per_call``, as the official VAR / VAR-CLIP draw it with DropPath on): a fresh Bernoulli
      mask on EVERY call -- so separately for the attention and the FFN branch of a block, for every scale, and for
      every row of the CFG-doubled (2B) batch -- from a seeded generator (or one per image: row b and row B + b
      draw from generator b);
    * :meth:`set_mc_mask` (``per_pass``): one given mask, held for both branches, every scale and both CFG halves
      (one sampled sub-network per pass)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.mc_mask: torch.Tensor | None = None
        self.mc_draw: tuple[float, Any] | None = None  # (keep probability, generator or one generator per image)

    def set_mc_mask(self, mask: torch.Tensor | None) -> None:
        self.mc_mask = mask

    def set_mc_draw(self, keep: float | None, generator=None) -> None:
        """Draw a fresh mask with keep probability ``keep`` on every call (None: stop)."""
        self.mc_draw = None if keep is None else (float(keep), generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mc_mask is not None:
            return x * self.mc_mask.to(x.dtype)
        if self.mc_draw is not None:
            keep, gen = self.mc_draw
            if keep >= 1.0:  # the official model has no DropPath on such a block (nn.Identity)
                return x
            return x * call_mask(x.shape[0], keep, gen, x.device).to(x.dtype)
        if not self.training or self.drop_prob <= 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"


def call_mask(rows: int, keep: float, generator, device) -> torch.Tensor:
    """A (rows, 1, 1) float32 DropPath mask, 0 or 1/keep. ``generator``: one for all rows, or a list of one per image
    of a CFG-doubled batch (rows = 2 x images): image b's generator draws rows b and images + b, the cond and the
    uncond row, as a batch of one would draw its two rows."""
    if not isinstance(generator, (list, tuple)):
        return torch.empty(rows, 1, 1, device=device).bernoulli_(keep, generator=generator).div_(keep)
    n = len(generator)
    if rows != 2 * n:
        raise ValueError(f"{n} DropPath generators (one per image) for a CFG batch of {rows} rows: need {rows // 2}")
    pairs = torch.cat([torch.empty(1, 2, 1, device=device).bernoulli_(keep, generator=g) for g in generator])
    return pairs.transpose(0, 1).reshape(rows, 1, 1).div_(keep)


class FFN(nn.Module):
    def __init__(self, c: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(c, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, c)
        self.drop = nn.Dropout(drop, inplace=True) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


ATTN_IMPLS = ("auto", "sdpa_dense", "sdpa_prefix", "flex")


@functools.lru_cache(maxsize=None)
def flex_api() -> tuple[Callable, Callable] | None:
    """``(create_block_mask, flex_attention)`` where this torch has FlexAttention (2.5+), else None."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return create_block_mask, flex_attention


@functools.lru_cache(maxsize=None)
def compiled_flex_attention() -> Callable:
    """FlexAttention compiled once per process (uncompiled it runs an unfused, dense reference path)."""
    return torch.compile(flex_api()[1], dynamic=False)


def attention_segments(patch_nums: Sequence[int], group_tokens: int = 128) -> list[tuple[int, int, bool]]:
    """The block-causal attention as calls on prefixes: ``(q_begin, q_end, masked)``, each call's queries
    ``[q_begin, q_end)`` attending to the keys ``[0, q_end)``. The leading scales whose tokens number at most
    ``group_tokens`` in all share the first call (masked when it holds more than one scale); every other scale is one
    mask-free call."""
    sizes = [pn * pn for pn in patch_nums]
    grouped, end = 1, sizes[0]
    while grouped < len(sizes) and end + sizes[grouped] <= group_tokens:
        end += sizes[grouped]
        grouped += 1
    segs = [(0, end, grouped > 1)]
    for n in sizes[grouped:]:
        segs.append((end, end + n, False))
        end += n
    return segs


@dataclass(frozen=True)
class ScalePrefixAttention:
    """The block-causal attention of a teacher-forced forward without the dense L x L mask: one SDPA call per
    segment of :func:`attention_segments` (``mask``: the boolean (q_end - q_begin, q_end) mask, or None), or one
    FlexAttention call with ``block_mask``. Passed to the blocks in place of the additive mask."""

    segments: tuple[tuple[int, int, torch.Tensor | None], ...]
    block_mask: object | None = None

    def uses_flex(self, q: torch.Tensor, dropout_p: float) -> bool:
        """FlexAttention has no dropout and no CPU backward: the SDPA segments serve there."""
        return (self.block_mask is not None and dropout_p == 0.0
                and not (q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, scale: float) -> torch.Tensor:
        if self.uses_flex(q, dropout_p):
            flex = compiled_flex_attention() if q.device.type == "cuda" else flex_api()[1]
            return flex(q, k, v, block_mask=self.block_mask, scale=scale)
        outs = [F.scaled_dot_product_attention(q[:, :, qb:qe], k[:, :, :qe], v[:, :, :qe], attn_mask=mask,
                                               dropout_p=dropout_p, scale=scale)
                for qb, qe, mask in self.segments]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class SelfAttention(nn.Module):
    def __init__(self, block_idx: int, embed_dim: int, num_heads: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_l2_norm: bool = True):
        super().__init__()
        self.block_idx = block_idx
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log(), requires_grad=True)
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))  # persistent, as in the checkpoints
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop, inplace=True) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        # preallocated KV cache (sampling)
        self.caching = False
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None
        self.cache_len = 0

    def kv_caching(self, enable: bool) -> None:
        self.caching = enable
        self.cache_k = self.cache_v = None
        self.cache_len = 0

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | ScalePrefixAttention | None,
                max_len: int | None = None) -> torch.Tensor:
        """``attn_bias``: the additive mask (official), a :class:`ScalePrefixAttention`, or None (no mask: the
        KV-cached step, where the cache holds exactly the tokens a scale may see)."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias=bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # (B, H, L, hd)
        if self.attn_l2_norm:
            # F.normalize returns float32 under autocast: back to the compute dtype (v's) so that SDPA gets one
            # dtype (a flash kernel can run) and the KV cache is not float32; a no-op in float32
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul).to(v.dtype)
            k = F.normalize(k, dim=-1).to(v.dtype)
        if self.caching:
            if self.cache_k is None:
                n = max_len or L
                self.cache_k = k.new_empty(B, self.num_heads, n, self.head_dim)
                self.cache_v = v.new_empty(B, self.num_heads, n, self.head_dim)
            end = self.cache_len + L
            self.cache_k[:, :, self.cache_len:end] = k
            self.cache_v[:, :, self.cache_len:end] = v
            self.cache_len = end
            k, v = self.cache_k[:, :, :end], self.cache_v[:, :, :end]
        dropout_p = self.attn_drop if self.training else 0.0
        if isinstance(attn_bias, ScalePrefixAttention):
            out = attn_bias.attend(q, k, v, dropout_p, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, block_idx: int, embed_dim: int, cond_dim: int, shared_aln: bool, num_heads: int,
                 mlp_ratio: float, drop: float, attn_drop: float, drop_path: float, norm_eps: float,
                 attn_l2_norm: bool):
        super().__init__()
        self.block_idx, self.C = block_idx, embed_dim
        self.drop_path = DropPath(drop_path)
        self.attn = SelfAttention(block_idx, embed_dim, num_heads, attn_drop, drop, attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio), drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: torch.Tensor | None,
                max_len: int | None = None) -> torch.Tensor:
        if self.shared_aln:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        else:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        h = self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1)
        x = x + self.drop_path(self.attn(h, attn_bias=attn_bias, max_len=max_len).mul_(gamma1))
        h = self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)
        x = x + self.drop_path(self.ffn(h).mul(gamma2))
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, norm_eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


# --------------------------------------------------------------------------------------------------
def scale_index(patch_nums: Sequence[int]) -> torch.Tensor:
    """(L,) int64: the scale of each token in the flattened multi-scale sequence."""
    return torch.cat([torch.full((pn * pn,), i, dtype=torch.long) for i, pn in enumerate(patch_nums)])


def block_causal_bias(patch_nums: Sequence[int]) -> torch.Tensor:
    """(1, 1, L, L) additive mask: token i sees token j iff scale(j) <= scale(i)."""
    d = scale_index(patch_nums).view(1, -1, 1)
    dT = d.transpose(1, 2)
    return torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, d.shape[1], d.shape[1])


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or VARConfig(**overrides)
        self.cfg = cfg
        self.Cvae, self.V = cfg.z_channels, cfg.vocab_size
        self.depth, self.C, self.D = cfg.depth, cfg.embed_dim, cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.num_classes = cfg.num_classes
        self.cond_drop_rate = cfg.cond_drop_rate
        self.patch_nums = tuple(cfg.patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.num_stages_minus_1 = len(self.patch_nums) - 1

        init_std = math.sqrt(1 / self.C / 3)
        # 1. input (word) embedding
        self.word_embed = nn.Linear(self.Cvae, self.C)
        # 2. class embedding; index num_classes is the null class (CFG / class dropout)
        self.class_emb = nn.Embedding(self.num_classes + 1, self.C)
        nn.init.trunc_normal_(self.class_emb.weight.data, mean=0, std=init_std)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        nn.init.trunc_normal_(self.pos_start.data, mean=0, std=init_std)
        # 3. absolute position embedding (one block per scale) and level embedding
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        nn.init.trunc_normal_(self.pos_1LC.data, mean=0, std=init_std)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        nn.init.trunc_normal_(self.lvl_embed.weight.data, mean=0, std=init_std)
        # 4. backbone
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(self.D, 6 * self.C))
                               if cfg.shared_aln else nn.Identity())
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # official per-block rates
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(i, self.C, self.D, cfg.shared_aln, self.num_heads, cfg.mlp_ratio, cfg.drop_rate,
                          cfg.attn_drop_rate, dpr[i], cfg.norm_eps, cfg.attn_l2_norm)
            for i in range(cfg.depth)
        ])
        # 5. persistent buffers (they are in the official checkpoints)
        self.register_buffer("lvl_1L", scale_index(self.patch_nums).view(1, self.L).contiguous())
        self.register_buffer("attn_bias_for_masking", block_causal_bias(self.patch_nums).contiguous())
        # 6. head
        self.head_nm = AdaLNBeforeHead(self.C, self.D, cfg.norm_eps)
        self.head = nn.Linear(self.C, self.V)
        # 7. attention path of the teacher-forced forward (module docstring); not part of the state dict
        self.attn_impl = "auto"
        self.attn_group_tokens = 128
        self.flex_block_masks: dict[str, object] = {}
        # activation checkpointing of the training forward (train.activation_checkpointing): each block keeps only
        # its input and is recomputed in the backward; equal gradients, about depth x 20 fewer B·L·C tensors kept
        self.activation_checkpointing = False

    @property
    def attn_impl(self) -> str:
        """How the teacher-forced forward attends: one of :data:`ATTN_IMPLS` (module docstring)."""
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        if impl not in ATTN_IMPLS:
            raise ValueError(f"VAR.attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        self._attn_impl = impl

    def resolved_attn_impl(self, device: torch.device | str) -> str:
        """The path :attr:`attn_impl` takes on ``device``: ``auto`` is ``sdpa_prefix`` on CUDA and ``sdpa_dense``
        (the official numerics) elsewhere; ``flex`` is ``sdpa_prefix`` where this torch has no FlexAttention."""
        impl, dev = self.attn_impl, torch.device(device)
        if impl == "auto":
            return "sdpa_prefix" if dev.type == "cuda" else "sdpa_dense"
        if impl == "flex" and flex_api() is None:
            return "sdpa_prefix"
        return impl

    def attention_plan(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | ScalePrefixAttention:
        """What the blocks of a teacher-forced forward attend with: the additive mask in ``dtype``
        (``sdpa_dense``) or a :class:`ScalePrefixAttention`. Built from shapes and buffers only (no host sync)."""
        impl = self.resolved_attn_impl(device)
        if impl == "sdpa_dense":
            return self.attn_bias_for_masking.to(dtype)
        lvl = self.lvl_1L[0]
        segments = tuple((qb, qe, (lvl[qb:qe, None] >= lvl[None, :qe]) if masked else None)
                         for qb, qe, masked in attention_segments(self.patch_nums, self.attn_group_tokens))
        return ScalePrefixAttention(segments, self.flex_block_mask(device) if impl == "flex" else None)

    def flex_block_mask(self, device: torch.device):
        """FlexAttention's block mask of the block-causal attention on ``device``, built once and kept."""
        key = str(device)
        if key not in self.flex_block_masks:
            create_block_mask = flex_api()[0]
            lvl = self.lvl_1L[0].to(device)

            def same_or_earlier_scale(b, h, q_idx, kv_idx):
                return lvl[q_idx] >= lvl[kv_idx]

            self.flex_block_masks[key] = create_block_mask(same_or_earlier_scale, None, None, self.L, self.L,
                                                           device=device)
        return self.flex_block_masks[key]

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0) -> "VAR":
        """The official initialisation (``build_vae_var`` passes aln=0.5, alng, hd=0.02, ini=-1)."""
        if init_std < 0:
            init_std = math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if m.padding_idx is not None:
                    m.weight.data[m.padding_idx].zero_()
        if init_head >= 0:
            self.head.weight.data.mul_(init_head)
            self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        depth = len(self.blocks)
        for b in self.blocks:
            b.attn.proj.weight.data.div_(math.sqrt(2 * depth))
            b.ffn.fc2.weight.data.div_(math.sqrt(2 * depth))
            if hasattr(b, "ada_lin"):
                b.ada_lin[-1].weight.data[2 * self.C:].mul_(init_adaln)
                b.ada_lin[-1].weight.data[: 2 * self.C].mul_(init_adaln_gamma)
                b.ada_lin[-1].bias.data.zero_()
            elif hasattr(b, "ada_gss"):
                b.ada_gss.data[:, :, 2:].mul_(init_adaln)
                b.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)
        return self

    # ------------------------------------------------------------------------------------------
    def class_condition(self, label_B: torch.Tensor | None = None, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Class embedding (B, D). ``class_weights`` (B, num_classes+1) mixes embeddings (class entanglement)."""
        if class_weights is not None:
            if class_weights.ndim != 2 or class_weights.shape[1] != self.num_classes + 1:
                raise ValueError(f"class_weights must have shape (B, {self.num_classes + 1}), got {tuple(class_weights.shape)}")
            return class_weights.to(self.class_emb.weight.dtype) @ self.class_emb.weight
        check_labels(label_B, self.num_classes, sync_free=True)
        return self.class_emb(label_B)

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, L, V).

        ``x_BLCv_wo_first_l`` is ``vqvae.idxBl_to_var_input(gt)`` (B, L-1, Cvae). Labels are replaced by the null
        class with probability ``cond_drop_rate`` in training mode only (see the module docstring). Their range is
        checked here for CPU tensors outside torch.compile only (no host sync in a training step on a GPU:
        :func:`varup.models.common.check_labels`).
        """
        B = self.check_teacher_input(x_BLCv_wo_first_l)
        with autocast_off(x_BLCv_wo_first_l.device.type):
            if class_weights is None:
                check_labels(label_B, self.num_classes, sync_free=True)
                if self.training and self.cond_drop_rate > 0:
                    drop = torch.rand(B, device=label_B.device) < self.cond_drop_rate
                    label_B = torch.where(drop, self.num_classes, label_B)
            cond_BD = self.class_condition(label_B, class_weights)
        return self.forward_cond(cond_BD, x_BLCv_wo_first_l)

    def check_teacher_input(self, x_BLCv_wo_first_l: torch.Tensor) -> int:
        """The batch size of a valid teacher-forcing input (B, L-1, Cvae); a clear error otherwise."""
        if x_BLCv_wo_first_l.ndim != 3 or x_BLCv_wo_first_l.shape[1:] != (self.L - self.first_l, self.Cvae):
            raise ValueError(f"teacher-forcing input must have shape (B, {self.L - self.first_l}, {self.Cvae}), "
                             f"got {tuple(x_BLCv_wo_first_l.shape)}")
        return x_BLCv_wo_first_l.shape[0]

    def forward_cond(self, cond_BD: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits from a condition embedding (B, D): the start token and the AdaLN input."""
        B = self.check_teacher_input(x_BLCv_wo_first_l)
        with autocast_off(x_BLCv_wo_first_l.device.type):
            sos = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)  # official addition order
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        main_type = compute_dtype(x_BLC)
        x_BLC = x_BLC.to(main_type)
        cond_BD_or_gss = cond_BD_or_gss.to(main_type)
        attn_bias = self.attention_plan(x_BLC.device, main_type)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for b in self.blocks:
            if recompute:  # keep the block input only; the backward re-runs the block (same RNG: DropPath, dropout)
                x_BLC = torch.utils.checkpoint.checkpoint(b, x_BLC, cond_BD_or_gss, attn_bias, use_reentrant=False)
            else:
                x_BLC = b(x_BLC, cond_BD_or_gss, attn_bias=attn_bias)
        return self.get_logits(x_BLC.float(), cond_BD)

    # -- KV-cached stepping (used by varup.sampling.sampler) ----------------------------------------------
    def kv_caching(self, enable: bool) -> None:
        for b in self.blocks:
            b.attn.kv_caching(enable)

    def step(self, x_BlC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Run one scale through the cached blocks; returns logits (B, l, V)."""
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        for b in self.blocks:
            x_BlC = b(x_BlC, cond_BD_or_gss, attn_bias=None, max_len=self.L)
        return self.get_logits(x_BlC, cond_BD)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def infer_var_config(sd: Mapping[str, torch.Tensor], **overrides) -> VARConfig:
    """Architecture from a state dict: depth (blocks), width, classes, vocabulary, patch_nums (from lvl_1L)."""
    try:
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        C = sd["pos_start"].shape[-1]
        num_classes = sd["class_emb.weight"].shape[0] - 1
        V = sd["head.weight"].shape[0]
        Cvae = sd["word_embed.weight"].shape[1]
        lvl = sd["lvl_1L"].view(-1)
        counts = torch.bincount(lvl).tolist()
        patch_nums = tuple(int(round(math.sqrt(c))) for c in counts)
        heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if "blocks.0.attn.scale_mul_1H11" in sd else max(1, C // 64)
        shared_aln = "shared_ada_lin.1.weight" in sd
        fc1 = sd["blocks.0.ffn.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"cannot infer the VAR architecture from this state dict (missing {e})") from e
    kw = dict(vocab_size=V, z_channels=Cvae, num_classes=num_classes, depth=depth, embed_dim=C, num_heads=heads,
              mlp_ratio=fc1 / C, shared_aln=shared_aln, patch_nums=patch_nums,
              attn_l2_norm="blocks.0.attn.scale_mul_1H11" in sd)
    kw.update(overrides)
    return VARConfig(**kw)


def load_official(path: str | os.PathLike, model: VAR | None = None, map_location: str | torch.device = "cpu",
                  **overrides) -> VAR:
    """Load a released ``var_d{D}.pth`` or an official training checkpoint (``ar-ckpt-*.pth``) strictly.

    Without ``model`` the architecture is inferred from the state dict (depth, width, classes, patch_nums).
    Loading uses ``torch.load(weights_only=True)``.
    """
    return load_checkpoint_file(path, model, lambda sd: VAR(infer_var_config(sd, **overrides)), map_location)


def load_checkpoint_file(path: str | os.PathLike, model: nn.Module | None, build, map_location="cpu") -> nn.Module:
    """Read a checkpoint (``weights_only=True``), take its state dict and load it strictly into ``model``, or into
    ``build(state_dict)`` when ``model`` is None (the architecture inferred from the state dict)."""
    path = os.fspath(path)
    sd = extract_state_dict(read_checkpoint(path, map_location), path)
    model = build(sd) if model is None else model
    load_strict(model, sd, path)
    return model


__all__ = ["VAR", "VARConfig", "DropPath", "load_official", "load_checkpoint_file", "load_strict", "extract_state_dict", "infer_var_config",
           "CheckpointError", "scale_index", "block_causal_bias", "ATTN_IMPLS", "ScalePrefixAttention", "attention_segments",
           "flex_api"]
