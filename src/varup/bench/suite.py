"""Benchmarks (figures printed and recorded, never asserted): ``python -m varup.bench.suite {step,ceilings,train,sample,encode,all}``.

Timing protocol, every benchmark: ``warmup`` untimed iterations first (they absorb torch.compile, cuDNN autotuning,
allocator growth and the optimizer's state allocation), then ``repeats`` timed iterations, each closed by
``torch.cuda.synchronize`` on CUDA (plain ``time.perf_counter`` on CPU, where ops are synchronous); every time
figure is the **median** over the repeats. The training variants (CE only, full objective) share one model and
optimizer and are timed interleaved (CE, full, CE, full, ...) so that clock or thermal drift affects both alike.

Subcommands:

* ``ceilings`` — what the device can do: a large square matrix product (bf16 on CUDA, plus fp32 under the
  current TF32 setting; fp32 on CPU) gives the achieved **matmul TFLOP/s**, the denominator of every MFU; a
  device-to-device copy gives **GB/s** counted as bytes read + bytes written.
* ``train`` — one VAR training step (forward, backward, gradient clipping at 2, AdamW) with cross-entropy only
  and with the full uncertainty-preserving objective (λ1 = 0.002, λ2 = 0.01, semantic reference). The fast path
  starts from cached token rows (as :mod:`varup.training.loop`: token rows → teacher-forcing input by the quantiser →
  step); ``--plain`` is **the official recipe** (the official trainer's ``--fp16=1 --tf32=1`` setting): fp16 autocast
  with a GradScaler (initial scale 2^11, growth interval 1000), TF32 matmuls, fused AdamW, no compile, random images
  encoded by a VQVAE inside the step (on CPU: fp32 and no scaler, as fp16 autocast is not what a CPU trains with) (``img_to_idxBl`` → teacher-forcing input → step), so the tokenizer's cost is in the time;
  ``--compare-plain`` runs both and reports plain/fast. ``--compile`` wraps the model in ``torch.compile``. ``varup gpu-check`` (:mod:`varup.bench.gpucheck`) is
  the one-call GPU acceptance run built on these benchmarks.
* ``sample`` — one :func:`varup.sampling.sampler.sample` call (CFG 1.5, top-k 900, top-p 0.95, the paper's settings; the
  batch is doubled for CFG inside) including the VQVAE decode of the images.
* ``encode`` — :meth:`VQVAE.img_to_idxBl` on random images (what building the token cache costs).
* ``all`` — everything above in one process; prints a short table last; ``--json`` writes every record,
  ``--markdown BENCHMARKS.md`` adds or updates rows of the repository's benchmark table.
* ``step`` — the original CE-vs-full training step benchmark (the fast ``train`` path with its old defaults).

Figures:

* ``*_s`` — median seconds per iteration (a training step, a sampling call, an encoding call).
* ``imgs_per_s`` — batch / median time; ``tokens_per_s`` — batch·L / median time (L = Σ pn², 680 officially).
* ``model_tflop_*`` — matmul FLOPs of the iteration from :mod:`varup.bench.flops` (training: 3 × forward, attention with
  the block-causal context); ``tflops_*`` = those FLOPs / median time; ``mfu_*`` = tflops / peak, where the peak is
  the measured matmul ceiling in the iteration's compute dtype (``--peak-tflops`` overrides it, e.g. with the
  vendor's dense bf16 figure). In ``--plain`` mode the FLOPs are the transformer's only, so the tokenizer's cost
  shows as a lower MFU; the sampling FLOPs include the Phi convolutions and the decoder.
* ``*_peak_mem_gb`` — CUDA: ``torch.cuda.max_memory_allocated`` over one iteration (GiB); CPU: the process's
  peak resident set size (VmHWM, reset before the iteration where the kernel allows it; otherwise the peak since
  the process started), in GiB.

Small defaults on CPU (depth 2, batch 4, the official patch_nums and V = 4096, a small VQVAE, 3 repeats) so that
``python -m varup.bench.suite all`` takes about a minute on 2 cores; on CUDA the defaults are the paper's sizes (d16,
training batch 64, sampling batch 256, bf16 autocast, the official 108M-parameter VQVAE), and the targets of the
issue are printed beside the measurements (:data:`TARGETS`).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from varup.base.runtime import autocast, autocast_dtype, resolve_device, tf32_matmuls
from varup.bench.flops import (
    quantizer_sampling_flops,
    teacher_forcing_flops,
    var_sampling_flops,
    var_train_flops,
    vqvae_decode_flops,
    vqvae_encode_flops,
)
from varup.models.var import VAR, VARConfig
from varup.models.vqvae import VQVAE, MultiScaleQuantizer, VQVAEConfig, split_tokens
from varup.training.losses import LossConfig, UncertaintyLoss

OFFICIAL_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
OFFICIAL_PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # the official 512 px model

#: the issue's performance targets (one GPU); printed beside the measured values on CUDA, never asserted
TARGETS = {
    "train_depth": 16, "train_batch": 64, "train_mfu": 0.45,  # d16, batch 64 per GPU, >= 45 % MFU
    "full_vs_ce": 1.05,  # full objective step within 5 % of CE only
    "sample_depth": 16, "sample_batch": 256, "sample_imgs_per_s": 400.0,  # d16, CFG, batch >= 256, >= 400 img/s
}

MARKDOWN_COMMAND = "python -m varup.bench.suite all --markdown BENCHMARKS.md"
KEY_COLUMNS = ("Benchmark", "Mode", "Device", "Torch", "Depth", "Batch", "Precision")
COLUMNS = KEY_COLUMNS + ("Date (UTC)", "Time (s)", "Throughput", "TFLOP/s", "MFU", "Peak mem (GiB)", "Target",
                         "Notes")


# ----------------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls, device-synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                     repeats: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Time several variants round-robin. Returns (seconds per variant, peak memory GiB per variant); the
    memory peak is taken over each variant's last warm-up call (so ``warmup`` >= 1 costs no extra call)."""
    mem: dict[str, float] = {}
    for name, fn in fns.items():
        for i in range(max(warmup, 1)):
            if i == max(warmup, 1) - 1:
                sync(device)
                reset_peak_memory(device)
            fn()
            sync(device)
        mem[name] = peak_memory_gb(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times, mem


def reset_peak_memory(device: torch.device) -> None:
    """CUDA: reset the allocator's peak; CPU (Linux): reset the process's peak RSS (``/proc/self/clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: ``max_memory_allocated`` in GiB; CPU: peak resident set size of the process in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine() or "cpu"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return f"CPU {name} ({torch.get_num_threads()} threads)"


def env_info(device: torch.device) -> dict:
    """Where the figures come from: device, its name, torch/CUDA versions, the date (UTC)."""
    return {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None, "threads": torch.get_num_threads(),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _defaults(device: torch.device, **kw) -> dict:
    """Fill the ``None`` options with the CPU (small) or CUDA (paper-size) defaults."""
    cuda = device.type == "cuda"
    d = {"depth": 16 if cuda else 2, "batch": 64 if cuda else 4, "sample_batch": 256 if cuda else 4,
         "encode_batch": 64 if cuda else 4, "warmup": 3 if cuda else 1, "repeats": 10 if cuda else 3}
    return {k: (d[k] if v is None else v) for k, v in kw.items()}


def small_vqvae_config(vocab: int = 4096, z_channels: int = 32, patch_nums: Sequence[int] = OFFICIAL_PN) -> VQVAEConfig:
    """A small tokenizer for CPU runs: the official quantiser (V, Cvae, patch_nums) around a 2-level, 32/64-channel
    encoder/decoder (downsampling 2, so 32 px images for the official patch_nums)."""
    return VQVAEConfig(vocab_size=vocab, z_channels=z_channels, ch=32, ch_mult=(1, 2), norm_groups=32,
                       patch_nums=tuple(patch_nums))


def vqvae_config(kind: str, device: torch.device, vocab: int, z_channels: int, patch_nums: Sequence[int]) -> VQVAEConfig:
    """``official`` (ch 160, 5 levels, 256 px for the official patch_nums), ``small``, or ``auto`` (official on
    CUDA, small on CPU)."""
    if kind == "auto":
        kind = "official" if device.type == "cuda" else "small"
    if kind == "official":
        return VQVAEConfig(vocab_size=vocab, z_channels=z_channels, patch_nums=tuple(patch_nums))
    if kind == "small":
        return small_vqvae_config(vocab, z_channels, patch_nums)
    raise ValueError(f"--vae must be official, small or auto, got {kind!r}")


def _vae_kind(kind: str, device: torch.device) -> str:
    return ("official" if device.type == "cuda" else "small") if kind == "auto" else kind


def _build_var(depth: int, width: int | None, vocab: int, z_channels: int, num_classes: int,
               patch_nums: Sequence[int]) -> VAR:
    C = width or 64 * depth
    return VAR(VARConfig(vocab_size=vocab, z_channels=z_channels, num_classes=num_classes, depth=depth, embed_dim=C,
                         num_heads=depth if width is None else max(1, C // 64), patch_nums=tuple(patch_nums)))


def _dtype_name(amp: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]


def benchmark_references(vocab: int, num_clusters: int = 64, seed: int = 0) -> dict:
    """Stand-in loss references with the real shapes ((V,) semantic s*, V codes in ``num_clusters`` clusters).
    The objective's cost does not depend on their values, and the real ones (k-means of the codebook, a V×V
    distance pass) take seconds to build."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, min(num_clusters, vocab))
    return {"semantic_s_star": torch.rand(vocab, generator=g),
            "clusters": torch.randperm(vocab, generator=g) % k}


