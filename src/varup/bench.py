"""Benchmarks (figures printed, never asserted): ``python -m varup.bench step --depth 2 --batch 32``.

``step``: one VAR training step (forward + backward + AdamW) with cross-entropy only and with the full
uncertainty-preserving objective, their times and ratio. Warm-up excluded, medians over repeats, device-synchronised.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

from varup.losses import LossConfig, UncertaintyLoss, build_references
from varup.models.var import VAR, VARConfig
from varup.runtime import autocast, autocast_dtype, resolve_device

OFFICIAL_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
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


def step_benchmark(depth: int, batch: int, *, patch_nums=OFFICIAL_PN, vocab: int = 4096, z_channels: int = 32,
                   num_classes: int = 1000, width: int | None = None, device: str = "auto", precision: str = "auto",
                   warmup: int = 3, repeats: int = 10, seed: int = 0) -> dict:
    dev = resolve_device(device)
    amp = autocast_dtype(precision, dev)
    torch.manual_seed(seed)
    L = sum(p * p for p in patch_nums)
    model = VAR(VARConfig(vocab_size=vocab, z_channels=z_channels, num_classes=num_classes, depth=depth,
                          embed_dim=width or 64 * depth, num_heads=(width or 64 * depth) // 64 or 1,
                          patch_nums=tuple(patch_nums))).init_weights().to(dev).train()
    codebook = torch.randn(vocab, z_channels)
    refs = build_references(codebook, torch.randint(0, vocab, (64, L)), patch_nums, num_clusters=min(64, vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            **({"fused": True} if dev.type == "cuda" else {}))
    x = torch.randn(batch, L - patch_nums[0] ** 2, z_channels, device=dev)
    y = torch.randint(0, vocab, (batch, L), device=dev)
    lab = torch.randint(0, num_classes, (batch,), device=dev)
    out: dict = {"depth": depth, "batch": batch, "params_m": round(model.num_params() / 1e6, 2), "tokens": L,
                 "vocab": vocab, "device": str(dev), "precision": str(amp or "fp32"), "torch": torch.__version__}
    losses = {"ce_only": UncertaintyLoss(LossConfig(), patch_nums, None, log_all=False),
              "full_objective": UncertaintyLoss(LossConfig(lambda_2nd=0.002, lambda_se=0.01), patch_nums, refs)}
    for name, lf in losses.items():
        lf = lf.to(dev)

        def step(lf=lf):
            with autocast(dev, amp):
                logits = model(lab, x)
            loss = lf(logits, y).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = timeit(step, dev, warmup, repeats)
        out[f"{name}_s"] = statistics.median(t)
        if dev.type == "cuda":
            out[f"{name}_peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    out["ratio_full_vs_ce"] = out["full_objective_s"] / out["ce_only_s"]
    out["imgs_per_s_ce"] = batch / out["ce_only_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m varup.bench", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("step", help="training step: CE only vs the full objective")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=None, help="default 64*depth (official)")
    p.add_argument("--patch-nums", type=lambda s: tuple(int(v) for v in s.split(",")), default=OFFICIAL_PN)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = step_benchmark(a.depth, a.batch, patch_nums=a.patch_nums, vocab=a.vocab, width=a.width, device=a.device,
                       precision=a.precision, warmup=a.warmup, repeats=a.repeats)
    if a.json:
        from varup.utils import atomic_write_json

        atomic_write_json(a.json, r)
    w = max(len(k) for k in r)
    for k, v in r.items():
        print(f"{k:<{w}}  {v:.4f}" if isinstance(v, float) else f"{k:<{w}}  {v}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
