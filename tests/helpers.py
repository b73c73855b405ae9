"""Tiny models shared by the tests (fast on CPU)."""
from __future__ import annotations

import torch

from varup.models.var import VAR, VARConfig
from varup.models.vqvae import VQVAE, VQVAEConfig


def tiny_vqvae(**kw) -> VQVAE:
    cfg = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4),
               share_quant_resi=4, norm_groups=8)
    cfg.update(kw)
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**cfg))


def tiny_var(**kw) -> VAR:
    cfg = dict(vocab_size=64, z_channels=8, num_classes=5, depth=2, embed_dim=32, num_heads=2, patch_nums=(1, 2, 3, 4))
    cfg.update(kw)
    torch.manual_seed(0)
    return VAR(VARConfig(**cfg)).init_weights(init_adaln_gamma=0.5)


def informative_pair() -> tuple[VAR, VQVAE]:
    """A depth-4 tiny VAR in eval mode and a frozen tiny VQVAE whose logits are informative: with the tiny init head
    every token is about equally likely and the (fixed) sampling noise alone picks the tokens, so dropping blocks
    would change nothing (the MC-Dropout tests)."""
    vae = tiny_vqvae().freeze()
    vae.quantize.embedding.weight.data.normal_(0, 0.3)
    var = tiny_var(depth=4).init_weights(init_adaln_gamma=1.0).eval()
    torch.manual_seed(1)
    var.head.weight.data.normal_(0, 0.3)
    return var, vae
