"""Training the VAR transformer on a token cache: the whole truth about training in one file.

The frozen tokenizer never runs here: batches are rows of the token cache (multi-scale index maps, see
:mod:`varup.tokenizer.tokens`), turned into the teacher-forcing input by the tokenizer's quantiser (embedding + Phi only).

Optimisation follows the official trainer: AdamW(0.9, 0.95) with weight decay on matrices and embeddings only,
the 'lin0' schedule (linear warm-up from ``warmup_start_ratio``, constant for 5% of the rest, then linear decay to
``final_lr_ratio``), gradient clipping, token-mean loss. The objective is :class:`varup.training.losses.UncertaintyLoss`.

Reliability:
* resumable: ``<out>/ckpt/last.pt`` holds weights, optimizer, step and RNG state, written atomically every
  ``ckpt_every`` steps; the data order is a pure function of (seed, epoch), so a killed job restarted from its last
  checkpoint reaches the same final weights as an uninterrupted one. A checkpoint written under another config
  (hash mismatch, e.g. after a loss hyper-parameter was edited) is set aside, never resumed.
* preemption and time limits: SIGTERM/SIGUSR1/SIGINT, or the Slurm time limit coming within
  ``stop_before_limit_s`` → checkpoint after the current step → exit status 75 (the retry resumes). The log so far
  lives beside the checkpoint (``ckpt/metrics.jsonl``) and becomes the declared ``metrics.jsonl`` at the end, so a
  resumed run keeps its whole loss curve.
* a non-finite loss stops the job with a message naming the step and the loss components; every checkpoint
  (periodic, preemption, stop) is written only after a finite-loss check, so the last good one stays
  (``ckpt_every`` must be a multiple of ``nonfinite_check_every``; unset, the check runs every
  gcd(``log_every``, ``ckpt_every``) steps: the log interval when ``ckpt_every`` is a multiple of it).
* no host sync in a step: the loss, the non-finite flag and the gradient norm stay on the device; they are read
  only on log and check steps, where with several ranks one all-reduce also agrees on a stop request (a signal
  or the Slurm clock, acted on at the next check step) and on the non-finite flag (every rank stops together).
* strength made visible: each log line carries :meth:`UncertaintyLoss.diagnostics` (the regularisers' values,
  their logit-gradient shares against CE, the predictive dispersion and entropy beside the reference's).
* memory (:mod:`varup.training.memplan`, ``varup plan-memory``): ``micro_batch`` splits this process's share of a
  batch into forward/backward passes whose loss is weighted by their share of the images, so the gradients, the
  logged loss and the non-finite check are the whole batch's (DDP all-reduces in the last one only);
  ``activation_checkpointing`` recomputes each block in the backward.
* multi-GPU: started by torchrun, each rank takes its slice of every global batch; gradients are averaged (DDP),
  so the loss curve equals one process with the same global batch. Only rank 0 logs and writes files. DDP
  (:func:`varup.base.runtime.wrap_ddp`) broadcasts no buffers per step (they are constants) and keeps gradients in
  its buckets; it is not told to look for unused parameters: the first step of a job checks that every trainable
  parameter got a gradient (:func:`params_without_grad`), and what a configuration never uses is frozen.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from varup.base.runtime import (
    Dist,
    NonFiniteLossError,
    PreemptionGuard,
    ResumableLog,
    SlurmClock,
    any_rank,
    autocast,
    autocast_dtype,
    discard_training_state,
    exit_preempted,
    init_distributed,
    kept_checkpoint_note,
    load_training_state,
    requeue_slurm_job,
    rng_state,
    save_training_state,
    set_rng_state,
    shutdown_distributed,
    wrap_ddp,
)
from varup.base.schedule import cosine
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
from varup.data.captions import CaptionTable
from varup.models.checkpoint import model_payload
from varup.models.common import check_labels
from varup.models.textenc import build_toy_encoder, vocabulary
from varup.models.textvar import CaptionedVAR, build_var
from varup.models.var import VAR, VARConfig
from varup.models.vqvae import VQVAE, load_vqvae, split_tokens
from varup.tokenizer.tokens import TokenCache
from varup.training.losses import LossConfig, LossOutput, UncertaintyLoss
from varup.training.references import load_references

log = logging.getLogger("varup.training.loop")


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
    nonfinite_check_every: int | None = None  # steps between finite-loss checks (host syncs); None: see below
    # official init multipliers (build_vae_var / train.py)
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0
    warm_start: bool = False  # start from the official ImageNet-1k var_d{depth}.pth (path given to train())
    # memory (varup.training.memplan): images per forward/backward on one process (None: its whole share of a
    # batch; "auto": the largest divisor of that share whose step the plan fits in the GPU's memory); gradients add
    # up to the whole batch's; and per-block activation checkpointing
    micro_batch: int | str | None = None
    activation_checkpointing: bool = False
    # steps whose weights are kept as <work>/snapshots/step<N>.pt (model.pt's format): the claim study's curve
    snapshots: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.snapshots = tuple(int(s) for s in self.snapshots)
        if self.lr_schedule not in ("lin0", "constant", "cosine"):
            raise ValueError(f"train.lr_schedule must be lin0, constant or cosine, got {self.lr_schedule!r}")
        if min(self.steps, self.batch_size, self.log_every, self.ckpt_every) < 1:
            raise ValueError("train.steps, train.batch_size, train.log_every and train.ckpt_every must be >= 1")
        if not (self.micro_batch is None or self.micro_batch == "auto"
                or (isinstance(self.micro_batch, int) and self.micro_batch >= 1)):
            raise ValueError(f"train.micro_batch must be an integer >= 1, 'auto' or null, got {self.micro_batch!r}")
        if self.nonfinite_check_every is None:  # unset: every log step and every checkpoint is a check step
            self.nonfinite_check_every = math.gcd(self.log_every, self.ckpt_every)
        if self.nonfinite_check_every < 1 or self.ckpt_every % self.nonfinite_check_every:
            raise ValueError(f"train.ckpt_every ({self.ckpt_every}) must be a multiple of train.nonfinite_check_every "
                             f"({self.nonfinite_check_every}): a checkpoint is only written after a finite-loss check")


def lr_at(step: int, c: OptimConfig) -> float:
    """Learning rate of (0-based) step ``step``: the official 'lin0' schedule and two simpler ones."""
    peak = c.lr
    if step < c.warmup_steps:
        return peak * (c.warmup_start_ratio + (1 - c.warmup_start_ratio) * step / c.warmup_steps)
    if c.lr_schedule == "constant":
        return peak
    p = (step - c.warmup_steps) / max(1, c.steps - 1 - c.warmup_steps)
    if c.lr_schedule == "cosine":
        return cosine(peak, p, c.final_lr_ratio)
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


def params_without_grad(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters (``requires_grad``) that the last backward left without a gradient."""
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


