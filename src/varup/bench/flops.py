"""Model FLOP counts of VAR (training and KV-cached CFG sampling) and of the VQVAE, for throughput and MFU figures.

Conventions (the usual ones for MFU):

* only matrix products count, 2·m·n·k FLOPs each (a multiply and an add); a convolution counts
  2·k_h·k_w·(C_in/groups)·C_out·H_out·W_out per image; biases, normalisation, activations, softmax, the
  sampling filters and the loss are not counted (they are memory-bound and small next to the matmuls);
* forward only; a training step counts ``3 × forward`` (the backward pass computes the gradients of the
  activations and of the weights, one forward's worth each). The exact matmul count of a backward pass is
  2 × forward minus the input gradient of ``word_embed``, whose input (the teacher-forcing features) needs no
  gradient: 2·(L−first_l)·Cvae·C FLOPs per sample, < 0.01 % of a step of any VAR depth;
* attention is counted with the **block-causal** context that the model actually uses: a token of scale k
  attends to the ``cum_k = Σ_{j≤k} pn_j²`` tokens of scales ≤ k, so the two attention products (QKᵀ and
  attn·V) cost ``2 · 2 · pn_k² · cum_k · head_dim · heads`` per sample per block. The training forward runs
  scaled-dot-product attention with a dense additive mask over all L×L pairs, so the hardware executes more
  than that (``attention='dense'``: ``4·L²·C`` per sample per block; 1.61× the block-causal attention FLOPs for
  the official patch_nums, +3.9 % on a d16 forward). MFU figures use the block-causal (useful) count.

Per VAR block and sample, with width C, condition width D = C, L tokens, FFN ratio 4:
qkv ``2·L·C·3C``, proj ``2·L·C·C``, FFN ``2·L·C·4C·2``, AdaLN linear ``2·D·6C`` (once per sample: the
condition is per image, not per token), attention as above. Outside the blocks: ``word_embed``
``2·(L−first_l)·Cvae·C``, head AdaLN ``2·D·2C`` (per sample) and the head ``2·L·C·V``.
"""
from __future__ import annotations

import functools
from typing import Sequence