# ---------------------------------------------------------------------------------------- ceilings
def ceilings_benchmark(device: str | torch.device = "auto", *, matmul_size: int | None = None,
                       copy_mib: int | None = None, dtypes: Sequence[str] | None = None, warmup: int | None = None,
                       repeats: int | None = None) -> dict:
    """Achieved matmul TFLOP/s (n×n @ n×n, 2n³ FLOPs, per dtype) and copy bandwidth (GB/s, read + write)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    cuda = dev.type == "cuda"
    o = _defaults(dev, warmup=warmup, repeats=repeats)
    n = matmul_size or (8192 if cuda else 2048)
    dtypes = tuple(dtypes or (("bf16", "fp32") if cuda else ("fp32",)))
    inner = 10 if cuda else 1  # several products per timed iteration: launch overhead out of the figure
    out: dict = {"benchmark": "ceilings", **env_info(dev), "matmul_n": n, "matmul_tflops": {},
                 "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None}
    for name in dtypes:
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
        a = torch.randn(n, n, device=dev, dtype=dt)
        b = torch.randn(n, n, device=dev, dtype=dt)
        c = torch.empty(n, n, device=dev, dtype=dt)

        def mm(a=a, b=b, c=c) -> None:
            for _ in range(inner):
                torch.mm(a, b, out=c)

        t = statistics.median(timeit(mm, dev, o["warmup"], o["repeats"]))
        out["matmul_tflops"][name] = 2 * n**3 * inner / t / 1e12
        del a, b, c
    nbytes = (copy_mib or (1024 if cuda else 128)) * 2**20
    src = torch.ones(nbytes // 4, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = statistics.median(timeit(lambda: dst.copy_(src), dev, o["warmup"], o["repeats"]))
    out.update(copy_mib=nbytes // 2**20, copy_gbps=2 * nbytes / t / 1e9)
    del src, dst
    _release(dev)
    return out


def peak_tflops(ceilings: dict | None, amp: torch.dtype | None, override: float | None) -> tuple[float | None, str]:
    """The MFU denominator for a run in ``amp`` (None = fp32): the override, else the measured ceiling."""
    if override:
        return float(override), "--peak-tflops"
    if not ceilings:
        return None, "none"
    name = _dtype_name(amp)
    t = ceilings["matmul_tflops"].get(name) or (ceilings["matmul_tflops"].get("bf16") if name == "fp16" else None)
    return (t, f"measured {name} matmul") if t else (None, "none")


def _peak_for(ceilings: dict | None, amp: torch.dtype | None, peak: float | None, dev: torch.device):
    """The MFU denominator (:func:`peak_tflops`), the matmul ceiling measured here in the run's dtype when neither a
    ``ceilings`` record nor a ``peak`` override is given."""
    if ceilings is None and not peak:
        ceilings = ceilings_benchmark(dev, dtypes=(_dtype_name(amp),))
    return peak_tflops(ceilings, amp, peak)


def _time_calls(call: Callable[[], None], dev: torch.device, o: dict) -> tuple[list[float], float]:
    """``o['warmup']`` untimed calls of ``call``, then ``o['repeats']`` timed ones: their seconds and the peak
    memory (GiB) over the timed calls."""
    for _ in range(max(o["warmup"], 0)):
        call()
    sync(dev)
    reset_peak_memory(dev)
    t = timeit(call, dev, 0, o["repeats"])
    return t, peak_memory_gb(dev)


# ------------------------------------------------------------------------------------------- train
def train_benchmark(depth: int | None = None, batch: int | None = None, *, patch_nums: Sequence[int] = OFFICIAL_PN,
                    vocab: int = 4096, z_channels: int = 32, num_classes: int = 1000, width: int | None = None,
                    device: str = "auto", precision: str = "auto", compile: bool = False, plain: bool = False,
                    vae: str = "auto", warmup: int | None = None, repeats: int | None = None,
                    peak: float | None = None, ceilings: dict | None = None, grad_clip: float = 2.0,
                    seed: int = 0) -> dict:
    """One training step, CE only vs the full objective (see the module docstring for every figure).

    ``compile``: True for ``torch.compile``'s default backend, or a backend's name (``eager``: Dynamo's tracing
    and graph breaks without code generation). ``plain``: the official recipe (:func:`official_recipe`), the VQVAE
    (``vae``: official/small/auto) encoding random images inside the step. ``loss_ce_only``/``loss_full_objective``:
    the last step's loss (finite or not).
    Otherwise the step starts from random token rows (the token cache). ``ceilings``: a :func:`ceilings_benchmark`
    record for the MFU denominator (measured here if neither it nor ``peak`` is given).
    """
    from varup.training.loop import param_groups

    dev = resolve_device(device)
    o = _defaults(dev, depth=depth, batch=batch, warmup=warmup, repeats=repeats)
    depth, batch = o["depth"], o["batch"]
    if plain:
        precision, compile = official_recipe(dev)["precision"], False
    amp = autocast_dtype(precision, dev)
    pk, pk_src = _peak_for(ceilings, amp, peak, dev)
    patch_nums = tuple(patch_nums)
    L = sum(p * p for p in patch_nums)
    torch.manual_seed(seed)
    model = _build_var(depth, width, vocab, z_channels, num_classes, patch_nums).init_weights().to(dev).train()
    net = (torch.compile(model, backend=compile) if isinstance(compile, str) else torch.compile(model)) if compile \
        else model
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95),
                            **({"fused": True} if dev.type == "cuda" else {}))
    scaler = torch.amp.GradScaler(dev.type, init_scale=2.0**11, growth_interval=1000) \
        if plain and amp == torch.float16 else None
    refs = benchmark_references(vocab)
    losses = {"ce_only": UncertaintyLoss(LossConfig(), patch_nums, refs).to(dev),  # the baseline as trained
              "full_objective": UncertaintyLoss(LossConfig(lambda_2nd=0.002, lambda_se=0.01), patch_nums, refs).to(dev)}
    lab = torch.randint(0, num_classes, (batch,), device=dev)
    vcfg = vqvae_config(vae, dev, vocab, z_channels, patch_nums) if plain else None
    quant, tokens_of_step = _train_feed(vcfg, dev, batch, vocab, z_channels, patch_nums)
    last: dict[str, torch.Tensor] = {}
    steps = {k: _train_step(model, net, opt, lf, lab, quant, tokens_of_step, dev, amp, grad_clip, scaler,
                            lambda v, k=k: last.__setitem__(k, v)) for k, lf in losses.items()}
    with tf32_matmuls(dev) if plain else contextlib.nullcontext():
        times, mem = time_interleaved(steps, dev, o["warmup"], o["repeats"])
    flops = var_train_flops(depth, batch, patch_nums, vocab, z_channels, width)
    mode = "plain" if plain else ("compile" if compile else "fast")
    out: dict = {"benchmark": "train", "mode": mode, **env_info(dev), "depth": depth, "width": model.C,
                 "batch": batch, "params_m": round(model.num_params() / 1e6, 2), "tokens": L, "vocab": vocab,
                 "precision": _dtype_name(amp), "compile": bool(compile), "grad_scaler": scaler is not None,
                 "recipe": official_recipe(dev)["name"] if plain else "varup", "warmup": o["warmup"],
                 "repeats": o["repeats"], "vae": _vae_kind(vae, dev) if plain else None,
                 "model_tflop_per_step": flops / 1e12,
                 "executed_tflop_per_step": var_train_flops(depth, batch, patch_nums, vocab, z_channels, width,
                                                            attention="dense") / 1e12,
                 "teacher_forcing_tflop_per_step": teacher_forcing_flops(batch, patch_nums, z_channels) / 1e12,
                 "encode_tflop_per_step": vqvae_encode_flops(vcfg, batch) / 1e12 if plain else 0.0,
                 "peak_tflops": pk, "peak_source": pk_src}
    for name in losses:
        out.update(_step_figures(name, times[name], mem[name], batch, L, flops, pk))
        out[f"loss_{name}"] = float(last[name])
    out["ratio_full_vs_ce"] = out["full_objective_s"] / out["ce_only_s"]
    del model, net, opt, quant, losses, steps, tokens_of_step
    _release(dev)
    return out


def _train_feed(vcfg: VQVAEConfig | None, dev: torch.device, batch: int, vocab: int, z_channels: int,
                patch_nums: tuple[int, ...]) -> tuple[MultiScaleQuantizer, Callable[[], tuple[list, torch.Tensor]]]:
    """The quantiser that makes the teacher-forcing input and what gives a step its (per-scale tokens, targets):
    with a tokenizer config (plain mode), its VQVAE encoding random images inside the step; without, fixed random
    token rows (the token cache)."""
    if vcfg is not None:
        tok_model = VQVAE(vcfg).freeze().to(dev)
        R = vcfg.resolution
        img = torch.rand(batch, 3, R, R, device=dev).mul_(2).sub_(1)

        def encode() -> tuple[list, torch.Tensor]:
            idx = tok_model.img_to_idxBl(img)
            return idx, torch.cat(idx, dim=1)
        return tok_model.quantize, encode
    quant = MultiScaleQuantizer(VQVAEConfig(vocab_size=vocab, z_channels=z_channels, patch_nums=patch_nums)).to(dev)
    quant.requires_grad_(False)
    tok = torch.randint(0, vocab, (batch, sum(p * p for p in patch_nums)), device=dev)
    return quant, lambda: (split_tokens(tok, patch_nums), tok)


def official_recipe(dev: torch.device) -> dict:
    """How the official trainer trains (``--fp16=1``, ``tf32=True``, ``AdamW(fused=True)``, no compile): on CUDA fp16
    autocast with a GradScaler and TF32; on CPU fp32 (no scaler)."""
    if dev.type == "cuda":
        return {"name": "official: fp16 autocast + GradScaler, TF32, fused AdamW, no compile", "precision": "fp16"}
    return {"name": "official on CPU: fp32, AdamW, no compile", "precision": "fp32"}


def _train_step(model: VAR, net, opt: torch.optim.Optimizer, lf: UncertaintyLoss, lab: torch.Tensor,
                quant: MultiScaleQuantizer, tokens_of_step: Callable[[], tuple[list, torch.Tensor]], dev: torch.device,
                amp: torch.dtype | None, grad_clip: float, scaler: torch.amp.GradScaler | None = None,
                keep: Callable[[torch.Tensor], None] | None = None) -> Callable[[], None]:
    """One timed training step with the objective ``lf``: tokens, teacher-forcing input, forward, backward (scaled
    by ``scaler`` when given, unscaled before clipping), clipping, AdamW; ``keep`` receives the loss (no host read)."""
    def step() -> None:
        idx, y = tokens_of_step()
        x = quant.idxBl_to_var_input(idx)
        with autocast(dev, amp):
            logits = net(lab, x)
        loss = lf(logits, y).total
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        if keep is not None:
            keep(loss.detach())
    return step


def _step_figures(name: str, times: list[float], mem: float, batch: int, L: int, flops: float,
                  pk: float | None) -> dict:
    """The figures of one objective's step (``name``: ce_only or full_objective) from its timed repeats."""
    t = statistics.median(times)
    short = "ce" if name == "ce_only" else "full"
    return {f"{name}_s": t, f"{name}_times_s": times, f"imgs_per_s_{short}": batch / t,
            f"tokens_per_s_{short}": batch * L / t, f"tflops_{short}": flops / t / 1e12,
            f"mfu_{short}": flops / t / 1e12 / pk if pk else None, f"{name}_peak_mem_gb": mem}