def check_all_trained(model: torch.nn.Module) -> None:
    """After a job's first backward: a trainable parameter without a gradient would never train (AdamW skips it)
    and breaks DDP (its bucket is never reduced: the ranks' weights part and the next step fails). Freeze what a
    configuration leaves unused instead (as :class:`varup.models.textvar.CaptionedVAR` does)."""
    missing = params_without_grad(model)
    if missing:
        raise RuntimeError(f"trainable parameter(s) {missing} got no gradient in this run's first step: the "
                           f"configuration never uses them; freeze them (requires_grad False) where the model is "
                           f"built for it (varup.models.textvar.CaptionedVAR freezes the learned null caption)")


class Prefetcher:
    """Gathers the token rows of upcoming steps in a background thread (memory-mapped cache -> int64 tensors,
    pinned on CUDA) so the copy to the device overlaps the current step and needs no host sync."""

    def __init__(self, cache: TokenCache, order: "BatchOrder", start: int, stop: int, device: torch.device, depth: int = 2,
                 cond_of: Callable[[int, np.ndarray], np.ndarray] | None = None):
        import concurrent.futures as cf

        self.cache, self.order, self.device = cache, order, device
        self.cond_of = cond_of or (lambda step, idx: cache.labels[idx])  # class labels, or drawn caption ids
        self.pin = device.type == "cuda"
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="varup-prefetch")
        self.pending = {s: self.pool.submit(self._load, s) for s in range(start, min(stop, start + depth))}
        self.stop, self.depth = stop, depth

    def _load(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.order.indices(step)
        tok = torch.from_numpy(np.asarray(self.cache.tokens[idx], dtype=np.int64))
        lab = torch.from_numpy(np.asarray(self.cond_of(step, idx), dtype=np.int64))
        return (tok.pin_memory(), lab.pin_memory()) if self.pin else (tok, lab)

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        tok, lab = (self.pending.pop(step) if step in self.pending else self.pool.submit(self._load, step)).result()
        nxt = step + self.depth
        if nxt < self.stop and nxt not in self.pending:
            self.pending[nxt] = self.pool.submit(self._load, nxt)
        return tok.to(self.device, non_blocking=True), lab.to(self.device, non_blocking=True)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class RunSpec:
    """Everything one training job needs; built by the CLI from the validated config."""

    model: dict  # VARConfig fields (vocab/z_channels/patch_nums/num_classes are taken from tokenizer and data)
    loss: dict  # LossConfig fields
    optim: dict  # OptimConfig fields
    seed: int = 0
    extra: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)  # text-conditioned runs: {encoder: {kind, ...}, null_condition}

    def hash(self) -> str:
        return config_hash(asdict(self))


