"""Memory plan of a VAR training step: the peak GPU memory of one process, by formula, before a job is submitted.

Peak = weights (fp32 masters) + gradients (fp32, kept between steps under DDP) + AdamW's two moments + the
compute-dtype weight copies autocast holds for the backward + the activations of ONE micro-batch:

* per block and per token, the tensors the backward keeps, counted from :class:`varup.models.var.AdaLNSelfAttn`:
  in the compute dtype the block input, the cast LN output, qkv (3), q and k after the l2 norm, the attention
  output (and, on CUDA's scale-prefix path, the concatenation of its segments), the head-merged copy, the gated
  projection, the mid-block residual, the FFN input, the FFN hidden before and after GELU (2 x mlp_ratio) and the
  FFN output: 13 + 2r widths; in float32 the two LayerNorm outputs and the normalised q: 3 widths. In fp32 that is
  24 x 4 bytes per token and channel, the issue's "about 25 tensors of B·L·C". A fused attention kernel keeps only
  its log-sum-exp (B·H·L); the ``math`` path keeps the B·H·L·L probabilities.
* with activation checkpointing a block keeps only its input, and the backward recomputes one block at a time;
* the head: float32 logits (B·L·V, kept by the loss), their gradient, its compute-dtype cast, the loss's chunks;
* a backward working set of one block's gradients.

Calibration (tests/test_memplan.py, README "Memory plan"): on the CPU in fp32 the estimate is compared with the
peak of live tensor bytes of a real step (model, optimizer state and kept gradients included), measured by
:func:`track_live_bytes`. GPU numbers differ by what the formula models explicitly (dtype split, attention path)
and by the allocator's fragmentation and the CUDA context, which :func:`fits` covers with a margin.

A GB here is 10^9 bytes (an "80 GB" H100 holds about 85.9·10^9 bytes, 79.6 GiB of them usable).
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from varup.models.var import VAR, VARConfig

PAPER_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GB = 1e9
MARGIN = 0.10  # share of the GPU's memory kept free: allocator fragmentation, NCCL buffers, the CUDA context
RESERVE_GB = 1.5  # the CUDA context and cuBLAS/NCCL workspaces, outside the allocator's count
LOSS_CHUNK_ELEMS = 1 << 24  # varup.training.losses: rows of this many logits per chunk of the fused objective


@functools.lru_cache(maxsize=None)
def count_params(depth: int, width: int, heads: int, mlp_ratio: float, vocab: int, patch_nums: Sequence[int],
                 z_channels: int = 32, num_classes: int = 1000) -> int:
    """Exact parameter count of the VAR of these sizes (built on the meta device: no memory, no time)."""
    cfg = VARConfig(vocab_size=vocab, z_channels=z_channels, num_classes=num_classes, depth=depth, embed_dim=width,
                    num_heads=heads, mlp_ratio=mlp_ratio, patch_nums=tuple(patch_nums))
    with torch.device("meta"):
        return VAR(cfg).num_params()


def activation_bytes(depth: int, micro: int, *, L: int, width: int, heads: int, mlp_ratio: float, vocab: int,
                     a: int, checkpointing: bool, attention: str = "fused", prefix_concat: bool = True) -> dict:
    """Bytes the forward keeps for the backward of one micro-batch of ``micro`` images, plus the backward's working
    set (``a``: bytes of the compute dtype, 4 in fp32)."""
    T, C = micro * L, width
    n_c = 13 + 2 * mlp_ratio + (1 if prefix_concat else 0)
    block = T * C * (n_c * a + 3 * 4)
    block += micro * heads * L * 4 if attention == "fused" else micro * heads * L * L * (4 + a)
    blocks = depth * T * C * a + block if checkpointing else depth * block
    stem_head = T * C * (4 * 4 + a)  # embedding sums (fp32), the head's AdaLN input/output and its cast
    logits = T * vocab * 4 * 2 + T * vocab * (a if a != 4 else 0) + 2 * 4 * min(T * vocab, LOSS_CHUNK_ELEMS)
    backward = T * C * (2 * mlp_ratio + 4) * a
    return {"blocks": int(blocks), "stem_head": int(stem_head), "logits": int(logits), "backward": int(backward),
            "total": int(blocks + stem_head + logits + backward)}


def plan_step(depth: int, batch_per_gpu: int, *, precision: str = "bf16", micro_batch: int | None = None,
              activation_checkpointing: bool = False, patch_nums: Sequence[int] = PAPER_PATCH_NUMS,
              vocab: int = 4096, width: int | None = None, heads: int | None = None, mlp_ratio: float = 4.0,
              z_channels: int = 32, num_classes: int = 1000, attention: str = "fused", device: str = "cuda") -> dict:
    """Estimated peak memory (bytes) of one training step of one process: ``batch_per_gpu`` images in
    micro-batches of ``micro_batch`` (None: all at once). ``precision`` fp32 | bf16 | fp16 (``auto``: bf16 on
    CUDA, fp32 elsewhere); width/heads default to the official 64·depth and depth; ``device`` cuda (the
    scale-prefix attention, fused AdamW) or cpu (dense mask, foreach AdamW's temporaries)."""
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    if precision not in BYTES:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    width = width or 64 * depth
    heads = heads or depth
    micro = batch_per_gpu if micro_batch is None else min(int(micro_batch), batch_per_gpu)
    a = BYTES[precision]
    P = count_params(depth, width, heads, mlp_ratio, vocab, tuple(patch_nums), z_channels, num_classes)
    L = sum(p * p for p in patch_nums)
    act = activation_bytes(depth, micro, L=L, width=width, heads=heads, mlp_ratio=mlp_ratio, vocab=vocab, a=a,
                           checkpointing=activation_checkpointing, attention=attention,
                           prefix_concat=device == "cuda")
    state = {"weights": 4 * P, "grads": 4 * P, "optimizer": 8 * P, "weight_casts": P * a if a != 4 else 0}
    step_transient = 0 if device == "cuda" else 13 * P  # foreach AdamW's temporaries, measured (fused: none)
    persistent = sum(state.values())
    peak = persistent + max(act["total"] + 4 * P, step_transient)  # + a weight gradient before it is accumulated
    return {"depth": depth, "width": width, "heads": heads, "params": P, "batch_per_gpu": batch_per_gpu,
            "micro_batch": micro, "accum_steps": -(-batch_per_gpu // micro), "precision": precision,
            "activation_checkpointing": bool(activation_checkpointing), **state, "activations": act["total"],
            "activation_parts": act, "peak": int(peak), "peak_gb": peak / GB}


def fits(peak_bytes: float, gpu_mem_gb: float, margin: float = MARGIN, reserve_gb: float = RESERVE_GB) -> bool:
    """Whether a step of this peak fits a GPU of ``gpu_mem_gb``, keeping ``margin`` of it and ``reserve_gb`` free."""
    return peak_bytes <= gpu_mem_gb * GB * (1 - margin) - reserve_gb * GB


def choose_micro_batch(depth: int, batch_per_gpu: int, gpu_mem_gb: float, **kw) -> int | None:
    """The largest micro-batch (a divisor of ``batch_per_gpu``: equal micro-batches) whose step fits, or None when
    not even one image per micro-batch does. ``kw`` as :func:`plan_step`."""
    for m in sorted((d for d in range(1, batch_per_gpu + 1) if batch_per_gpu % d == 0), reverse=True):
        if fits(plan_step(depth, batch_per_gpu, micro_batch=m, **kw)["peak"], gpu_mem_gb):
            return m
    return None


# ------------------------------------------------------------------------------------- measurement
class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the storages that tensors made inside the mode hold alive (a storage is freed when the
    last tensor on it dies); ``peak`` is the most at any moment. Works on any device, the CPU included."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, list[int]] = {}
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0:
                continue
            if key not in self.storages:
                self.storages[key] = [st.nbytes(), 0]
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
            self.storages[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out


@contextlib.contextmanager
def track_live_bytes() -> Iterator[LiveTensorBytes]:
    """Measure the live tensor bytes of what runs inside (saved tensors are kept as the same Python objects, so a
    storage counts until autograd releases it)."""
    with LiveTensorBytes() as mode, torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        yield mode


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors``."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


__all__ = ["plan_step", "fits", "choose_micro_batch", "count_params", "activation_bytes", "track_live_bytes",
           "tensor_bytes", "LiveTensorBytes", "GB", "MARGIN", "RESERVE_GB", "PAPER_PATCH_NUMS"]