def step_benchmark(depth: int, batch: int, *, patch_nums=OFFICIAL_PN, vocab: int = 4096, z_channels: int = 32,
                   num_classes: int = 1000, width: int | None = None, device: str = "auto", precision: str = "auto",
                   warmup: int = 3, repeats: int = 10, seed: int = 0, peak: float | None = None) -> dict:
    """The ``step`` subcommand: the fast training path, CE only vs the full objective (times, ratio, MFU)."""
    return train_benchmark(depth, batch, patch_nums=patch_nums, vocab=vocab, z_channels=z_channels,
                           num_classes=num_classes, width=width, device=device, precision=precision, warmup=warmup,
                           repeats=repeats, seed=seed, peak=peak)


def compare_plain(fast: dict, plain: dict) -> None:
    """Add plain/fast step-time ratios to the plain record (how much the official recipe, its in-step tokenizer and
    no compile, costs compared with the token-cache path)."""
    for k in ("ce_only", "full_objective"):
        plain[f"plain_vs_fast_{k}"] = plain[f"{k}_s"] / fast[f"{k}_s"]


# ------------------------------------------------------------------------------------------ sample
def sample_benchmark(depth: int | None = None, batch: int | None = None, *, patch_nums: Sequence[int] = OFFICIAL_PN,
                     vocab: int = 4096, z_channels: int = 32, num_classes: int = 1000, width: int | None = None,
                     device: str = "auto", precision: str = "auto", vae: str = "auto", cfg: float = 1.5,
                     top_k: int = 900, top_p: float = 0.95, warmup: int | None = None, repeats: int | None = None,
                     peak: float | None = None, ceilings: dict | None = None, seed: int = 0) -> dict:
    """One CFG sampling call of ``batch`` images (2·batch rows through the transformer) with the VQVAE decode."""
    from varup.base.seeding import make_generator
    from varup.sampling.sampler import sample, sampling_precision

    dev = resolve_device(device)
    o = _defaults(dev, depth=depth, sample_batch=batch, warmup=warmup, repeats=repeats)
    depth, batch = o["depth"], o["sample_batch"]
    amp = autocast_dtype(precision, dev)
    pk, pk_src = _peak_for(ceilings, amp, peak, dev)
    patch_nums = tuple(patch_nums)
    torch.manual_seed(seed)
    model = _build_var(depth, width, vocab, z_channels, num_classes, patch_nums).init_weights().to(dev).eval()
    vcfg = vqvae_config(vae, dev, vocab, z_channels, patch_nums)
    tok_model = VQVAE(vcfg).freeze().to(dev)
    labels = torch.randint(0, num_classes, (batch,), device=dev)
    k = min(top_k, vocab)

    def call() -> None:
        with torch.inference_mode(), sampling_precision(dev, precision):  # the pipeline's numerics (sample_shard)
            sample(model, tok_model, labels, cfg=cfg, top_k=k, top_p=top_p, generator=make_generator(seed, dev))

    t, mem = _time_calls(call, dev, o)
    f_var = var_sampling_flops(depth, batch, patch_nums, vocab, cfg=True, z_channels=z_channels, width=width)
    f_q = quantizer_sampling_flops(batch, patch_nums, z_channels)
    f_dec = vqvae_decode_flops(vcfg, batch)
    flops = f_var + f_q + f_dec
    tm = statistics.median(t)
    out = {"benchmark": "sample", "mode": "cfg", **env_info(dev), "depth": depth, "width": model.C, "batch": batch,
           "params_m": round(model.num_params() / 1e6, 2), "vocab": vocab, "precision": _dtype_name(amp),
           "cfg": cfg, "top_k": k, "top_p": top_p, "vae": _vae_kind(vae, dev), "resolution": vcfg.resolution,
           "warmup": o["warmup"], "repeats": o["repeats"], "sample_s": tm, "sample_times_s": t,
           "imgs_per_s": batch / tm, "model_tflop_per_call": flops / 1e12, "var_tflop_per_call": f_var / 1e12,
           "decode_tflop_per_call": (f_q + f_dec) / 1e12, "tflops": flops / tm / 1e12,
           "mfu": flops / tm / 1e12 / pk if pk else None, "peak_tflops": pk, "peak_source": pk_src,
           "peak_mem_gb": mem}
    del model, tok_model
    _release(dev)
    return out


