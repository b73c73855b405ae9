"""Text encoders behind one interface, for the text-conditioned VAR (:mod:`varup.models.textvar`).

A text encoder has ``dim`` (E) and ``encode(captions) -> (B, E)`` float32, L2-normalised (as VAR-CLIP normalises
CLIP's text embeddings). Two kinds:

* ``clip`` (a cluster): OpenAI CLIP ViT-L/14's text tower through open_clip, frozen
  (:class:`varup.models.clip.ClipTextEncoder`); the trainer encodes the dataset's captions once and looks them up.
* ``toy`` (offline): :class:`ToyTextEncoder`, a small transformer over a word vocabulary, trained from scratch
  jointly with the generator on the toy captions. Its vocabulary is the words of the caption table, so an unknown
  word is an error that names it (nothing is silently dropped). The empty caption "" is the CLS token alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from varup.base.text import words_of

PAD, CLS = 0, 1
class TextEncoder(Protocol):
    dim: int

    def encode(self, captions: Sequence[str]) -> torch.Tensor: ...


def vocabulary(captions: Sequence[str]) -> list[str]:
    """Sorted distinct words of a set of captions."""
    return sorted({w for c in captions for w in words_of(c)})


@dataclass
class ToyTextConfig:
    vocab: list[str] = field(default_factory=list)
    dim: int = 64  # E, the embedding the generator is conditioned on
    width: int = 64
    depth: int = 0  # transformer layers; 0: a bag of position-tagged word embeddings (see ToyTextEncoder)
    heads: int = 4
    max_len: int = 16  # words per caption, CLS included

    def to_dict(self) -> dict:
        return asdict(self)


class ToyTextEncoder(nn.Module):
    """Word (+ position) embeddings, ``depth`` bidirectional transformer layers, a LayerNorm, the mean over the
    caption's tokens (CLS included), a projection to ``dim``, L2-normalised.

    Measured on the toy (1,400 joint steps with a VAR-d2, README): with 2 layers the generator followed the shape
    words but not the colour and size words ("a large red circle": 25 % of samples in its 2 modes, chance level;
    pooling the CLS output alone, 15 %); with ``depth`` 0, a bag of word embeddings, 100 %. Hence the default 0."""

    def __init__(self, cfg: ToyTextConfig):
        super().__init__()
        if not cfg.vocab:
            raise ValueError("ToyTextConfig.vocab is empty: build it from the caption table (vocabulary())")
        self.cfg, self.dim = cfg, cfg.dim
        self.index = {w: i + 2 for i, w in enumerate(cfg.vocab)}
        self.tok_emb = nn.Embedding(len(cfg.vocab) + 2, cfg.width, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_len, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 2 * cfg.width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False) if cfg.depth else None
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.dim)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, max_len) word ids: CLS, the caption's words, PAD."""
        ids = torch.full((len(captions), self.cfg.max_len), PAD, dtype=torch.long)
        for i, c in enumerate(captions):
            words = words_of(c)
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise ValueError(f"caption {c!r}: word(s) {unknown} are not in the toy text encoder's vocabulary "
                                 f"({len(self.index)} words from the caption table)")
            if len(words) + 1 > self.cfg.max_len:
                raise ValueError(f"caption {c!r} has {len(words)} words; the toy text encoder takes at most "
                                 f"{self.cfg.max_len - 1} (text.encoder.max_len)")
            ids[i, 0] = CLS
            ids[i, 1:1 + len(words)] = torch.tensor([self.index[w] for w in words], dtype=torch.long)
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == PAD
        x = self.tok_emb(ids) + self.pos[:, :ids.shape[1]]
        if self.blocks is not None:  # depth 0: a bag of (position-tagged) word embeddings
            x = self.blocks(x, src_key_padding_mask=pad)
        x = self.norm(x)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1)  # mean over CLS and the words (CLS alone: the empty caption)
        return F.normalize(self.proj(pooled), dim=-1)

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        return self(self.tokenize(captions).to(self.pos.device))


def build_toy_encoder(config: dict) -> ToyTextEncoder:
    return ToyTextEncoder(ToyTextConfig(**config))


__all__ = ["TextEncoder", "ToyTextEncoder", "ToyTextConfig", "build_toy_encoder", "vocabulary"]
