"""Training the VAR transformer on a token cache: the whole truth about training in one file.

The frozen tokenizer never runs here: batches are rows of the token cache (multi-scale index maps, see
:mod:`varup.tokens`), turned into the teacher-forcing input by the tokenizer's quantiser (embedding + Phi only).

Optimisation follows the official trainer: AdamW(0.9, 0.95) with weight decay on matrices and embeddings only,
the 'lin0' schedule (linear warm-up from ``warmup_start_ratio``, constant for 5% of the rest, then linear decay to
``final_lr_ratio``), gradient clipping, token-mean loss. The objective is :class:`varup.losses.UncertaintyLoss`.

Reliability:
* resumable: ``<out>/ckpt/last.pt`` holds weights, optimizer, step and RNG state, written atomically every
  ``ckpt_every`` steps; the data order is a pure function of (seed, epoch), so a killed job restarted from its last
  checkpoint reaches the same final weights as an uninterrupted one. A checkpoint written under another config
  (hash mismatch, e.g. after a loss hyper-parameter was edited) is set aside, never resumed.
* preemption: SIGTERM/SIGUSR1 → checkpoint after the current step → exit status 75 (retry resumes).
* a non-finite loss stops the job with a message naming the step and the loss components; no checkpoint is
  written after it, so the last good one stays.
* multi-GPU: started by torchrun, each rank takes its slice of every global batch; gradients are averaged (DDP),
  so the loss curve equals one process with the same global batch. Only rank 0 logs and writes files.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from varup.losses import LossConfig, UncertaintyLoss, load_references
from varup.models.var import VAR, VARConfig
from varup.models.vqvae import VQVAE, load_vqvae, split_tokens
from varup.runtime import (Dist, NonFiniteLossError, PreemptionGuard, autocast, autocast_dtype, exit_preempted,
                           init_distributed, load_training_state, rng_state, save_training_state, set_rng_state,
                           shutdown_distributed)
from varup.sample import derive_seed
from varup.tokens import TokenCache
from varup.utils import atomic_torch_save, atomic_write_json, config_hash, progress, write_provenance

log = logging.getLogger("varup.train")


@dataclass
class OptimConfig:
    steps: int = 1000
    batch_size: int = 64  # global, over all ranks
    lr: float = 1e-4  # peak learning rate (not scaled by the batch size; see README)
    lr_schedule: str = "lin0"  # lin0 | constant | cosine
    warmup_steps: int = 0
    warmup_start_ratio: float = 0.005
    final_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 2.0  # <= 0 disables
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    log_every: int = 10
    ckpt_every: int = 200
    nonfinite_check_every: int = 1  # host sync to check the loss; on GPU raise it to the log interval
    # official init multipliers (build_vae_var / train.py)
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0
    warm_start: bool = False  # start from the official ImageNet-1k var_d{depth}.pth (path given to train())

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.lr_schedule not in ("lin0", "constant", "cosine"):
            raise ValueError(f"train.lr_schedule must be lin0, constant or cosine, got {self.lr_schedule!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("train.steps and train.batch_size must be >= 1")


def lr_at(step: int, c: OptimConfig) -> float:
    """Learning rate of (0-based) step ``step``: the official 'lin0' schedule and two simpler ones."""
    peak = c.lr
    if step < c.warmup_steps:
        return peak * (c.warmup_start_ratio + (1 - c.warmup_start_ratio) * step / c.warmup_steps)
    if c.lr_schedule == "constant":
        return peak
    p = (step - c.warmup_steps) / max(1, c.steps - 1 - c.warmup_steps)
    if c.lr_schedule == "cosine":
        return peak * (c.final_lr_ratio + (1 - c.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))
    if p < 0.05:
        return peak
    return peak * (c.final_lr_ratio + (1 - c.final_lr_ratio) * (1 - p) / 0.95)


_NO_DECAY = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul", "ada_gss", "gamma", "beta")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Official grouping: no weight decay for 1-D parameters, biases and position/level/scale parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith("bias") or any(k in name for k in _NO_DECAY):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Prefetcher:
    """Gathers the token rows of upcoming steps in a background thread (memory-mapped cache -> int64 tensors,
    pinned on CUDA) so the copy to the device overlaps the current step and needs no host sync."""

    def __init__(self, cache: TokenCache, order: "BatchOrder", start: int, stop: int, device: torch.device, depth: int = 2):
        import concurrent.futures as cf

        self.cache, self.order, self.device = cache, order, device
        self.pin = device.type == "cuda"
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="varup-prefetch")
        self.pending = {s: self.pool.submit(self._load, s) for s in range(start, min(stop, start + depth))}
        self.stop, self.depth = stop, depth

    def _load(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.order.indices(step)
        tok = torch.from_numpy(np.asarray(self.cache.tokens[idx], dtype=np.int64))
        lab = torch.from_numpy(self.cache.labels[idx].astype(np.int64))
        return (tok.pin_memory(), lab.pin_memory()) if self.pin else (tok, lab)

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        tok, lab = (self.pending.pop(step) if step in self.pending else self.pool.submit(self._load, step)).result()
        nxt = step + self.depth
        if nxt < self.stop and nxt not in self.pending:
            self.pending[nxt] = self.pool.submit(self._load, nxt)
        return tok.to(self.device, non_blocking=True), lab.to(self.device, non_blocking=True)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class BatchOrder:
    """Deterministic data order: a fresh permutation per epoch from (seed, epoch); the batch of a step is a pure
    function of the step, so resuming needs no sampler state. Each rank takes a contiguous slice of the global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, d: Dist):
        if batch_size % d.world:
            raise ValueError(f"global batch {batch_size} is not divisible by the {d.world} ranks")
        if n < batch_size:
            raise ValueError(f"token cache has {n} rows, fewer than one global batch ({batch_size})")
        self.n, self.B, self.seed, self.d = n, batch_size, seed, d
        self.per_epoch = n // batch_size  # drop last
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=g).numpy(), epoch
        b = self._perm[j * self.B:(j + 1) * self.B]
        per = self.B // self.d.world
        return b[self.d.rank * per:(self.d.rank + 1) * per]