# ------------------------------------------------------------------------------------------ encode
def encode_benchmark(batch: int | None = None, *, resolution: int | None = None,
                     patch_nums: Sequence[int] = OFFICIAL_PN, vocab: int = 4096, z_channels: int = 32,
                     device: str = "auto", precision: str = "fp32", vae: str = "auto", warmup: int | None = None,
                     repeats: int | None = None, peak: float | None = None, ceilings: dict | None = None,
                     seed: int = 0) -> dict:
    """:meth:`VQVAE.img_to_idxBl` throughput (the token cache is built in fp32, the default here).

    ``resolution``: the image side; it must equal ``patch_nums[-1] × downsample`` (16 for the official
    tokenizer); for the official patch_nums a 512 px request switches to the official 512 px schedule."""
    dev = resolve_device(device)
    o = _defaults(dev, encode_batch=batch, warmup=warmup, repeats=repeats)
    batch = o["encode_batch"]
    amp = autocast_dtype(precision, dev)
    pk, pk_src = _peak_for(ceilings, amp, peak, dev)
    vcfg = vqvae_config(vae, dev, vocab, z_channels, patch_nums)
    if resolution and resolution != vcfg.resolution:
        side, rem = divmod(resolution, vcfg.downsample)
        if rem or not (tuple(patch_nums) in (OFFICIAL_PN, OFFICIAL_PN_512) and side in (16, 32)):
            raise ValueError(f"--resolution {resolution} does not fit this tokenizer (downsample {vcfg.downsample}, "
                             f"patch_nums {tuple(patch_nums)}): pass --patch-nums ending in resolution/downsample")
        vcfg = vqvae_config(vae, dev, vocab, z_channels, OFFICIAL_PN if side == 16 else OFFICIAL_PN_512)
    torch.manual_seed(seed)
    tok_model = VQVAE(vcfg).freeze().to(dev)
    R = vcfg.resolution
    img = torch.rand(batch, 3, R, R, device=dev).mul_(2).sub_(1)

    def call() -> None:
        with torch.inference_mode(), autocast(dev, amp):
            tok_model.img_to_idxBl(img)

    t, mem = _time_calls(call, dev, o)
    tm = statistics.median(t)
    flops = vqvae_encode_flops(vcfg, batch)
    out = {"benchmark": "encode", "mode": _vae_kind(vae, dev), **env_info(dev), "depth": None, "batch": batch,
           "resolution": R, "params_m": round(sum(p.numel() for p in tok_model.parameters()) / 1e6, 2),
           "precision": _dtype_name(amp), "warmup": o["warmup"], "repeats": o["repeats"], "encode_s": tm,
           "encode_times_s": t, "imgs_per_s": batch / tm, "model_tflop_per_call": flops / 1e12,
           "tflops": flops / tm / 1e12, "mfu": flops / tm / 1e12 / pk if pk else None, "peak_tflops": pk,
           "peak_source": pk_src, "peak_mem_gb": mem}
    del tok_model, img
    _release(dev)
    return out