def build_model(spec: RunSpec, vae: VQVAE, num_classes: int, text_dim: int = 0) -> VAR:
    m = dict(spec.model)
    m.update(vocab_size=vae.V, z_channels=vae.Cvae, patch_nums=tuple(vae.patch_nums), num_classes=num_classes,
             text_dim=text_dim)
    return build_var(VARConfig(**m))


def build_captioned(spec: RunSpec, vae: VQVAE, captions: CaptionTable, encoder_weights=None,
                    device: torch.device | str = "cpu") -> CaptionedVAR:
    """A text-conditioned run's module: the toy text encoder (trained with it) or CLIP's frozen embeddings of the
    caption table (encoded once, here), and a :class:`TextVAR` of the encoder's width."""
    enc = dict(spec.text.get("encoder") or {"kind": "toy"})
    kind = enc.pop("kind", "toy")
    null = spec.text.get("null_condition", "empty_caption")
    if kind == "toy":
        encoder = build_toy_encoder({**enc, "vocab": vocabulary(captions.captions)})
        return CaptionedVAR(build_model(spec, vae, 1, encoder.dim), captions.captions, encoder=encoder,
                            null_condition=null)
    if kind != "clip":
        raise ValueError(f"text.encoder.kind must be toy or clip, got {kind!r}")
    from varup.models.clip import ClipTextEncoder

    if encoder_weights is None:
        raise ValueError("text.encoder.kind is clip but no CLIP weights file was given (--text-encoder-weights)")
    clip = ClipTextEncoder(encoder_weights, arch=enc.get("arch", "ViT-L-14"), act=enc.get("act", "quick_gelu"),
                           device=device)
    table = torch.cat([clip.encode(captions.captions[i:i + 256]).cpu() for i in range(0, len(captions.captions), 256)])
    return CaptionedVAR(build_model(spec, vae, 1, clip.dim), captions.captions, table=table,
                        empty=clip.encode([""])[0].cpu(), null_condition=null)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@dataclass
class _Run:
    """What one training job holds between its steps (built by :func:`_setup`)."""

    d: Dist
    dev: torch.device
    oc: OptimConfig
    work: Path
    ckpt_path: Path
    log: ResumableLog
    run_hash: str
    vae: VQVAE
    quant: torch.nn.Module
    cache: TokenCache
    model: torch.nn.Module  # VAR, or CaptionedVAR for a text-conditioned run
    loss_fn: UncertaintyLoss
    opt: torch.optim.Optimizer
    amp: torch.dtype | None
    scaler: object
    start: int = 0
    last_ckpt: int | None = None
    bad: torch.Tensor | None = None
    cond_of: Callable[[int, np.ndarray], np.ndarray] | None = None  # step, token rows -> conditions (None: labels)
    micro: int | None = None  # images per forward/backward on this process (None: its whole share of a batch)


