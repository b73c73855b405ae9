"""The offline toy LM: a word-level tokenizer over the grammar's vocabulary and a small model of the paper's
architecture class (a ``Qwen2Config`` with a few layers, built from the config, no hub), pre-trained from scratch on
the grammar's plain text (:mod:`varup.lm.grammar`): the toy's "zero-shot" base model, and the MAUVE featurizer
(another seed of the same recipe)."""
from __future__ import annotations

import torch

from varup.lm.grammar import EOS, PAD, UNK, vocabulary

#: the toy model's default shape (lm.toy.model); any Qwen2Config key may be given
TOY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": True}


def build_toy_tokenizer(template: str):
    """A ``PreTrainedTokenizerFast`` over the grammar's words (whitespace-split, word level), pad/eos/unk set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(template))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, pad_token=PAD, eos_token=EOS)
    fast.padding_side = "left"
    return fast


def build_toy_model(tokenizer, model_cfg: dict | None = None, seed: int = 0):
    """A freshly initialised ``Qwen2ForCausalLM`` (seeded) of ``TOY_MODEL`` updated by ``model_cfg``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = {**TOY_MODEL, **(model_cfg or {})}
    conf = Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **cfg)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(conf)


__all__ = ["TOY_MODEL", "build_toy_tokenizer", "build_toy_model"]