# -------------------------------------------------------------------------------------- reporting
def _f(v: Any, fmt: str = "{:.3g}") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return fmt.format(v)
    return str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def table_rows(results: dict) -> list[dict[str, str]]:
    """One display row per (benchmark, mode, precision) figure set, with the :data:`COLUMNS` keys."""
    env = results.get("env") or {}
    rows: list[dict[str, str]] = []

    def row(rec: dict, **cells) -> dict[str, str]:
        r = {c: "-" for c in COLUMNS}
        r.update({"Device": rec.get("device_name", env.get("device_name", "-")), "Torch": rec.get("torch", "-"),
                  "Date (UTC)": rec.get("date_utc", "-"), "Depth": _f(rec.get("depth")), "Batch": _f(rec.get("batch")),
                  "Precision": rec.get("precision", "-"), "Benchmark": rec["benchmark"], "Mode": rec.get("mode", "-")})
        r.update({k: v for k, v in cells.items() if v is not None})
        rows.append(r)
        return r

    c = results.get("ceilings")
    if c:
        cuda = c["device"].startswith("cuda")
        for name, tf in c["matmul_tflops"].items():
            row(c, Mode="matmul", Precision=name, **{"TFLOP/s": f"{tf:.3g}",
                "Notes": f"{c['matmul_n']}^3" + (" (TF32 on)" if name == "fp32" and cuda and c.get("tf32_matmul") else "")})
        row(c, Mode="copy", **{"Throughput": f"{c['copy_gbps']:.4g} GB/s", "Notes": f"{c['copy_mib']} MiB, read+write"})
    for t in results.get("train") or []:
        cuda = t["device"].startswith("cuda")
        prefix = "" if t["mode"] == "fast" else t["mode"] + " "
        for short, name in (("ce", "ce_only"), ("full", "full_objective")):
            notes = []
            target = None
            if short == "full":
                notes.append(f"full/CE x{t['ratio_full_vs_ce']:.3f}")
            if t.get(f"plain_vs_fast_{name}"):
                notes.append(f"plain/fast x{t[f'plain_vs_fast_{name}']:.2f}")
            if t["mode"] == "plain":
                notes.append(f"{t['vae']} VQVAE in step")
            if cuda and t["mode"] != "plain":
                mfu = t[f"mfu_{short}"]
                target = f"MFU >= {TARGETS['train_mfu']:.0%} (d16 b64)"
                if mfu is not None:
                    target += f": {_met(mfu >= TARGETS['train_mfu'])}"
                if short == "full":
                    target += f"; full/CE <= {TARGETS['full_vs_ce']}: {_met(t['ratio_full_vs_ce'] <= TARGETS['full_vs_ce'])}"
            row(t, Mode=prefix + short, Target=target, Notes="; ".join(notes) or None, **{
                "Time (s)": f"{t[f'{name}_s']:.4g}",
                "Throughput": f"{t[f'imgs_per_s_{short}']:.4g} img/s, {t[f'tokens_per_s_{short}']:.4g} tok/s",
                "TFLOP/s": f"{t[f'tflops_{short}']:.3g}", "MFU": _pct(t[f"mfu_{short}"]),
                "Peak mem (GiB)": f"{t[f'{name}_peak_mem_gb']:.2f}"})
    s = results.get("sample")
    if s:
        target = None
        if s["device"].startswith("cuda"):
            ok = s["imgs_per_s"] >= TARGETS["sample_imgs_per_s"] and s["batch"] >= TARGETS["sample_batch"]
            target = f">= {TARGETS['sample_imgs_per_s']:.0f} img/s at b >= {TARGETS['sample_batch']} (d16): {_met(ok)}"
        row(s, Target=target, Notes=f"cfg {s['cfg']}, top-k {s['top_k']}, top-p {s['top_p']}, {s['vae']} VQVAE decode "
            f"{s['resolution']}px", **{"Time (s)": f"{s['sample_s']:.4g}", "Throughput": f"{s['imgs_per_s']:.4g} img/s",
                                       "TFLOP/s": f"{s['tflops']:.3g}", "MFU": _pct(s["mfu"]),
                                       "Peak mem (GiB)": f"{s['peak_mem_gb']:.2f}"})
    e = results.get("encode")
    if e:
        row(e, Notes=f"img_to_idxBl {e['resolution']}px, {e['params_m']}M params", **{
            "Time (s)": f"{e['encode_s']:.4g}", "Throughput": f"{e['imgs_per_s']:.4g} img/s",
            "TFLOP/s": f"{e['tflops']:.3g}", "MFU": _pct(e["mfu"]), "Peak mem (GiB)": f"{e['peak_mem_gb']:.2f}"})
    return rows


