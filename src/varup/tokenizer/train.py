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

from varup.base.runtime import (
    Dist,
    NonFiniteLossError,
    PreemptionGuard,
    ResumableLog,
    SlurmClock,
    discard_training_state,
    exit_preempted,
    kept_checkpoint_note,
    load_training_state,
    requeue_slurm_job,
    resolve_device,
    save_training_state,
    set_rng_state,
)
from varup.base.schedule import warmup_cosine
from varup.base.seeding import derive_seed
from varup.base.utils import (
    atomic_torch_save,
    atomic_write_json,
    config_hash,
    progress,
    provenance_path,
    write_provenance,
)
from varup.data.batches import BatchOrder
from varup.models.vqvae import VQVAE, VQVAEConfig

log = logging.getLogger("varup.tokenizer.train")


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
    reseed_from: str = "latent"  # latent: the encoder's vectors | scales: every scale's residuals, shared out
    log_every: int = 25
    ckpt_every: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.reseed_from not in RESEED_SOURCES:
            raise ValueError(f"reseed_from must be one of {RESEED_SOURCES}, not {self.reseed_from!r}")


RESEED_SOURCES = ("latent", "scales")


def _reseed_pools(vae: VQVAE, img: torch.Tensor, source: str) -> list[torch.Tensor]:
    """The (N, C) vectors dead codes are drawn from: the encoder's latent vectors (``latent``: what the finest scale
    quantizes), or the residual every scale looks up (``scales``: one pool per scale, so coarse scales, with one
    vector per image, get codes of their own)."""
    f = vae.quant_conv(vae.encoder(img))
    if source == "latent":
        return [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])]
    return [rest.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for rest, _, _ in vae.quantize.residual_walk(f)]