@dataclass
class RunSpec:
    """Everything one training job needs; built by the CLI from the validated config."""

    model: dict  # VARConfig fields (vocab/z_channels/patch_nums/num_classes are taken from tokenizer and data)
    loss: dict  # LossConfig fields
    optim: dict  # OptimConfig fields
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def hash(self) -> str:
        return config_hash(asdict(self))


def build_model(spec: RunSpec, vae: VQVAE, num_classes: int) -> VAR:
    m = dict(spec.model)
    m.update(vocab_size=vae.V, z_channels=vae.Cvae, patch_nums=tuple(vae.patch_nums), num_classes=num_classes)
    return VAR(VARConfig(**m))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be produced again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(k + "\n" for k in keep))


def train(spec: RunSpec, *, tokens_dir: str | os.PathLike, tokenizer: str | os.PathLike, references: str | os.PathLike | None,
          out_model: str | os.PathLike, work_dir: str | os.PathLike, device: str = "auto",
          warm_start_path: str | os.PathLike | None = None, stop_after: int | None = None) -> dict:
    """Train one run; writes ``out_model`` (plain state dict + config) and, in ``work_dir``: ``metrics.jsonl``,
    ``summary.json`` and ``ckpt/last.pt``. ``stop_after`` ends the job early after that many steps *of this
    process* (used by tests to simulate a kill) without writing the final model."""
    t_start = time.time()
    d, dev = init_distributed(device)
    oc = OptimConfig(**spec.optim)
    lc = LossConfig(**spec.loss)
    work = Path(work_dir)
    ckpt_path = work / "ckpt" / "last.pt"
    log_path = work / "metrics.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    run_hash = spec.hash()

    vae = load_vqvae(tokenizer, map_location="cpu")
    quant = vae.quantize.to(dev)  # only the codebook and Phi are needed for teacher forcing
    cache = TokenCache(tokens_dir, "train")
    if tuple(cache.patch_nums) != tuple(vae.patch_nums) or cache.vocab_size != vae.V:
        raise ValueError(f"token cache {tokens_dir} (patch_nums {cache.patch_nums}, V {cache.vocab_size}) was not "
                         f"made by tokenizer {tokenizer} (patch_nums {vae.patch_nums}, V {vae.V})")
    refs = load_references(references) if references else None

    torch.manual_seed(spec.seed)  # identical initialisation on every rank
    model = build_model(spec, vae, cache.num_classes)
    model.init_weights(oc.init_adaln, oc.init_adaln_gamma, oc.init_head, oc.init_std)
    if oc.warm_start:
        from varup.warmstart import warm_start

        if warm_start_path is None:
            raise ValueError("train.warm_start is set but no official checkpoint path was given (--warm-start)")
        warm_start(model, str(warm_start_path), class_map=cache.meta.get("imagenet1k_index"))
    model.to(dev)
    loss_fn = UncertaintyLoss(lc, vae.patch_nums, refs).to(dev)
    opt = torch.optim.AdamW(param_groups(model, oc.weight_decay), lr=oc.lr, betas=oc.betas,
                            **({"fused": True} if dev.type == "cuda" else {}))
    amp = autocast_dtype(oc.precision, dev)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**11) if amp == torch.float16 else None

    start = 0
    state = load_training_state(ckpt_path)
    if state is not None and state.get("extra", {}).get("run_hash") != run_hash:
        stale = ckpt_path.with_name(f"stale-{state.get('extra', {}).get('run_hash', 'unknown')}.pt")
        if d.is_main:
            log.warning("checkpoint %s was written under another configuration: moved to %s, starting afresh", ckpt_path, stale)
            os.replace(ckpt_path, stale)
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start = int(state["step"])
        log.info("resumed from %s at step %d", ckpt_path, start)
    if d.is_main:
        _truncate_log(log_path, start)
    # RNG streams: per rank, restored exactly on resume (class dropout, DropPath)
    torch.manual_seed(derive_seed(spec.seed, "train", d.rank))
    if state is not None:
        saved = state["extra"].get("rank_rng") or []
        if len(saved) != d.world:
            raise RuntimeError(f"{ckpt_path} was written by {len(saved)} rank(s); resume it with the same number "
                               f"of processes (now {d.world})")
        set_rng_state(saved[d.rank])

    net: torch.nn.Module = model
    if oc.compile:
        net = torch.compile(net)
    if d.enabled:
        net = DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    order = BatchOrder(len(cache), oc.batch_size, spec.seed, d)

    last_ckpt = start if state is not None else None

    def checkpoint(step: int) -> None:
        nonlocal last_ckpt
        rngs = [None] * d.world
        if d.enabled:  # every rank's RNG stream, so a resumed multi-process run continues each of them exactly
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if d.is_main:
            save_training_state(ckpt_path, model=model, optimizer=opt, step=step, config=asdict(spec),
                                extra={"run_hash": run_hash, "rank_rng": rngs}, scaler=scaler)
        last_ckpt = step

    n_params = model.num_params()
    log.info("run %s: VAR depth %d, %.2fM params, %d steps of global batch %d on %s (%d rank(s)), precision %s, "
             "loss %s", run_hash, model.depth, n_params / 1e6, oc.steps, oc.batch_size, dev, d.world,
             amp or "fp32", lc.to_dict())
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    t_loop, steps_done, tokens_seen = time.time(), 0, 0
    bar = progress(total=oc.steps, initial=start, desc=f"train {work.name}", unit="step", disable=not d.is_main)
    batches = Prefetcher(cache, order, start, oc.steps, dev)
    with PreemptionGuard() as guard:
        for step in range(start, oc.steps):
            tok, lab = batches.get(step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, oc)
            x = quant.idxBl_to_var_input(split_tokens(tok, vae.patch_nums))
            net.train()
            with autocast(dev, amp):
                logits = net(lab, x)
            out = loss_fn(logits, tok)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(out.total).backward()
                scaler.unscale_(opt)
            else:
                out.total.backward()
            gnorm = (torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip) if oc.grad_clip > 0
                     else torch.zeros((), device=dev))
            bad |= ~torch.isfinite(out.total.detach())
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            steps_done += 1
            tokens_seen += tok.numel() * d.world
            done = step + 1
            if done % oc.nonfinite_check_every == 0 or done % oc.log_every == 0 or done == oc.steps:
                if bool(bad):
                    raise NonFiniteLossError(
                        f"non-finite loss at step {done} (loss {float(out.total.detach()):.4g}, ce {float(out.ce):.4g}, "
                        f"l2nd {float(out.l2nd):.4g}, lse {float(out.lse):.4g}); the last good checkpoint "
                        f"({ckpt_path}, step {last_ckpt}) is kept; lower the learning rate or check the data")
            if done % oc.log_every == 0 or done == oc.steps:
                with torch.no_grad():
                    L_last = vae.patch_nums[-1] ** 2
                    acc = (logits.detach().argmax(-1) == tok).float().mean(0)  # (L,)
                    # one vector, averaged over ranks: the logged numbers are global-batch means (a sync per log step)
                    stats = torch.cat([torch.stack([out.total.detach(), out.ce, out.l2nd, out.lse]).float(),
                                       out.per_scale.reshape(-1).float(), acc.mean()[None], acc[-L_last:].mean()[None]])
                    if d.enabled:
                        dist.all_reduce(stats)
                        stats /= d.world
                    stats = stats.cpu()
                dt = time.time() - t_loop
                SN = len(vae.patch_nums)
                ps = stats[4:4 + 3 * SN].view(3, SN)
                rec = {"step": done, "lr": lr_at(step, oc), "loss": float(stats[0]), "ce": float(stats[1]),
                       "l2nd": float(stats[2]), "lse": float(stats[3]), "grad_norm": float(gnorm),
                       "acc_mean": float(stats[-2]), "acc_last": float(stats[-1]),
                       "per_scale": {"ce": ps[0].tolist(), "l2nd": ps[1].tolist(), "lse": ps[2].tolist()},
                       "imgs_per_s": steps_done * oc.batch_size / max(dt, 1e-9), "tokens_per_s": tokens_seen / max(dt, 1e-9),
                       "elapsed_s": round(time.time() - t_start, 2)}
                if d.is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", ce=f"{rec['ce']:.3f}", acc=f"{rec['acc_mean']:.3f}")
            bar.update(1)
            if done % oc.ckpt_every == 0 and done < oc.steps:
                checkpoint(done)
            if guard.any_rank_requested(d, dev):
                checkpoint(done)
                bar.close()
                batches.close()
                shutdown_distributed()
                exit_preempted(guard.requested or "signal on another rank")
            if stop_after is not None and steps_done >= stop_after:
                checkpoint(done)
                bar.close()
                batches.close()
                shutdown_distributed()
                return {"stopped_at": done}
    bar.close()
    batches.close()
    wall = time.time() - t_loop
    summary = {
        "run_hash": run_hash, "params": n_params, "params_m": round(n_params / 1e6, 3), "depth": model.depth,
        "global_batch": oc.batch_size, "world_size": d.world, "steps": oc.steps, "resumed_from": start,
        "steps_this_job": steps_done, "wall_s_this_job": round(wall, 2),
        "s_per_step": wall / max(steps_done, 1), "imgs_per_s": steps_done * oc.batch_size / max(wall, 1e-9),
        "steps_per_epoch": order.per_epoch, "epoch_s": wall / max(steps_done, 1) * order.per_epoch,
        "peak_mem_mb_per_device": round(_peak_memory_mb(dev), 1), "device": str(dev), "precision": str(amp or "fp32"),
        "final": {k: rec[k] for k in ("loss", "ce", "l2nd", "lse")} if steps_done else None,
    }
    if d.is_main:
        atomic_torch_save({"model": model.state_dict(), "config": model.cfg.to_dict(), "run": asdict(spec),
                           "run_hash": run_hash}, out_model)
        atomic_write_json(work / "summary.json", summary)
        write_provenance(out_model, config=asdict(spec), seed=spec.seed, device=str(dev), started=t_start)
        if ckpt_path.exists():
            ckpt_path.unlink()  # finished: the model file is the result
    shutdown_distributed()
    return summary


def load_model(path: str | os.PathLike, map_location="cpu") -> VAR:
    """A trained varup model (``{'model', 'config'}``), strictly."""
    from varup.models.common import load_strict, read_checkpoint

    obj = read_checkpoint(path, map_location)
    if not isinstance(obj, dict) or "config" not in obj or "model" not in obj:
        raise ValueError(f"{path}: not a varup model file (expected keys 'model' and 'config')")
    model = VAR(VARConfig(**obj["config"]))
    load_strict(model, obj["model"], str(path))
    return model.eval()


__all__ = ["train", "RunSpec", "OptimConfig", "lr_at", "param_groups", "BatchOrder", "load_model"]