def _setup(spec: RunSpec, tokens_dir, tokenizer, references, work_dir, device, warm_start_path, captions=None,
           text_encoder_weights=None) -> _Run:
    """Model, loss, optimiser and token cache of one run, on its device (not yet resumed), and its micro-batch."""
    d, dev = init_distributed(device)
    oc = OptimConfig(**spec.optim)
    lc = LossConfig(**spec.loss)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    vae = load_vqvae(tokenizer, map_location="cpu")
    cache = TokenCache(tokens_dir, "train")
    cache.check_made_by(vae, tokenizer)
    refs = load_references(references) if references else None
    torch.manual_seed(spec.seed)  # identical initialisation on every rank
    model, cond_of = _build(spec, vae, cache, tokens_dir, captions, text_encoder_weights, dev)
    (model.var if isinstance(model, CaptionedVAR) else model).init_weights(oc.init_adaln, oc.init_adaln_gamma,
                                                                           oc.init_head, oc.init_std)
    if oc.warm_start:
        from varup.training.warmstart import warm_start

        if warm_start_path is None:
            raise ValueError("train.warm_start is set but no official checkpoint path was given (--warm-start)")
        warm_start(model, str(warm_start_path), class_map=cache.meta.get("imagenet1k_index"))
    model.to(dev)
    (model.var if isinstance(model, CaptionedVAR) else model).activation_checkpointing = oc.activation_checkpointing
    opt = torch.optim.AdamW(param_groups(model, oc.weight_decay), lr=oc.lr, betas=oc.betas,
                            **({"fused": True} if dev.type == "cuda" else {}))
    amp = autocast_dtype(oc.precision, dev)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**11) if amp == torch.float16 else None
    return _Run(d=d, dev=dev, oc=oc, work=work, ckpt_path=work / "ckpt" / "last.pt",
                log=ResumableLog(work / "ckpt" / "metrics.jsonl", work / "metrics.jsonl"),
                run_hash=spec.hash(), vae=vae, quant=vae.quantize.to(dev), cache=cache, model=model,
                loss_fn=UncertaintyLoss(lc, vae.patch_nums, refs).to(dev), opt=opt, amp=amp, scaler=scaler,
                bad=torch.zeros((), dtype=torch.bool, device=dev), cond_of=cond_of,
                micro=resolve_micro_batch(oc, model, d.world, dev, amp))