def _reseed_shares(n: int, pool_sizes: list[int]) -> list[int]:
    """How many of ``n`` dead codes each pool seeds: an equal share each (the remainder to the first pools), but no
    pool more than its number of vectors (a code per distinct vector: several codes on one vector are near-duplicates
    that split its hits, seen in a 40-step tokenizer as 362 code pairs closer than 0.02); what a pool cannot take goes
    to the largest pool (the finest scale)."""
    k = len(pool_sizes)
    shares = [min(n // k + (i < n % k), size) for i, size in enumerate(pool_sizes)]
    big = max(range(k), key=lambda i: pool_sizes[i])
    shares[big] += n - sum(shares)
    return shares


def _distinct_picks(size: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random indices below ``size``, all distinct while ``n <= size`` (then repeats for the rest)."""
    pick = torch.randperm(size, generator=generator, device="cpu")[:n]
    if n > size:
        pick = torch.cat([pick, torch.randint(0, size, (n - size,), generator=generator, device="cpu")])
    return pick


@torch.no_grad()
def reseed_dead_codes(vae: VQVAE, img: torch.Tensor, threshold: float, generator: torch.Generator,
                      source: str = "latent") -> int:
    """Re-seed the codes whose EMA hit count is below ``threshold`` × the mean, each at a distinct random vector of
    the batch's pools (:func:`_reseed_pools`; shared out by :func:`_reseed_shares`) plus 1 % noise; returns how
    many."""
    if source not in RESEED_SOURCES:
        raise ValueError(f"reseed_from must be one of {RESEED_SOURCES}, not {source!r}")
    q = vae.quantize
    usage = q.ema_vocab_hit_SV.sum(0)
    dead = torch.nonzero(usage < threshold * usage.mean()).flatten()
    if len(dead) == 0:
        return 0
    pools = _reseed_pools(vae, img, source)
    start = 0
    for pool, n_k in zip(pools, _reseed_shares(len(dead), [len(p) for p in pools])):
        codes, start = dead[start:start + n_k], start + n_k
        pick = _distinct_picks(pool.shape[0], n_k, generator).to(pool.device)
        noise = torch.randn(n_k, q.Cvae, generator=generator).to(pool.device)
        q.embedding.weight.data[codes] = pool[pick] + 0.01 * pool.std() * noise
    q.ema_vocab_hit_SV[:, dead] = usage.mean() / q.ema_vocab_hit_SV.shape[0]
    return len(dead)


@dataclass
class _TokRun:
    """What the loop and the checkpoints share."""
    cfg: VQVAEConfig
    tc: TokenizerTrainConfig
    run_hash: str
    work: Path
    ckpt: Path
    log: ResumableLog
    vae: VQVAE
    opt: torch.optim.Optimizer
    dev: torch.device
    gen: torch.Generator  # draws the re-seeded codes; its state is checkpointed, so a resume is bit-identical
    start: int = 0
    last_ckpt: int | None = None  # the step of the checkpoint a retry would resume from

    def config(self) -> dict:
        return {"vq": self.cfg.to_dict(), "train": asdict(self.tc)}

    def checkpoint(self, step: int) -> None:
        save_training_state(self.ckpt, model=self.vae, optimizer=self.opt, step=step, config=self.config(),
                            extra={"run_hash": self.run_hash, "record_hit": self.vae.quantize.record_hit,
                                   "dead_code_rng": self.gen.get_state()})
        self.last_ckpt = step


def train_tokenizer(vq_cfg: dict, tc_dict: dict, get_batch: Callable[[np.ndarray], torch.Tensor], n_images: int, *,
                    out_model: str | os.PathLike, work_dir: str | os.PathLike, device: str = "auto",
                    val_images: torch.Tensor | None = None, stop_after: int | None = None,
                    stop_before_limit_s: float | None = None) -> dict:
    """Train a VQVAE. ``get_batch(indices)`` returns images (B, 3, R, R) in [-1, 1]. Writes ``out_model``
    (``{'model', 'config'}``, loadable with :func:`varup.models.vqvae.load_vqvae`) and ``summary.json``."""
    t0 = time.time()
    with PreemptionGuard() as guard:  # up before the live log exists, like the transformer trainer's
        r = _tok_setup(vq_cfg, tc_dict, work_dir, out_model, device)
        guard.clock = SlurmClock.for_job(stop_before_limit_s)
        stopped = _tok_loop(r, guard, get_batch, n_images, stop_after, t0)
    return stopped if stopped is not None else _tok_finish(r, out_model, val_images, t0)


def _tok_setup(vq_cfg: dict, tc_dict: dict, work_dir, out_model, device: str) -> _TokRun:
    """A fresh VQVAE and optimiser, or the state of ``ckpt/last.pt`` (an unreadable or stale one is set aside; a
    killed job's temporary files are removed first)."""
    dev = resolve_device(device)
    tc = TokenizerTrainConfig(**tc_dict)
    cfg = VQVAEConfig(**vq_cfg)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    vae = VQVAE(cfg)
    vae.quantize.init_codebook()
    vae.to(dev).train()
    r = _TokRun(cfg=cfg, tc=tc, run_hash=config_hash({"vq": cfg.to_dict(), "train": asdict(tc)}), work=work,
                ckpt=work / "ckpt" / "last.pt", log=ResumableLog(work / "ckpt" / "metrics.jsonl", work / "metrics.jsonl"),
                vae=vae, opt=torch.optim.Adam(vae.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay),
                dev=dev, gen=torch.Generator().manual_seed(derive_seed(tc.seed, "dead-codes", 0)))
    outputs = (r.log.published, work / "summary.json", Path(out_model), provenance_path(out_model))
    state = load_training_state(r.ckpt, run_hash=r.run_hash, outputs=outputs)
    if state is not None:
        vae.load_state_dict(state["model"])
        r.opt.load_state_dict(state["optimizer"])
        vae.quantize.record_hit = int(state["extra"].get("record_hit", 1))
        set_rng_state(state["rng"])
        r.start = r.last_ckpt = int(state["step"])
        if "dead_code_rng" in state["extra"]:
            r.gen.set_state(state["extra"]["dead_code_rng"])
        else:  # a checkpoint from before the generator was kept: a fresh stream (the run is no longer bit-identical)
            r.gen.manual_seed(derive_seed(tc.seed, "dead-codes", r.start))
        log.info("resumed from %s at step %d", r.ckpt, r.start)
    else:
        torch.manual_seed(derive_seed(tc.seed, "tokenizer-train"))
    r.log.resume_at(r.start)
    return r


def _tok_step(r: _TokRun, step: int, img: torch.Tensor):
    for g in r.opt.param_groups:
        g["lr"] = warmup_cosine(step, r.tc.lr, r.tc.warmup_steps, r.tc.steps)  # cosine to 10%
    rec, vq_loss, hits = r.vae(img)
    l1, l2 = F.l1_loss(rec, img), F.mse_loss(rec, img)
    loss = r.tc.recon_l1 * l1 + r.tc.recon_l2 * l2 + vq_loss
    if not torch.isfinite(loss):
        kept = kept_checkpoint_note(r.ckpt, r.last_ckpt)
        terms = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in (("l1", l1), ("l2", l2), ("vq", vq_loss)))
        raise NonFiniteLossError(f"tokenizer {r.work}: non-finite loss at step {step + 1} ({terms}); {kept}; lower the "
                                 f"learning rate or check the images")
    r.opt.zero_grad(set_to_none=True)
    loss.backward()
    if r.tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(r.vae.parameters(), r.tc.grad_clip)
    r.opt.step()
    return loss, l1, l2, vq_loss, hits


def _tok_loop(r: _TokRun, guard: PreemptionGuard, get_batch, n_images: int, stop_after: int | None,
              t0: float) -> dict | None:
    """The steps from ``r.start``; returns ``{'stopped_at': step}`` on ``stop_after``, None at the end."""
    tc = r.tc
    order = BatchOrder(n_images, tc.batch_size, tc.seed, Dist())
    log.info("tokenizer %s: %.2fM params, V=%d, patch_nums=%s, %d steps of batch %d on %s", r.run_hash,
             sum(p.numel() for p in r.vae.parameters()) / 1e6, r.cfg.vocab_size, r.cfg.patch_nums, tc.steps,
             tc.batch_size, r.dev)
    bar = progress(total=tc.steps, initial=r.start, desc="tokenizer", unit="step")
    steps_done = 0
    for step in range(r.start, tc.steps):
        img = get_batch(order.indices(step)).to(r.dev)
        loss, l1, l2, vq_loss, hits = _tok_step(r, step, img)
        done = step + 1
        steps_done += 1
        reseeded = 0
        if tc.dead_code_every and done % tc.dead_code_every == 0 and done < tc.dead_code_until * tc.steps:
            reseeded = reseed_dead_codes(r.vae, img, tc.dead_code_threshold, r.gen, tc.reseed_from)
        if done % tc.log_every == 0 or done == tc.steps:
            usage = (hits > 0).float().mean(1)
            loss_, l1_, l2_, vq_ = (t.detach() for t in (loss, l1, l2, vq_loss))
            rec_ = {"step": done, "loss": float(loss_), "l1": float(l1_), "l2": float(l2_), "vq": float(vq_),
                    "psnr": float(10 * torch.log10(4.0 / l2_.clamp_min(1e-10))), "usage_per_scale": usage.tolist(),
                    "reseeded": reseeded, "elapsed_s": round(time.time() - t0, 2)}
            r.log.append(rec_)
            bar.set_postfix(l2=f"{rec_['l2']:.4f}", psnr=f"{rec_['psnr']:.1f}")
        bar.update(1)
        if done % tc.ckpt_every == 0 and done < tc.steps:
            r.checkpoint(done)
        if guard.any_rank_requested(Dist(), r.dev):
            r.checkpoint(done)
            if guard.time_limit:
                requeue_slurm_job()
            exit_preempted(guard.requested)
        if stop_after is not None and steps_done >= stop_after:
            r.checkpoint(done)
            return {"stopped_at": done}
    bar.close()
    return None


def _tok_finish(r: _TokRun, out_model, val_images: torch.Tensor | None, t0: float) -> dict:
    """The model, the published log, ``summary.json`` (with held-out PSNR and code use) and provenance."""
    vae = r.vae.eval()
    summary = {"run_hash": r.run_hash, "steps": r.tc.steps, "params": sum(p.numel() for p in vae.parameters()),
               "wall_s_this_job": round(time.time() - t0, 2), "config": r.cfg.to_dict()}
    if val_images is not None and len(val_images):
        with torch.no_grad():
            v = val_images.to(r.dev)
            recon = torch.cat([vae.img_to_reconstructed_img(v[a:a + 64]) for a in range(0, len(v), 64)])
            mse = F.mse_loss(recon, v).item()
            idx = [torch.cat(t) for t in zip(*[vae.img_to_idxBl(v[a:a + 64]) for a in range(0, len(v), 64)])]
        summary["val_psnr"] = 10 * math.log10(4.0 / max(mse, 1e-10))
        summary["val_active_codes_per_scale"] = [int(t.unique().numel()) for t in idx]
    atomic_torch_save({"model": vae.state_dict(), "config": r.cfg.to_dict()}, out_model)
    r.log.publish()
    atomic_write_json(r.work / "summary.json", summary)
    write_provenance(out_model, config=r.config(), seed=r.tc.seed, device=str(r.dev), started=t0)
    discard_training_state(r.ckpt, r.log)  # last: see varup.training.loop._finish
    return summary


__all__ = ["train_tokenizer", "TokenizerTrainConfig", "reseed_dead_codes"]
