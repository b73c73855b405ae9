"""What one SFT step holds in memory besides the weights and the optimiser: an estimate, by counting the tensors
that the step keeps alive at its peak (:func:`step_activation_bytes`).

The peak of a step of :func:`varup.lm.sft.fit` is reached in the LM head of a micro-batch: the body's activations
saved for the backward are all alive then, with one chunk of the head and the objective. Counted per token and
layer for a Qwen2 decoder layer under autocast (activations in ``dtype``, the residual stream and the norms in the
weights' ``param_dtype``), with PyTorch's SDPA attention (no T × T score matrix kept):

* the two RMSNorms: input and normalised output, 2 × 2 × E in ``param_dtype``;
* the autocast copies of the inputs of q/k/v and gate/up projections, 5 × E, and the inputs of o_proj (E) and
  down_proj (I), in ``dtype``;
* q and k after the rotary embedding, v, and the attention output (E + 2·KV + E), in ``dtype``;
* the MLP's gate, up and SiLU outputs, 3 × I, in ``dtype``.

The head's chunk of c positions: the logits (c × V in ``dtype``), their float32 copy, the loss's saved float32
softmax-sized tensor, the float32 gradient and its cast back to ``dtype``; beside it the head weight's float32
gradient accumulator and its autocast copy (V × E each). Without chunking c is every position of the micro-batch.
This is an estimate (allocator slack, workspace buffers and the weights are not counted).
"""
from __future__ import annotations

BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}

#: Qwen1.5-0.5B (the paper's LM): hidden, intermediate, layers, key/value width, vocabulary
QWEN15_05B = {"hidden": 1024, "intermediate": 2816, "layers": 24, "kv": 1024, "vocab": 151936}


def _bytes(dtype: str) -> int:
    if dtype not in BYTES:
        raise ValueError(f"dtype must be one of {sorted(BYTES)}, got {dtype!r}")
    return BYTES[dtype]


def body_bytes_per_token(hidden: int, intermediate: int, layers: int, kv: int | None = None, dtype: str = "bf16",
                         param_dtype: str = "fp32") -> int:
    """Saved activations of the decoder body per token (all layers and the final norm)."""
    a, r, kv = _bytes(dtype), _bytes(param_dtype), hidden if kv is None else kv
    norms = 2 * 2 * hidden * r
    proj_inputs = (5 * hidden + hidden + intermediate) * a
    attention = (hidden + 2 * kv + hidden) * a
    mlp = 3 * intermediate * a
    return layers * (norms + proj_inputs + attention + mlp) + 2 * hidden * r


def head_chunk_bytes(positions: int, vocab: int, hidden: int, dtype: str = "bf16") -> int:
    """The head and the objective on ``positions`` positions at once, with the head weight's buffers."""
    a = _bytes(dtype)
    per_logit = a + (4 if a != 4 else 0) + 4 + 4 + (a if a != 4 else 0)
    return positions * vocab * per_logit + vocab * hidden * (4 + (a if a != 4 else 0))


def step_activation_bytes(batch: int, micro_batch: int | None, seq_len: int, vocab: int, hidden: int,
                          chunk: int | None, dtype: str = "bf16", *, intermediate: int, layers: int,
                          kv: int | None = None, param_dtype: str = "fp32", world: int = 1) -> dict[str, int]:
    """Peak activation bytes of one step on one process: ``batch`` sequences over ``world`` processes, ``micro_batch``
    of them per forward (None: all of this process's), ``seq_len`` tokens each (every position counted as trained:
    an upper bound), the LM head in chunks of ``chunk`` positions (None: all of a micro-batch). Returns the body's
    saved activations, the head's peak and their sum (``peak``)."""
    if batch % world:
        raise ValueError(f"batch {batch} is not divisible by {world} processes")
    per_rank = batch // world
    m = per_rank if micro_batch is None else min(micro_batch, per_rank)
    tokens = m * seq_len
    body = tokens * body_bytes_per_token(hidden, intermediate, layers, kv, dtype, param_dtype)
    head = head_chunk_bytes(tokens if chunk is None else min(chunk, tokens), vocab, hidden, dtype)
    return {"body": body, "head": head, "peak": body + head}


__all__ = ["step_activation_bytes", "body_bytes_per_token", "head_chunk_bytes", "QWEN15_05B", "BYTES"]