def resolve_micro_batch(oc: OptimConfig, model: torch.nn.Module, world: int, dev: torch.device,
                        amp: torch.dtype | None) -> int | None:
    """This process's micro-batch: ``train.micro_batch`` (capped at its share of a batch), or for ``auto`` the
    largest divisor of the share that :func:`varup.training.memplan.choose_micro_batch` fits in this GPU's memory
    (on the CPU: the whole share)."""
    share = oc.batch_size // world
    if oc.micro_batch is None or (oc.micro_batch == "auto" and dev.type != "cuda"):
        return None
    if oc.micro_batch != "auto":
        return min(int(oc.micro_batch), share)
    from varup.training.memplan import choose_micro_batch

    var = model.var if isinstance(model, CaptionedVAR) else model
    c = var.cfg
    gb = torch.cuda.get_device_properties(dev).total_memory / 1e9
    micro = choose_micro_batch(c.depth, share, gb, precision={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32"),
                               activation_checkpointing=oc.activation_checkpointing, patch_nums=c.patch_nums,
                               vocab=c.vocab_size, width=c.embed_dim, heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                               z_channels=c.z_channels, num_classes=c.num_classes)
    if micro is None:
        raise RuntimeError(f"train.micro_batch auto: not even one image per micro-batch fits this GPU's {gb:.0f} GB "
                           f"at depth {c.depth} (varup plan-memory); set train.activation_checkpointing: true")
    log.info("train.micro_batch auto: %d of this process's %d images per forward/backward (%.0f GB GPU)", micro,
             share, gb)
    return micro


def _build(spec: RunSpec, vae: VQVAE, cache: TokenCache, tokens_dir, captions, encoder_weights, dev):
    """The model and the per-step condition source: class labels, or one drawn caption per image."""
    if not spec.text:  # the model's forward reads no label range on a GPU (a host sync): checked here, once
        check_labels(torch.from_numpy(np.asarray(cache.labels)).long(), cache.num_classes, allow_null=False,
                     where=f"{tokens_dir}/train_labels.npy")
        return build_model(spec, vae, cache.num_classes), None
    if captions is None:
        raise ValueError("a text-conditioned run (spec.text) needs the dataset's caption table (--captions)")
    table = CaptionTable(captions)
    source = np.load(Path(tokens_dir) / "train_source.npy")
    if int(source.max()) >= len(table):
        raise ValueError(f"token cache {tokens_dir} refers to image {int(source.max())} of the train split; the "
                         f"caption table {captions} has {len(table)} images")
    model = build_captioned(spec, vae, table, encoder_weights, dev)
    return model, lambda step, idx: table.choose(source[idx], spec.seed, step)


def _resume(r: _Run, spec: RunSpec, out_model) -> None:
    """Load ``last.pt`` when it was written under this run's configuration and can be read (else it is set aside,
    for ``prev.pt`` if that one can: :func:`varup.base.runtime.load_training_state`, which also removes a killed
    job's temporary files), trim the log to its step, and restore this rank's RNG stream (class dropout, DropPath)
    exactly."""
    outputs = (r.log.published, r.work / "summary.json", Path(out_model), provenance_path(out_model))
    state = load_training_state(r.ckpt_path, run_hash=r.run_hash, d=r.d, outputs=outputs)
    if state is not None:
        r.model.load_state_dict(state["model"])
        try:
            r.opt.load_state_dict(state["optimizer"])
        except ValueError as e:  # another set of trainable parameters, same configuration: an older varup's
            raise RuntimeError(f"{r.ckpt_path}: its optimizer state does not fit this run's trainable parameters "
                               f"({e}); it was written by an older varup, which kept a parameter trainable that this "
                               f"configuration never uses (the learned null caption of a text run): delete it to start "
                               f"the run afresh") from e
        if r.scaler is not None and "scaler" in state:
            r.scaler.load_state_dict(state["scaler"])
        r.start = r.last_ckpt = int(state["step"])
        log.info("resumed from %s at step %d", r.ckpt_path, r.start)
    if r.d.is_main:
        r.log.resume_at(r.start)
    torch.manual_seed(derive_seed(spec.seed, "train", r.d.rank))
    if state is not None:
        saved = state["extra"].get("rank_rng") or []
        if len(saved) != r.d.world:
            raise RuntimeError(f"{r.ckpt_path} was written by {len(saved)} rank(s); resume it with the same number "
                               f"of processes (now {r.d.world})")
        set_rng_state(saved[r.d.rank])


def _check_finite(r: _Run, done: int, out, guard: PreemptionGuard | None = None) -> bool:
    """Raise (naming the step and the loss components) if any step since the last check had a non-finite loss on
    any rank; with ``guard``, also return whether any rank was asked to stop. One host read (and, with several
    ranks, one all-reduce) for both: every rank raises, or stops, at the same step."""
    bad, *stop = any_rank(r.d, r.dev, r.bad, *([guard.requested_here()] if guard is not None else []))
    if bad:
        where = f"on some rank; rank {r.d.rank}'s last step had " if r.d.enabled else ""
        raise NonFiniteLossError(
            f"non-finite loss at or before step {done} ({where}loss {float(out.total.detach()):.4g}, "
            f"ce {float(out.ce):.4g}, l2nd {float(out.l2nd):.4g}, lse {float(out.lse):.4g}); "
            f"{kept_checkpoint_note(r.ckpt_path, r.last_ckpt)}; lower the learning rate or check the data")
    return bool(stop and stop[0])


def _checkpoint(r: _Run, spec: RunSpec, step: int, out) -> None:
    """Write ``last.pt`` after a finite-loss check, so a NaN from an unchecked step never overwrites the last
    good checkpoint (every rank's RNG stream is saved, so a resumed multi-process run continues each exactly)."""
    _check_finite(r, step, out)
    rngs = [None] * r.d.world
    if r.d.enabled:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if r.d.is_main:
        save_training_state(r.ckpt_path, model=r.model, optimizer=r.opt, step=step, config=asdict(spec),
                            extra={"run_hash": r.run_hash, "rank_rng": rngs}, scaler=r.scaler)
    r.last_ckpt = step


def _global_mean(r: _Run, values: list) -> list:
    """Average a list of floats/tensors over ranks (one all-reduce): logged numbers are global-batch means."""
    v = torch.tensor([float(x) for x in values], dtype=torch.float64, device=r.dev)
    if r.d.enabled:
        dist.all_reduce(v)
        v /= r.d.world
    return v.cpu().tolist()


_DIAG_KEYS = ("gshare_2nd", "gshare_se", "gshare_2nd_per_lambda", "gshare_se_per_lambda", "pred_dispersion",
              "pred_entropy", "ref_dispersion", "ref_entropy")


def _log_record(r: _Run, step: int, logits, tok, out, gnorm, speed: dict) -> dict:
    """One line of ``metrics.jsonl``: the loss and its terms (from :meth:`UncertaintyLoss.diagnostics`, so a
    baseline logs the regularisers it does not train with), per scale, gradient shares, dispersion, accuracy."""
    diag = r.loss_fn.diagnostics(logits, tok)
    L_last = r.vae.patch_nums[-1] ** 2
    acc = (logits.detach().argmax(-1) == tok).float().mean(0)  # (L,)
    present = [k for k in _DIAG_KEYS if diag[k] is not None]
    head = [out.total.detach(), out.ce, diag["l2nd"], diag["lse"], acc.mean(), acc[-L_last:].mean()]
    flat = _global_mean(r, head + diag["per_scale"].reshape(-1).tolist() + [diag[k] for k in present])
    SN = len(r.vae.patch_nums)
    ps = torch.tensor(flat[6:6 + 3 * SN]).view(3, SN)
    rec = {"step": step, "lr": lr_at(step - 1, r.oc), "loss": flat[0], "ce": flat[1], "l2nd": flat[2], "lse": flat[3],
           "grad_norm": float(gnorm), "acc_mean": flat[4], "acc_last": flat[5],
           "per_scale": {"ce": ps[0].tolist(), "l2nd": ps[1].tolist(), "lse": ps[2].tolist()}}
    rec.update({k: None for k in _DIAG_KEYS})
    rec.update(dict(zip(present, flat[6 + 3 * SN:])))
    rec.update(speed)
    return rec


def _micro_slices(n: int, size: int | None) -> list[slice]:
    size = n if size is None else size
    return [slice(a, min(n, a + size)) for a in range(0, n, size)]


def _combine(parts: list[tuple[float, LossOutput]]) -> LossOutput:
    """The whole step's loss terms from its micro-batches' (each weighted by its share of the images)."""
    if len(parts) == 1:
        return parts[0][1]
    total, ce, l2nd, lse, per_scale = (sum(w * getattr(o, k).detach() for w, o in parts)
                                       for k in ("total", "ce", "l2nd", "lse", "per_scale"))
    return LossOutput(total=total, ce=ce, l2nd=l2nd, lse=lse, per_scale=per_scale)


def _train_step(r: _Run, net, step: int, tok, lab, keep_logits: bool = True):
    """One optimiser step in micro-batches of ``r.micro`` images: each one's token-mean loss is weighted by its
    share of this process's images, so the gradients add up to the whole batch's (under DDP only the last
    micro-batch all-reduces). Returns the logits (on ``keep_logits`` steps; detached and joined when split), the
    whole step's loss terms and the gradient norm; nothing in it reads a device value on the host."""
    for g in r.opt.param_groups:
        g["lr"] = lr_at(step, r.oc)
    net.train()
    r.opt.zero_grad(set_to_none=not r.d.enabled)  # under DDP the gradients stay views of its buckets, zeroed
    slices = _micro_slices(tok.shape[0], r.micro)
    parts, kept, logits = [], [], None
    for i, sl in enumerate(slices):
        share = (sl.stop - sl.start) / tok.shape[0]
        sync = net.no_sync() if r.d.enabled and i < len(slices) - 1 else contextlib.nullcontext()
        with sync:
            x = r.quant.idxBl_to_var_input(split_tokens(tok[sl], r.vae.patch_nums))
            with autocast(r.dev, r.amp):
                logits = net(lab[sl], x)
            out = r.loss_fn(logits, tok[sl])
            loss = out.total if len(slices) == 1 else out.total * share
            (r.scaler.scale(loss) if r.scaler is not None else loss).backward()
        parts.append((share, out))
        if keep_logits and len(slices) > 1:
            kept.append(logits.detach())
    out = _combine(parts)
    if r.scaler is not None:
        r.scaler.unscale_(r.opt)
    if step == r.start:
        check_all_trained(r.model)
    gnorm = (torch.nn.utils.clip_grad_norm_(r.model.parameters(), r.oc.grad_clip) if r.oc.grad_clip > 0
             else torch.zeros((), device=r.dev))
    r.bad |= ~torch.isfinite(out.total.detach())
    if r.scaler is not None:
        r.scaler.step(r.opt)
        r.scaler.update()
    else:
        r.opt.step()
    return (torch.cat(kept) if kept else logits), out, gnorm


def train(spec: RunSpec, *, tokens_dir: str | os.PathLike, tokenizer: str | os.PathLike, references: str | os.PathLike | None,
          out_model: str | os.PathLike, work_dir: str | os.PathLike, device: str = "auto",
          warm_start_path: str | os.PathLike | None = None, stop_after: int | None = None,
          stop_before_limit_s: float | None = None, captions: str | os.PathLike | None = None,
          text_encoder_weights: str | os.PathLike | None = None) -> dict:
    """Train one run; writes ``out_model`` (plain state dict + config) and, in ``work_dir``: ``metrics.jsonl``,
    ``summary.json`` and, while it runs, ``ckpt/last.pt`` with the log so far (``ckpt/metrics.jsonl``).
    ``stop_after`` ends the job early after that many steps *of this process* (used by tests to simulate a kill)
    without writing the final model. Inside a Slurm job, ``stop_before_limit_s`` before its time limit the job
    checkpoints and exits with status 75 (:class:`varup.base.runtime.SlurmClock`). A text-conditioned run
    (``spec.text``) takes the dataset's caption table directory ``captions`` (:mod:`varup.data.captions`) and, for
    a CLIP encoder, its weights file."""
    t_start = time.time()
    # the guard is up before the live log and the checkpoint directory exist: a signal while the run is set up is
    # honoured after its first step (checkpoint, exit 75), never by dying before the handler is installed
    with PreemptionGuard() as guard:
        r = _setup(spec, tokens_dir, tokenizer, references, work_dir, device, warm_start_path, captions,
                   text_encoder_weights)
        _resume(r, spec, out_model)
        guard.clock = SlurmClock.for_job(stop_before_limit_s) if r.d.is_main else None
        return _loop(r, spec, guard, out_model, stop_after, t_start)


def _loop(r: _Run, spec: RunSpec, guard: PreemptionGuard, out_model, stop_after: int | None, t_start: float) -> dict:
    """The steps from ``r.start``: log, checkpoint, and stop on a signal, the Slurm clock or ``stop_after``."""
    oc, d = r.oc, r.d
    net: torch.nn.Module = torch.compile(r.model) if oc.compile else r.model
    if d.enabled:
        net = wrap_ddp(net, r.dev)
    order = BatchOrder(len(r.cache), oc.batch_size, spec.seed, d)
    log.info("run %s: VAR depth %d, %.2fM params, %d steps of global batch %d on %s (%d rank(s)), precision %s, "
             "loss %s", r.run_hash, r.model.depth, r.model.num_params() / 1e6, oc.steps, oc.batch_size, r.dev, d.world,
             r.amp or "fp32", r.loss_fn.cfg.to_dict())
    t_loop, steps_done, tokens_seen, rec = time.time(), 0, 0, None
    bar = progress(total=oc.steps, initial=r.start, desc=f"train {r.work.name}", unit="step", disable=not d.is_main)
    batches = Prefetcher(r.cache, order, r.start, oc.steps, r.dev, cond_of=r.cond_of)
    for step in range(r.start, oc.steps):
        tok, lab = batches.get(step)
        done = step + 1
        log_now = done % oc.log_every == 0 or done == oc.steps
        logits, out, gnorm = _train_step(r, net, step, tok, lab, keep_logits=log_now)
        steps_done += 1
        tokens_seen += tok.numel() * d.world
        if log_now or done % oc.nonfinite_check_every == 0:  # a check step: the only host reads and collectives
            signalled = _check_finite(r, done, out, guard)
        else:  # one rank reads its own flag (no sync); several agree on the next check step
            signalled = not d.enabled and guard.requested_here()
        if log_now:
            dt = max(time.time() - t_loop, 1e-9)
            rec = _log_record(r, done, logits, tok, out, gnorm, {
                "imgs_per_s": steps_done * oc.batch_size / dt, "tokens_per_s": tokens_seen / dt,
                "elapsed_s": round(time.time() - t_start, 2)})
            if d.is_main:
                r.log.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", ce=f"{rec['ce']:.3f}", acc=f"{rec['acc_mean']:.3f}")
        bar.update(1)
        if done in oc.snapshots and done < oc.steps and d.is_main:
            atomic_torch_save({**model_payload(r.model), "run": asdict(spec), "run_hash": r.run_hash, "step": done},
                              r.work / "snapshots" / f"step{done}.pt")
        if done % oc.ckpt_every == 0 and done < oc.steps:
            _checkpoint(r, spec, done, out)
        stop = "signal" if signalled else ("stop_after" if stop_after is not None and steps_done >= stop_after else None)
        if stop:
            _checkpoint(r, spec, done, out)
            bar.close()
            batches.close()
            shutdown_distributed()
            if stop == "signal":
                if guard.time_limit and d.is_main:
                    requeue_slurm_job()
                exit_preempted(guard.requested or "stop requested on another rank")
            return {"stopped_at": done}
    bar.close()
    batches.close()
    summary = _finish(r, spec, out_model, order, steps_done, time.time() - t_loop, t_start, rec)
    shutdown_distributed()
    return summary


def _finish(r: _Run, spec: RunSpec, out_model, order: BatchOrder, steps_done: int, wall: float, t_start: float,
            rec: dict | None) -> dict:
    """Write the model, the log, ``summary.json`` and provenance; then drop ``last.pt`` (the model file is the
    result) and, last, the live log: a kill at any point leaves a checkpoint with the whole log or finished outputs."""
    n_params, oc = r.model.num_params(), r.oc
    summary = {
        "run_hash": r.run_hash, "params": n_params, "params_m": round(n_params / 1e6, 3), "depth": r.model.depth,
        "global_batch": oc.batch_size, "world_size": r.d.world, "steps": oc.steps, "resumed_from": r.start,
        "steps_this_job": steps_done, "wall_s_this_job": round(wall, 2),
        "s_per_step": wall / max(steps_done, 1), "imgs_per_s": steps_done * oc.batch_size / max(wall, 1e-9),
        "steps_per_epoch": order.per_epoch, "epoch_s": wall / max(steps_done, 1) * order.per_epoch,
        "peak_mem_mb_per_device": round(_peak_memory_mb(r.dev), 1), "device": str(r.dev),
        "precision": str(r.amp or "fp32"), "micro_batch": r.micro or oc.batch_size // r.d.world,
        "activation_checkpointing": oc.activation_checkpointing,
        "final": {k: rec[k] for k in ("loss", "ce", "l2nd", "lse", *_DIAG_KEYS)} if rec else None,
    }
    if r.d.is_main:
        atomic_torch_save({**model_payload(r.model), "run": asdict(spec), "run_hash": r.run_hash}, out_model)
        r.log.publish()
        atomic_write_json(r.work / "summary.json", summary)
        write_provenance(out_model, config=asdict(spec), seed=spec.seed, device=str(r.dev), started=t_start)
        discard_training_state(r.ckpt_path, r.log)
    return summary


__all__ = ["train", "RunSpec", "OptimConfig", "lr_at", "param_groups", "BatchOrder", "build_captioned"]