def format_table(rows: list[dict[str, str]], columns: Sequence[str]) -> str:
    """A plain fixed-width text table."""
    w = {c: max([len(c)] + [len(r.get(c, "")) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(w[c]) for c in columns), "  ".join("-" * w[c] for c in columns)]
    lines += ["  ".join(r.get(c, "").ljust(w[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def print_table(results: dict, file=None) -> None:
    """The short summary table (printed last by ``all``); the Target column only on CUDA."""
    file = file or sys.stdout
    rows = table_rows(results)
    env = results.get("env") or next((r for r in results.values() if isinstance(r, dict) and "device_name" in r), {})
    cuda = str(env.get("device", "")).startswith("cuda")
    cols = [c for c in COLUMNS if c not in ("Device", "Torch", "Date (UTC)") and (cuda or c != "Target")]
    print(f"\n{env.get('device_name', '?')} | torch {env.get('torch', '?')} | {env.get('date_utc', '?')} UTC", file=file)
    print(format_table(rows, cols), file=file)


def _cell(v: str) -> str:
    return str(v).replace("|", "/").replace("\n", " ").strip() or "-"


def _parse_markdown_rows(text: str) -> list[dict[str, str]]:
    """Rows of the benchmark table of an existing file, as {column: cell} (columns matched by header name)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells and cells[0] == "Benchmark":
            header, rows = cells, []
            for ln in lines[i + 2:]:
                if not ln.lstrip().startswith("|"):
                    break
                vals = [c.strip() for c in ln.strip().strip("|").split("|")]
                rows.append({h: (vals[j] if j < len(vals) else "-") for j, h in enumerate(header)})
            return rows
    return []


def markdown_document(rows: list[dict[str, str]]) -> str:
    head = f"""# Benchmarks

<!-- GENERATED FILE: do not edit by hand. Regenerate with `{MARKDOWN_COMMAND}`. -->

Generated by `{MARKDOWN_COMMAND}`; **do not edit by hand**. Every run adds its rows, or replaces the rows with
the same key (benchmark, mode, device, torch version, depth, batch, precision); rows of other machines stay.

* **Time** — median seconds per iteration over the timed repeats (warm-up excluded, device-synchronised): a
  training step (forward, backward, clipping, AdamW), one sampling call, one encoding call.
* **Throughput** — images (and tokens: L = Σ pn² per image, 680 for the official scales) per second.
* **TFLOP/s** — model matmul FLOPs of the iteration (`varup.bench.flops`; training = 3 × forward, block-causal
  attention) / time. **MFU** — TFLOP/s / the peak: the measured matmul ceiling (`ceilings` rows) in the run's
  precision, or `--peak-tflops`.
* **Peak mem** — CUDA `max_memory_allocated`; CPU peak resident set size of the process.
* Modes: `ce`/`full` — token-cache path, CE only / the full uncertainty-preserving objective; `plain` — the
  official recipe (CUDA: fp16 autocast + GradScaler, TF32, fused AdamW, no compile; CPU: fp32), VQVAE encoding
  inside the step; `compile` — `torch.compile`d model;
  `cfg` — sampling with classifier-free guidance 1.5, top-k 900, top-p 0.95, decode included.
* Targets (one GPU, d16): training at batch 64 with MFU ≥ 45 % (compiled, bf16) and ≥ 2 × the official recipe's
  images/s; full objective ≤ 1.05 × CE-only step time; sampling with CFG at batch ≥ 256 at ≥ 400 images/s.
* The GPU acceptance run is `varup gpu-check` (`varup.bench.gpucheck`): ceilings, d16 training eager and compiled
  (graph breaks counted), one d20 step at the paper's per-GPU batch, sampling, every model family under DDP, a killed
  and resumed run; one PASS/FAIL line per section, a JSON file, non-zero exit on a failure.
* Attention (`VAR.attn_impl`, `varup.models.var`): on CPU the official SDPA with the dense additive L×L mask
  (`sdpa_dense`, the rows below); on CUDA `sdpa_prefix`: each scale's queries attend to the prefix of scales ≤ it
  with no mask (flash-eligible), the first scales (≤ 128 tokens) in one call with a small boolean mask; `flex`
  (FlexAttention block mask, torch ≥ 2.5) is opt-in. q, k and the KV cache are in the autocast dtype. Each path
  equals the dense one within float32 rounding on CPU (`tests/test_fastpath.py`); no GPU row measures them yet.

"""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c, "-")) for c in COLUMNS) + " |" for r in rows]
    return head + "\n".join(lines) + "\n"


def update_markdown(path: str | os.PathLike, results: dict) -> list[dict[str, str]]:
    """Add this run's rows to the table in ``path`` (created if missing); a row with the same key
    (:data:`KEY_COLUMNS`) is replaced in place, others are kept in their order and new ones appended."""
    from varup.base.utils import atomic_write_text

    p = Path(path)
    old = _parse_markdown_rows(p.read_text()) if p.exists() else []
    merged: dict[tuple, dict[str, str]] = {}
    for r in old:
        merged[tuple(r.get(k, "-") for k in KEY_COLUMNS)] = r
    for r in table_rows(results):
        r = {c: _cell(v) for c, v in r.items()}
        merged[tuple(r[k] for k in KEY_COLUMNS)] = r  # dict keeps the first position of an updated key
    rows = list(merged.values())
    atomic_write_text(p, markdown_document(rows))
    return rows


def write_json(path: str | os.PathLike, results: dict) -> None:
    from varup.base.utils import atomic_write_json

    atomic_write_json(path, results)


# ---------------------------------------------------------------------------------------------- CLI
def _pn(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(","))


def _add_model_args(p: argparse.ArgumentParser, *, depth_default=None, batch_default=None) -> None:
    p.add_argument("--depth", type=int, default=depth_default, help="VAR depth (default: 16 on CUDA, 2 on CPU)")
    p.add_argument("--batch", type=int, default=batch_default, help="batch (default: the device's default)")
    p.add_argument("--width", type=int, default=None, help="default 64*depth (official)")
    p.add_argument("--patch-nums", type=_pn, default=OFFICIAL_PN)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--num-classes", type=int, default=1000)


def _add_run_args(p: argparse.ArgumentParser, *, repeats=None, warmup=None, md: bool = True) -> None:
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")
    p.add_argument("--repeats", type=int, default=repeats, help="timed iterations (median; default 10 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed iterations first (default 3 CUDA, 1 CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator instead of the measured ceiling")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result(s) here")
    if md:
        p.add_argument("--markdown", default=None, metavar="PATH",
                       help="add/update this run's rows in a Markdown table (e.g. BENCHMARKS.md)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m varup.bench.suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("step", help="training step: CE only vs the full objective (original benchmark)")
    _add_model_args(p, depth_default=2, batch_default=32)
    _add_run_args(p, repeats=10, warmup=3, md=False)

    p = sub.add_parser("ceilings", help="matmul TFLOP/s (the MFU denominator) and copy GB/s")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n×n product (8192 CUDA, 2048 CPU)")
    p.add_argument("--copy-mib", type=int, default=None, help="copied buffer (1024 MiB CUDA, 128 MiB CPU)")
    _add_run_args(p)

    p = sub.add_parser("train", help="training step: images/s, tokens/s, MFU, memory; CE vs full; plain mode")
    _add_model_args(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    p.add_argument("--plain", action="store_true", help="the official recipe: fp16 autocast + GradScaler, TF32, fused "
                   "AdamW, no compile (CPU: fp32), VQVAE encoding in the step")
    p.add_argument("--compare-plain", action="store_true", help="run the fast path and plain mode, report the ratio")
    p.add_argument("--vae", default="auto", help="tokenizer of plain mode: official | small | auto (CPU: small)")
    _add_run_args(p)

    p = sub.add_parser("sample", help="CFG sampling with decode: images/s, MFU, memory")
    _add_model_args(p)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--vae", default="auto", help="official | small | auto (CPU: small)")
    _add_run_args(p)

    p = sub.add_parser("encode", help="tokenizer encoding (img_to_idxBl) images/s")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the tokenizer's, 256 official)")
    p.add_argument("--patch-nums", type=_pn, default=OFFICIAL_PN)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--vae", default="auto", help="official | small | auto (CPU: small)")
    _add_run_args(p)
    p.set_defaults(precision="fp32")

    p = sub.add_parser("all", help="every benchmark in one process; a table last; --json / --markdown")
    _add_model_args(p)
    p.add_argument("--sample-batch", type=int, default=None, help="default 256 CUDA, 4 CPU")
    p.add_argument("--encode-batch", type=int, default=None, help="default 64 CUDA, 4 CPU")
    p.add_argument("--vae", default="auto", help="official | small | auto (CPU: small)")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd training step")
    p.add_argument("--skip-plain", action="store_true", help="skip the plain-mode training comparison")
    p.add_argument("--matmul-size", type=int, default=None)
    p.add_argument("--copy-mib", type=int, default=None)
    _add_run_args(p)
    return ap


def _print_record(r: dict) -> None:
    w = max(len(k) for k in r)
    for k, v in r.items():
        if isinstance(v, list):
            v = "[" + ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v) + "]"
        print(f"{k:<{w}}  {v:.4f}" if isinstance(v, float) else f"{k:<{w}}  {v}")


def run_all(a: argparse.Namespace, argv: Sequence[str] | None = None) -> dict:
    """Every benchmark with the options of ``all``; returns {env, ceilings, train: [...], sample, encode}."""
    dev = resolve_device(a.device)
    amp = autocast_dtype(a.precision, dev)
    common = dict(device=a.device, warmup=a.warmup, repeats=a.repeats, peak=a.peak_tflops)
    model = dict(patch_nums=a.patch_nums, vocab=a.vocab, num_classes=a.num_classes, width=a.width)
    args = sys.argv[1:] if argv is None else list(argv)
    results: dict = {"env": env_info(dev), "command": " ".join(["python -m varup.bench.suite", *args])}
    dtypes = sorted({_dtype_name(amp), "fp32"}, key=lambda s: s != _dtype_name(amp))
    print("[bench] ceilings", flush=True)
    results["ceilings"] = c = ceilings_benchmark(dev, matmul_size=a.matmul_size, copy_mib=a.copy_mib, dtypes=dtypes,
                                                 warmup=a.warmup, repeats=a.repeats)
    print("[bench] train (token-cache path)", flush=True)
    fast = train_benchmark(a.depth, a.batch, precision=a.precision, ceilings=c, **model, **common)
    results["train"] = [fast]
    if a.compile:
        print("[bench] train (torch.compile)", flush=True)
        results["train"].append(train_benchmark(a.depth, a.batch, precision=a.precision, compile=True, ceilings=c,
                                                **model, **common))
    if not a.skip_plain:
        print("[bench] train (plain mode)", flush=True)
        plain = train_benchmark(a.depth, a.batch, plain=True, vae=a.vae, ceilings=c, **model, **common)
        compare_plain(fast, plain)
        results["train"].append(plain)
    print("[bench] sample", flush=True)
    results["sample"] = sample_benchmark(a.depth, a.sample_batch, precision=a.precision, vae=a.vae, ceilings=c,
                                         **model, **common)
    print("[bench] encode", flush=True)
    results["encode"] = encode_benchmark(a.encode_batch, patch_nums=a.patch_nums, vocab=a.vocab, vae=a.vae,
                                         precision="fp32", ceilings=c, **common)
    return results


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cmd == "step":
        r = step_benchmark(a.depth, a.batch, patch_nums=a.patch_nums, vocab=a.vocab, num_classes=a.num_classes,
                           width=a.width, device=a.device, precision=a.precision, warmup=a.warmup,
                           repeats=a.repeats, peak=a.peak_tflops)
        if a.json:
            write_json(a.json, r)
        _print_record(r)
        return 0
    common = dict(device=a.device, warmup=a.warmup, repeats=a.repeats)
    if a.cmd == "all":
        results = run_all(a, argv)
    elif a.cmd == "ceilings":
        results = {"ceilings": ceilings_benchmark(a.device, matmul_size=a.matmul_size, copy_mib=a.copy_mib,
                                                  warmup=a.warmup, repeats=a.repeats)}
    elif a.cmd == "train":
        model = dict(patch_nums=a.patch_nums, vocab=a.vocab, num_classes=a.num_classes, width=a.width,
                     peak=a.peak_tflops, **common)
        dev = resolve_device(a.device)
        c = None if a.peak_tflops else ceilings_benchmark(dev, dtypes=sorted(
            {_dtype_name(autocast_dtype(a.precision, dev)), "fp32"}), warmup=a.warmup, repeats=a.repeats)
        runs = []
        if not a.plain or a.compare_plain:
            runs.append(train_benchmark(a.depth, a.batch, precision=a.precision, compile=a.compile, ceilings=c, **model))
        if a.plain or a.compare_plain:
            runs.append(train_benchmark(a.depth, a.batch, plain=True, vae=a.vae, ceilings=c, **model))
            if len(runs) == 2:
                compare_plain(runs[0], runs[1])
        results = {"ceilings": c, "train": runs} if c else {"train": runs}
    elif a.cmd == "sample":
        results = {"sample": sample_benchmark(a.depth, a.batch, patch_nums=a.patch_nums, vocab=a.vocab,
                                              num_classes=a.num_classes, width=a.width, precision=a.precision,
                                              vae=a.vae, cfg=a.cfg, top_k=a.top_k, top_p=a.top_p,
                                              peak=a.peak_tflops, **common)}
    elif a.cmd == "encode":
        results = {"encode": encode_benchmark(a.batch, resolution=a.resolution, patch_nums=a.patch_nums,
                                              vocab=a.vocab, vae=a.vae, precision=a.precision, peak=a.peak_tflops,
                                              **common)}
    else:  # pragma: no cover - argparse rejects it
        raise SystemExit(f"unknown command {a.cmd}")
    if "env" not in results:
        results = {"env": env_info(resolve_device(a.device)), **results}
    if a.cmd != "all":
        for k, v in results.items():
            if k == "env" or v is None:
                continue
            for r in v if isinstance(v, list) else [v]:
                print(f"--- {k}")
                _print_record(r)
    if a.json:
        write_json(a.json, results)
    if a.markdown:
        update_markdown(a.markdown, results)
        print(f"[bench] updated {a.markdown}")
    print_table(results)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
