"""Text-conditioned VAR in the layout of VAR-CLIP (Zhang et al. 2024, arXiv 2408.01181, daixiangzi/VAR-CLIP).

VAR-CLIP keeps the official VAR and replaces its class embedding by a projection of a caption's text embedding
(CLIP ViT-L/14, L2-normalised, 768-d): the start token and every AdaLN input are ``cond_proj(e)`` instead of
``class_emb(label)``. Its released ``ar-ckpt-last.pth`` holds ``['trainer']['var_wo_ddp']``, a state dict whose keys
are the official ``var_d16.pth`` keys (``word_embed``, ``pos_start``, ``pos_1LC``, ``lvl_embed``, every
``blocks.*``, ``head_nm``, ``head`` and the buffers ``lvl_1L``, ``attn_bias_for_masking``,
``blocks.*.attn.zero_k_bias``) with exactly one difference, the mapping :data:`VARCLIP_KEY_MAP`:

* ``class_emb.weight`` (num_classes+1, C) is gone: no class maps to anything;
* ``cond_proj.weight`` (C, E) and ``cond_proj.bias`` (C,) project the text embedding (E = 768 for ViT-L/14);
* ``noise.weight`` (1, E) is a learned *null caption embedding*, used for caption dropout in training and for the
  unconditional half of classifier-free guidance.

:class:`TextVAR` has this layout, so such a state dict loads strictly (:func:`load_varclip`); the CLIP text tower
is not part of it (VAR-CLIP runs CLIP beside the transformer, frozen; see :mod:`varup.models.textenc`).

Choices (README, "Where the paper is ambiguous"): the unconditional condition is the *empty caption's* embedding
(``text.null_condition: empty_caption``) or VAR-CLIP's learned ``noise`` vector (``learned``, what VAR-CLIP always
guides with); the default ``auto`` is ``learned`` with VAR-CLIP's released weights (``text.released``) and
``empty_caption`` otherwise (:func:`varup.config.textplan.text_settings`). Caption dropout is
Bernoulli(``cond_drop_rate``) per image in training mode only, as our class-conditional VAR (VAR-CLIP drops exactly
floor(0.1 B) captions per batch, also in eval mode).

VAR-CLIP's released checkpoint (``text.released``) is fetched by :func:`fetch_varclip` (resumable, sha256-checked or
pinned on first use, accepted only when it loads strictly) and turned into a varup model file by
:func:`varup.models.checkpoint.released_model_file`.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from varup.base.checkpoint import CheckpointError
from varup.models.var import VAR, VARConfig, infer_var_config, load_checkpoint_file

#: official VAR key -> VAR-CLIP keys (every other key is shared unchanged)
VARCLIP_KEY_MAP = {"class_emb.weight": ("cond_proj.weight", "cond_proj.bias", "noise.weight")}
NULL_CONDITIONS = ("empty_caption", "learned")


class TextVAR(VAR):
    """VAR conditioned on a text embedding (B, E); ``cfg.text_dim`` = E (768 for CLIP ViT-L/14)."""

    def __init__(self, cfg: VARConfig | None = None, **overrides):
        super().__init__(cfg, **overrides)
        if not self.cfg.text_dim:
            raise ValueError("TextVAR needs VARConfig.text_dim > 0 (the text embedding width)")
        del self.class_emb
        E = self.cfg.text_dim
        init_std = (1 / self.C / 3) ** 0.5
        self.noise = nn.Embedding(1, E)
        nn.init.trunc_normal_(self.noise.weight.data, mean=0, std=init_std)
        self.cond_proj = nn.Linear(E, self.C)

    def class_condition(self, label_B=None, class_weights=None) -> torch.Tensor:
        raise TypeError("a text-conditioned VAR has no classes: condition it on a text embedding (text_condition)")

    def check_text(self, emb_BE: torch.Tensor) -> None:
        if emb_BE.ndim != 2 or emb_BE.shape[1] != self.cfg.text_dim:
            raise ValueError(f"text embedding must have shape (B, {self.cfg.text_dim}), got {tuple(emb_BE.shape)}")

    def null_embedding(self, B: int, null_E: torch.Tensor | None = None) -> torch.Tensor:
        """(B, E): the given empty-caption embedding, or the learned ``noise`` vector when ``null_E`` is None."""
        e = self.noise.weight[0] if null_E is None else null_E.reshape(-1).to(self.noise.weight)
        self.check_text(e.view(1, -1))
        return e.view(1, -1).expand(B, -1)

    def text_condition(self, emb_BE: torch.Tensor) -> torch.Tensor:
        """Condition embedding (B, D) of text embeddings (B, E)."""
        self.check_text(emb_BE)
        return self.cond_proj(emb_BE.to(self.cond_proj.weight.dtype))

    def guided_condition(self, emb_BE: torch.Tensor, null_E: torch.Tensor | None = None) -> torch.Tensor:
        """(2B, D) for classifier-free guidance: the captions' conditions, then B unconditional ones."""
        return self.text_condition(torch.cat((emb_BE, self.null_embedding(len(emb_BE), null_E)), 0))

    def forward(self, emb_BE: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                null_E: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, L, V). In training mode each caption is replaced by the null condition with
        probability ``cond_drop_rate`` (``null_E``: the empty caption's embedding; None: the learned one)."""
        B = self.check_teacher_input(x_BLCv_wo_first_l)
        self.check_text(emb_BE)
        with torch.autocast(device_type=x_BLCv_wo_first_l.device.type, enabled=False):
            emb_BE = emb_BE.float()
            if self.training and self.cond_drop_rate > 0:
                drop = torch.rand(B, device=emb_BE.device) < self.cond_drop_rate
                emb_BE = torch.where(drop.unsqueeze(1), self.null_embedding(B, null_E).float(), emb_BE)
            cond_BD = self.text_condition(emb_BE)
        return self.forward_cond(cond_BD, x_BLCv_wo_first_l)


class CaptionedVAR(nn.Module):
    """What the trainer optimises for a text-conditioned run: caption ids -> text embeddings -> :class:`TextVAR`.

    ``encoder`` (a trainable module with ``tokenize``, e.g. the toy encoder) is trained with the generator, or
    ``table`` (U, E) holds a frozen encoder's embeddings of the U captions (CLIP: encoded once). ``empty`` is the
    empty caption's embedding for a frozen encoder. One module, so DDP averages the encoder's gradients too.

    The learned null caption (``var.noise``) is trained only where training uses it, i.e. with
    ``null_condition: learned`` and caption dropout (``cond_drop_rate`` > 0); elsewhere it is frozen
    (``requires_grad`` False): it would get no gradient, which DDP refuses, and AdamW skips a parameter without
    one anyway, so freezing changes no weight. It stays in the state dict (VAR-CLIP's released weights have it)."""

    def __init__(self, var: TextVAR, captions: list[str], *, encoder: nn.Module | None = None,
                 table: torch.Tensor | None = None, empty: torch.Tensor | None = None,
                 null_condition: str = "empty_caption"):
        super().__init__()
        if (encoder is None) == (table is None):
            raise ValueError("give a trainable text encoder or a table of frozen caption embeddings, not both")
        if null_condition not in NULL_CONDITIONS:
            raise ValueError(f"text.null_condition must be one of {NULL_CONDITIONS}, got {null_condition!r}")
        self.var, self.encoder, self.null_condition = var, encoder, null_condition
        self.captions = list(captions)
        var.noise.weight.requires_grad_(self.trains_learned_null)
        if encoder is not None:
            self.register_buffer("caption_ids", encoder.tokenize(self.captions + [""]), persistent=False)
        else:
            rows = torch.cat((table.float(), empty.float().view(1, -1)), 0)
            self.register_buffer("caption_emb", rows, persistent=False)

    @property
    def cfg(self) -> VARConfig:
        return self.var.cfg

    @property
    def trains_learned_null(self) -> bool:
        """Whether a training step uses the learned null caption (``learned``, with caption dropout)."""
        return self.null_condition == "learned" and self.var.cond_drop_rate > 0

    @property
    def depth(self) -> int:
        return self.var.depth

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, cap_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, E) embeddings of caption ids and (E,) of the empty caption."""
        rows = torch.cat((cap_idx, torch.full_like(cap_idx[:1], len(self.captions))))
        emb = self.encoder(self.caption_ids[rows]) if self.encoder is not None else self.caption_emb[rows]
        return emb[:-1], emb[-1]

    def forward(self, cap_idx: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        emb, empty = self.embed(cap_idx)
        return self.var(emb, x_BLCv_wo_first_l, null_E=empty if self.null_condition == "empty_caption" else None)


def build_var(cfg: VARConfig) -> VAR:
    """The class-conditional VAR, or the text-conditioned one when ``cfg.text_dim`` > 0."""
    return TextVAR(cfg) if cfg.text_dim else VAR(cfg)


def infer_varclip_config(sd, **overrides) -> VARConfig:
    """Architecture of a VAR-CLIP state dict (the official inference plus E from ``cond_proj``)."""
    if "cond_proj.weight" not in sd or "noise.weight" not in sd:
        raise CheckpointError("not a VAR-CLIP state dict: it has no cond_proj.weight / noise.weight "
                              "(a class-conditional var_d*.pth loads with varup.models.var.load_official)")
    proxy = dict(sd)
    proxy["class_emb.weight"] = torch.empty(2, 1)  # infer_var_config reads the class count from it
    kw = {"num_classes": 1, "text_dim": int(sd["cond_proj.weight"].shape[1])}
    kw.update(overrides)
    return infer_var_config(proxy, **kw)


def load_varclip(path: str | os.PathLike, model: TextVAR | None = None, map_location: str | torch.device = "cpu",
                 **overrides) -> TextVAR:
    """Load VAR-CLIP's released checkpoint (``['trainer']['var_wo_ddp']``) or a plain VAR-CLIP state dict strictly,
    with ``torch.load(weights_only=True)``. Without ``model`` the architecture is inferred from the state dict."""
    return load_checkpoint_file(path, model, lambda sd: TextVAR(infer_varclip_config(sd, **overrides)), map_location)


def fetch_varclip(url: str, dest: str | os.PathLike, sha256: str | None = None, **kw) -> dict:
    """Fetch VAR-CLIP's released checkpoint into ``dest`` (:func:`varup.base.download.fetch_file`: resumable; a
    pinned ``sha256`` is verified, none is recorded on first use) and accept it only when it loads strictly as a
    VAR-CLIP (an HTML page or another model is deleted, never trusted). Offline, the error says what to do."""
    from varup.base.download import ChecksumError, DownloadError, fetch_file

    try:
        return fetch_file(url, dest, sha256, config_key="text.released.sha256", validate=load_varclip, **kw)
    except ChecksumError:
        raise
    except DownloadError as e:
        raise DownloadError(f"{e}. VAR-CLIP's released checkpoint (text.released.url) could not be fetched: run "
                            f"`snakemake prefetch` where there is internet, or put the file anywhere and set "
                            f"text.released.url to its file:// URL") from e


__all__ = ["TextVAR", "CaptionedVAR", "build_var", "load_varclip", "fetch_varclip", "infer_varclip_config",
           "VARCLIP_KEY_MAP", "NULL_CONDITIONS"]