OFFICIAL_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _dims(depth: int, width: int | None, heads: int | None) -> tuple[int, int]:
    C = int(width or 64 * depth)
    H = int(heads or (depth if width is None else max(1, C // 64)))
    if C % H:
        raise ValueError(f"width {C} is not divisible by {H} heads")
    return C, H


def block_causal_pairs(patch_nums: Sequence[int]) -> int:
    """Number of (query, key) pairs a block-causal attention evaluates: Σ_k pn_k² · Σ_{j≤k} pn_j²."""
    cum, pairs = 0, 0
    for pn in patch_nums:
        cum += pn * pn
        pairs += pn * pn * cum
    return pairs


def var_forward_breakdown(depth: int, batch: int, patch_nums: Sequence[int] = OFFICIAL_PN, vocab: int = 4096,
                          z_channels: int = 32, width: int | None = None, heads: int | None = None,
                          mlp_ratio: float = 4.0, attention: str = "block_causal") -> dict[str, int]:
    """Matmul FLOPs of one teacher-forced VAR forward (``VAR.forward``) over ``batch`` images, by component.

    ``attention``: ``'block_causal'`` (the useful work, default) or ``'dense'`` (what SDPA with an additive
    L×L mask executes). Keys: word_embed, ada_lin, qkv, proj, ffn, attention, head_ada_lin, head, total.
    """
    if attention not in ("block_causal", "dense"):
        raise ValueError(f"attention must be 'block_causal' or 'dense', got {attention!r}")
    C, _ = _dims(depth, width, heads)
    D = C
    hidden = round(C * mlp_ratio)
    pn = tuple(int(p) for p in patch_nums)
    L = sum(p * p for p in pn)
    first_l = pn[0] ** 2
    pairs = block_causal_pairs(pn) if attention == "block_causal" else L * L
    B = int(batch)
    f = {
        "word_embed": 2 * B * (L - first_l) * z_channels * C,
        "ada_lin": depth * 2 * B * D * 6 * C,
        "qkv": depth * 2 * B * L * C * 3 * C,
        "proj": depth * 2 * B * L * C * C,
        "ffn": depth * 2 * B * L * C * hidden * 2,
        "attention": depth * 2 * 2 * B * pairs * C,  # QK^T and attn·V, heads × head_dim = C
        "head_ada_lin": 2 * B * D * 2 * C,
        "head": 2 * B * L * C * int(vocab),
    }
    f["total"] = sum(f.values())
    return f


def var_forward_flops(depth: int, batch: int, patch_nums: Sequence[int] = OFFICIAL_PN, vocab: int = 4096,
                      z_channels: int = 32, width: int | None = None, heads: int | None = None,
                      mlp_ratio: float = 4.0, attention: str = "block_causal") -> int:
    """Matmul FLOPs of one VAR forward over ``batch`` images (see :func:`var_forward_breakdown`)."""
    return var_forward_breakdown(depth, batch, patch_nums, vocab, z_channels, width, heads, mlp_ratio,
                                 attention)["total"]


def var_train_flops(depth: int, batch: int, patch_nums: Sequence[int] = OFFICIAL_PN, vocab: int = 4096,
                    z_channels: int = 32, width: int | None = None, heads: int | None = None,
                    mlp_ratio: float = 4.0, attention: str = "block_causal") -> int:
    """Model FLOPs of one training step (forward + backward) over ``batch`` images: 3 × forward."""
    return 3 * var_forward_flops(depth, batch, patch_nums, vocab, z_channels, width, heads, mlp_ratio, attention)


def var_sampling_breakdown(depth: int, batch: int, patch_nums: Sequence[int] = OFFICIAL_PN, vocab: int = 4096,
                           z_channels: int = 32, width: int | None = None, heads: int | None = None,
                           mlp_ratio: float = 4.0, cfg: bool = True) -> dict[str, int]:
    """Matmul FLOPs of the transformer in one KV-cached sampling call (:func:`varup.sampling.sampler.sample`) of ``batch``
    images, by component.

    With ``cfg`` every scale runs ``R = 2·batch`` rows (conditional and unconditional halves; ``sample`` always
    does, whatever the guidance scale). At scale k the ``pn_k²`` new tokens of each row go through every block
    and attend to the ``cum_k`` cached + current tokens; the AdaLN linears are evaluated once per row per scale
    (``VAR.step`` receives the condition at every scale); ``word_embed`` runs on the ``batch`` guided rows of
    scales ≥ 1 before they are duplicated. Not included: the tokenizer's Phi convolutions and the decoder
    (:func:`quantizer_sampling_flops`, :func:`vqvae_flops`).
    """
    C, _ = _dims(depth, width, heads)
    D = C
    hidden = round(C * mlp_ratio)
    R = (2 if cfg else 1) * int(batch)
    f = dict.fromkeys(("word_embed", "ada_lin", "qkv", "proj", "ffn", "attention", "head_ada_lin", "head"), 0)
    cum = 0
    for si, pn in enumerate(patch_nums):
        n = pn * pn
        cum += n
        if si > 0:
            f["word_embed"] += 2 * int(batch) * n * z_channels * C
        f["ada_lin"] += depth * 2 * R * D * 6 * C
        f["qkv"] += depth * 2 * R * n * C * 3 * C
        f["proj"] += depth * 2 * R * n * C * C
        f["ffn"] += depth * 2 * R * n * C * hidden * 2
        f["attention"] += depth * 2 * 2 * R * n * cum * C
        f["head_ada_lin"] += 2 * R * D * 2 * C
        f["head"] += 2 * R * n * C * int(vocab)
    f["total"] = sum(f.values())
    return f


def var_sampling_flops(depth: int, batch: int, patch_nums: Sequence[int] = OFFICIAL_PN, vocab: int = 4096,
                       cfg: bool = True, z_channels: int = 32, width: int | None = None, heads: int | None = None,
                       mlp_ratio: float = 4.0) -> int:
    """Transformer matmul FLOPs of generating ``batch`` images with KV caching (see :func:`var_sampling_breakdown`)."""
    return var_sampling_breakdown(depth, batch, patch_nums, vocab, z_channels, width, heads, mlp_ratio, cfg)["total"]


def quantizer_sampling_flops(batch: int, patch_nums: Sequence[int] = OFFICIAL_PN, z_channels: int = 32) -> int:
    """The Phi 3×3 convolutions that accumulate f_hat while sampling: one per scale at the last scale's
    resolution, ``batch`` rows (the guided half only)."""
    side = patch_nums[-1]
    return len(patch_nums) * 2 * 9 * z_channels * z_channels * side * side * int(batch)


def teacher_forcing_flops(batch: int, patch_nums: Sequence[int] = OFFICIAL_PN, z_channels: int = 32) -> int:
    """The Phi convolutions of ``idxBl_to_var_input`` (teacher-forcing input from token rows): SN−1 of them."""
    side = patch_nums[-1]
    return (len(patch_nums) - 1) * 2 * 9 * z_channels * z_channels * side * side * int(batch)


# ------------------------------------------------------------------------------------------- VQVAE
def _cfg_key(cfg) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.to_dict().items()))


def _conv(m, out_side: int) -> int:
    kh, kw = m.kernel_size
    return 2 * kh * kw * (m.in_channels // m.groups) * m.out_channels * out_side * out_side


def _resnet(block, side: int) -> int:
    import torch.nn as nn

    f = _conv(block.conv1, side) + _conv(block.conv2, side)
    if isinstance(block.nin_shortcut, nn.Conv2d):
        f += _conv(block.nin_shortcut, side)
    return f


def _attn(block, side: int) -> int:
    import torch.nn as nn

    if not isinstance(block, nn.Module) or not hasattr(block, "qkv"):
        return 0  # nn.Identity (no mid attention)
    hw = side * side
    return _conv(block.qkv, side) + _conv(block.proj_out, side) + 2 * 2 * hw * hw * block.C  # q·kᵀ and v·wᵀ


@functools.lru_cache(maxsize=32)
def _vqvae_per_image(key: tuple, part: str) -> int:
    """Walk the encoder/decoder in forward order, tracking the feature-map side (one image)."""
    from varup.models.vqvae import VQVAE, VQVAEConfig

    cfg = VQVAEConfig(**dict(key))
    vae = VQVAE(cfg)  # read for its layer shapes only (built once per config: lru_cache)
    side = cfg.patch_nums[-1]
    f = 0
    if part == "decode":
        dec = vae.decoder
        f += _conv(vae.post_quant_conv, side) + _conv(dec.conv_in, side)
        f += _resnet(dec.mid.block_1, side) + _attn(dec.mid.attn_1, side) + _resnet(dec.mid.block_2, side)
        for i_level in reversed(range(dec.num_resolutions)):
            level = dec.up[i_level]
            for i_block in range(dec.num_res_blocks + 1):
                f += _resnet(level.block[i_block], side)
                if len(level.attn) > 0:
                    f += _attn(level.attn[i_block], side)
            if i_level != 0:
                side *= 2
                f += _conv(level.upsample.conv, side)
        f += _conv(dec.conv_out, side)
    elif part == "encode":
        enc = vae.encoder
        side = cfg.resolution
        f += _conv(enc.conv_in, side)
        for i_level, level in enumerate(enc.down):
            for i_block in range(enc.num_res_blocks):
                f += _resnet(level.block[i_block], side)
                if len(level.attn) > 0:
                    f += _attn(level.attn[i_block], side)
            if i_level != enc.num_resolutions - 1:
                side = (side + 1 - 3) // 2 + 1  # pad (0, 1, 0, 1), 3×3 stride 2
                f += _conv(level.downsample.conv, side)
        f += _resnet(enc.mid.block_1, side) + _attn(enc.mid.attn_1, side) + _resnet(enc.mid.block_2, side)
        f += _conv(enc.conv_out, side) + _conv(vae.quant_conv, side)
        # the residual quantiser: nearest code (an N×V×Cvae product per scale) and one Phi conv per scale
        for pn in cfg.patch_nums:
            f += 2 * pn * pn * cfg.vocab_size * cfg.z_channels
        f += quantizer_sampling_flops(1, cfg.patch_nums, cfg.z_channels)
    else:
        raise ValueError(f"part must be 'encode' or 'decode', got {part!r}")
    return f


def vqvae_flops(cfg=None, batch: int = 1, part: str = "decode") -> int:
    """Conv + attention FLOPs of the VQVAE for ``batch`` images.

    ``part='decode'``: ``post_quant_conv`` + decoder (what :meth:`VQVAE.fhat_to_img` runs);
    ``part='encode'``: encoder + ``quant_conv`` + the multi-scale quantiser's nearest-code products and Phi
    convolutions (what :meth:`VQVAE.img_to_idxBl` runs). Counted once per config by walking the module tree in
    forward order (layer shapes from the modules, feature-map sides tracked) and scaled linearly with the batch.
    """
    from varup.models.vqvae import VQVAEConfig

    cfg = cfg or VQVAEConfig()
    return _vqvae_per_image(_cfg_key(cfg), part) * int(batch)


def vqvae_decode_flops(cfg=None, batch: int = 1) -> int:
    """Decoder FLOPs for ``batch`` images (official 256 px tokenizer by default)."""
    return vqvae_flops(cfg, batch, "decode")


def vqvae_encode_flops(cfg=None, batch: int = 1) -> int:
    """Encoder + quantiser FLOPs for ``batch`` images (official 256 px tokenizer by default)."""
    return vqvae_flops(cfg, batch, "encode")


__all__ = ["var_forward_flops", "var_forward_breakdown", "var_train_flops", "var_sampling_flops",
           "var_sampling_breakdown", "quantizer_sampling_flops", "teacher_forcing_flops", "vqvae_flops",
           "vqvae_decode_flops", "vqvae_encode_flops", "block_causal_pairs"]
