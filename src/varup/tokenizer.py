"""Training a multi-scale VQVAE from scratch (the official repository cannot), for the toy experiment and for
user datasets where the official tokenizer does not fit.

Loss: ``recon_l1·|x̂-x| + recon_l2·(x̂-x)² + vq`` (vq = commitment β·‖sg(f̂)-f‖² + codebook ‖f̂-sg(f)‖², averaged over
scales, straight-through estimator). Dead codes (EMA hit count below ``dead_code_threshold`` × mean) are re-seeded
from encoder features of the current batch every ``dead_code_every`` steps, which keeps small codebooks in use.
Resumable and preemption-safe like the transformer trainer (same checkpoint mechanism).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from varup.batches import BatchOrder
from varup.models.vqvae import VQVAE, VQVAEConfig
from varup.runtime import (Dist, NonFiniteLossError, PreemptionGuard, ResumableLog, SlurmClock, discard_training_state,
                           exit_preempted, load_training_state, requeue_slurm_job, resolve_device, save_training_state,
                           set_rng_state)
from varup.sample import derive_seed
from varup.utils import atomic_torch_save, atomic_write_json, config_hash, progress, write_provenance

log = logging.getLogger("varup.tokenizer")


@dataclass
class TokenizerTrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    recon_l1: float = 1.0
    recon_l2: float = 1.0
    grad_clip: float = 1.0
    dead_code_every: int = 50
    dead_code_threshold: float = 0.03
    dead_code_until: float = 0.8  # fraction of training after which codes are no longer re-seeded
    log_every: int = 25
    ckpt_every: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)


def _lr(step: int, c: TokenizerTrainConfig) -> float:
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    p = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))  # cosine to 10%


@torch.no_grad()
def reseed_dead_codes(vae: VQVAE, img: torch.Tensor, threshold: float, generator: torch.Generator) -> int:
    q = vae.quantize
    usage = q.ema_vocab_hit_SV.sum(0)
    dead = usage < threshold * usage.mean()
    n = int(dead.sum())
    if n == 0:
        return 0
    f = vae.quant_conv(vae.encoder(img)).permute(0, 2, 3, 1).reshape(-1, q.Cvae)
    pick = torch.randint(0, f.shape[0], (n,), generator=generator, device="cpu").to(f.device)
    q.embedding.weight.data[dead] = f[pick] + 0.01 * f.std() * torch.randn(n, q.Cvae, generator=generator).to(f.device)
    q.ema_vocab_hit_SV[:, dead] = usage.mean() / q.ema_vocab_hit_SV.shape[0]
    return n


def train_tokenizer(vq_cfg: dict, tc_dict: dict, get_batch: Callable[[np.ndarray], torch.Tensor], n_images: int, *,
                    out_model: str | os.PathLike, work_dir: str | os.PathLike, device: str = "auto",
                    val_images: torch.Tensor | None = None, stop_after: int | None = None,
                    stop_before_limit_s: float | None = None) -> dict:
    """Train a VQVAE. ``get_batch(indices)`` returns images (B, 3, R, R) in [-1, 1]. Writes ``out_model``
    (``{'model', 'config'}``, loadable with :func:`varup.models.vqvae.load_vqvae`) and ``summary.json``."""
    t0 = time.time()
    dev = resolve_device(device)
    tc = TokenizerTrainConfig(**tc_dict)
    cfg = VQVAEConfig(**vq_cfg)
    run_hash = config_hash({"vq": cfg.to_dict(), "train": asdict(tc)})
    work = Path(work_dir)
    ckpt = work / "ckpt" / "last.pt"
    run_log = ResumableLog(work / "ckpt" / "metrics.jsonl", work / "metrics.jsonl")
    work.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(tc.seed)
    vae = VQVAE(cfg)
    vae.quantize.init_codebook()
    vae.to(dev).train()
    opt = torch.optim.Adam(vae.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    start = 0
    state = load_training_state(ckpt, run_hash=run_hash)  # an unreadable or stale last.pt is set aside
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        vae.quantize.record_hit = int(state["extra"].get("record_hit", 1))
        set_rng_state(state["rng"])
        start = int(state["step"])
        log.info("resumed from %s at step %d", ckpt, start)
    else:
        torch.manual_seed(derive_seed(tc.seed, "tokenizer-train"))
    run_log.resume_at(start)
    order = BatchOrder(n_images, tc.batch_size, tc.seed, Dist())
    gen = torch.Generator().manual_seed(derive_seed(tc.seed, "dead-codes", start))

    def checkpoint(step: int) -> None:
        save_training_state(ckpt, model=vae, optimizer=opt, step=step, config={"vq": cfg.to_dict(), "train": asdict(tc)},
                            extra={"run_hash": run_hash, "record_hit": vae.quantize.record_hit})

    log.info("tokenizer %s: %.2fM params, V=%d, patch_nums=%s, %d steps of batch %d on %s", run_hash,
             sum(p.numel() for p in vae.parameters()) / 1e6, cfg.vocab_size, cfg.patch_nums, tc.steps, tc.batch_size, dev)
    bar = progress(total=tc.steps, initial=start, desc="tokenizer", unit="step")
    steps_done = 0
    with PreemptionGuard(SlurmClock.for_job(stop_before_limit_s)) as guard:
        for step in range(start, tc.steps):
            img = get_batch(order.indices(step)).to(dev)
            for g in opt.param_groups:
                g["lr"] = _lr(step, tc)
            rec, vq_loss, hits = vae(img)
            l1, l2 = F.l1_loss(rec, img), F.mse_loss(rec, img)
            loss = tc.recon_l1 * l1 + tc.recon_l2 * l2 + vq_loss
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"tokenizer: non-finite loss at step {step + 1} (l1 {float(l1):.4g}, "
                                         f"l2 {float(l2):.4g}, vq {float(vq_loss):.4g}); last checkpoint {ckpt} kept")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), tc.grad_clip)
            opt.step()
            done = step + 1
            steps_done += 1
            reseeded = 0
            if tc.dead_code_every and done % tc.dead_code_every == 0 and done < tc.dead_code_until * tc.steps:
                reseeded = reseed_dead_codes(vae, img, tc.dead_code_threshold, gen)
            if done % tc.log_every == 0 or done == tc.steps:
                usage = (hits > 0).float().mean(1)
                loss_, l1_, l2_, vq_ = (t.detach() for t in (loss, l1, l2, vq_loss))
                rec_ = {"step": done, "loss": float(loss_), "l1": float(l1_), "l2": float(l2_), "vq": float(vq_),
                        "psnr": float(10 * torch.log10(4.0 / l2_.clamp_min(1e-10))), "usage_per_scale": usage.tolist(),
                        "reseeded": reseeded, "elapsed_s": round(time.time() - t0, 2)}
                run_log.append(rec_)
                bar.set_postfix(l2=f"{rec_['l2']:.4f}", psnr=f"{rec_['psnr']:.1f}")
            bar.update(1)
            if done % tc.ckpt_every == 0 and done < tc.steps:
                checkpoint(done)
            if guard.any_rank_requested(Dist(), dev):
                checkpoint(done)
                if guard.time_limit:
                    requeue_slurm_job()
                exit_preempted(guard.requested)
            if stop_after is not None and steps_done >= stop_after:
                checkpoint(done)
                return {"stopped_at": done}
    bar.close()
    vae.eval()
    summary = {"run_hash": run_hash, "steps": tc.steps, "params": sum(p.numel() for p in vae.parameters()),
               "wall_s_this_job": round(time.time() - t0, 2), "config": cfg.to_dict()}
    if val_images is not None and len(val_images):
        with torch.no_grad():
            v = val_images.to(dev)
            recon = torch.cat([vae.img_to_reconstructed_img(v[a:a + 64]) for a in range(0, len(v), 64)])
            mse = F.mse_loss(recon, v).item()
            idx = [torch.cat(t) for t in zip(*[vae.img_to_idxBl(v[a:a + 64]) for a in range(0, len(v), 64)])]
        summary["val_psnr"] = 10 * math.log10(4.0 / max(mse, 1e-10))
        summary["val_active_codes_per_scale"] = [int(t.unique().numel()) for t in idx]
    atomic_torch_save({"model": vae.state_dict(), "config": cfg.to_dict()}, out_model)
    run_log.publish()
    atomic_write_json(work / "summary.json", summary)
    write_provenance(out_model, config={"vq": cfg.to_dict(), "train": asdict(tc)}, seed=tc.seed, device=str(dev), started=t0)
    discard_training_state(ckpt)
    return summary


__all__ = ["train_tokenizer", "TokenizerTrainConfig", "reseed_dead_codes"]
