"""Training a causal LM: the toy base model's pre-training and supervised fine-tuning with cross-entropy or with the
uncertainty-preserving objective.

* **The objective on tokens.** The loss is the image objective, unchanged: :class:`varup.training.losses.UncertaintyLoss`
  with one "scale" (``patch_nums = (1,)``) applied to the supervised tokens as a (N, 1, V) batch, so every term is a
  mean over the supervised tokens, as L_CE is. Its references come from the LM's input-embedding matrix by
  :func:`varup.training.references.build_references`, the function that builds them from a VQVAE codebook: ``semantic`` s* per
  target token from a Gaussian kernel in embedding space (τ = median nearest-neighbour distance), k-means clusters
  of the embeddings for L_SE, and ``dataset`` s* from the unigram histogram of the supervised target tokens
  (:func:`lm_references`). Which tokens are supervised is ``lm.loss_tokens``: ``response`` (the prompt is masked,
  the usual SFT) or ``all``.
* **Data.** Records in the LM arm's common format (``prompt``, ``response``; :mod:`varup.lm.dolly`) are tokenised
  once as ``prompt + response + eos``, cut to ``lm.max_length`` tokens, right-padded; the pre-training text is one
  line per sequence. The batch of a step is a pure function of (seed, step) (:class:`varup.data.batches.BatchOrder`).
* **A step** runs this process's share of the batch in micro-batches of ``lm.train.micro_batch`` sequences (gradients
  accumulated: the loss is the mean over all trained tokens of the global batch, as unsplit) and the LM head only on
  the positions whose label is trained, ``lm.train.head_chunk`` of them at a time with the objective
  (:mod:`varup.lm.headloss`): no batch × length × V logits, no float32 copy of them, nothing of a step kept into
  the next; the log line's statistics come from the same chunks. :mod:`varup.lm.memory` estimates a step's peak.
* **Runs** resume from ``ckpt/last.pt`` like the image trainer's (weights, optimiser, RNG, step; the loss log lives
  beside the checkpoint), stop on SIGTERM/SIGUSR1/SIGINT or before a Slurm time limit with exit 75, and use DDP when
  started by torchrun. The result is a ``save_pretrained`` folder (model and tokenizer), written whole or not at all.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from varup.base.runtime import (
    Dist,
    NonFiniteLossError,
    PreemptionGuard,
    ResumableLog,
    SlurmClock,
    autocast,
    autocast_dtype,
    discard_training_state,
    exit_preempted,
    init_distributed,
    kept_checkpoint_note,
    load_training_state,
    requeue_slurm_job,
    save_training_state,
    set_rng_state,
    shutdown_distributed,
    unwrap,
)
from varup.base.schedule import warmup_cosine
from varup.base.utils import (
    atomic_write_json,
    config_hash,
    is_out_of_space,
    no_space_error,
    progress,
    provenance_path,
    write_provenance,
)
from varup.data.batches import BatchOrder
from varup.lm.headloss import STATS, head_loss
from varup.training.losses import LossConfig, UncertaintyLoss
from varup.training.references import build_references

log = logging.getLogger("varup.lm.sft")
IGNORE = -100  # label of an unsupervised position (prompt or padding)
LOSS_TOKENS = ("response", "all")


@dataclass
class LMTrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    max_length: int = 64
    loss_tokens: str = "response"
    log_every: int = 25
    ckpt_every: int = 250
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast on CUDA; CPU runs in fp32)
    seed: int = 0
    loss: dict = field(default_factory=dict)  # LossConfig keys; empty = cross-entropy
    micro_batch: int | None = None  # sequences per forward/backward on one process (None: its whole share of a batch)
    head_chunk: int | None = 2048  # trained positions per LM-head + objective chunk (None: a micro-batch's at once)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.loss_tokens not in LOSS_TOKENS:
            raise ValueError(f"lm.loss_tokens must be one of {LOSS_TOKENS}, got {self.loss_tokens!r}")
        for key in ("micro_batch", "head_chunk"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"lm.train.{key} must be an integer >= 1 or null, got {v!r}")
        LossConfig(**self.loss)  # fails here, naming the key, not mid-run


# ------------------------------------------------------------------------------------------- data
def encode_records(tokenizer, records: list[dict], max_length: int, loss_tokens: str = "response") -> dict:
    """``prompt + response + eos`` per record -> input_ids, labels (IGNORE on the prompt with ``response``, and on
    padding), attention_mask; (N, T) int64 tensors, T = the longest sequence (at most ``max_length``)."""
    rows = []
    for r in records:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        a = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + a)[:max_length]
        lab = ([IGNORE] * len(p) + a)[:max_length] if loss_tokens == "response" else list(ids)
        rows.append((ids, lab))
    return _pad(rows, tokenizer.pad_token_id)


def encode_lines(tokenizer, lines: list[str], max_length: int) -> dict:
    """Plain text, one sequence per line (+ eos), every token supervised."""
    rows = []
    for line in lines:
        ids = (tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
        rows.append((ids, list(ids)))
    return _pad(rows, tokenizer.pad_token_id)


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        ids[i, :len(a)], lab[i, :len(b)], att[i, :len(a)] = torch.tensor(a), torch.tensor(b), 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}


# ------------------------------------------------------------------------------------- the objective
def lm_references(embedding: torch.Tensor, targets: torch.Tensor, *, num_clusters: int = 64, cluster_seed: int = 0,
                  support_k: float | None = None, device: torch.device | str = "cpu") -> dict:
    """The objective's references from an LM's (V, E) input-embedding matrix, as from a codebook; ``targets``: the
    supervised target tokens (any shape), whose unigram histogram is the ``dataset`` reference (one "scale").

    The embedding matrix (float32) and the chunked V x V kernels run on ``device`` (the job's GPU: about 47 min on
    the CPU for Qwen2's 151,936 tokens); k-means runs on the CPU (scikit-learn). Every tensor returned is on the CPU."""
    t = targets[targets != IGNORE].reshape(-1, 1).cpu()
    refs = build_references(embedding.detach().to(device=device, dtype=torch.float32), t, (1,),
                            num_clusters=num_clusters, cluster_seed=cluster_seed, support_k=support_k)
    return {k: v.cpu() for k, v in refs.items()}


def token_objective(loss_cfg: dict, refs: dict | None) -> UncertaintyLoss:
    """The image objective with one scale: applied to (N, 1, V) logits of the supervised tokens (:func:`lm_loss`)."""
    return UncertaintyLoss(LossConfig(**loss_cfg), (1,), refs)


def lm_loss(loss_fn: UncertaintyLoss, logits_BTV: torch.Tensor, labels_BT: torch.Tensor):
    """Next-token objective: position t predicts label t+1; only supervised positions (label != IGNORE) count."""
    z, y = logits_BTV[:, :-1], labels_BT[:, 1:]
    keep = y != IGNORE
    return loss_fn(z[keep].unsqueeze(1), y[keep].unsqueeze(1))


# ---------------------------------------------------------------------------------------- training
@dataclass
class _LMRun:
    d: Dist
    dev: torch.device
    oc: LMTrainConfig
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    loss_fn: UncertaintyLoss
    data: dict
    work: Path
    ckpt: Path
    log: ResumableLog
    run_hash: str
    amp: torch.dtype | None
    start: int = 0
    last_ckpt: int | None = None  # the step of the checkpoint a retry would resume from


def fit(model, tokenizer, data: dict, oc: LMTrainConfig, *, refs: dict | None, out_dir, work_dir, device: str = "auto",
        run_config: dict | None = None, stop_after: int | None = None, stop_before_limit_s: float | None = None) -> dict:
    """Train ``model`` on ``data`` (:func:`encode_records` / :func:`encode_lines`) and write it with ``tokenizer`` to
    ``out_dir`` (``save_pretrained``); ``work_dir`` holds the checkpoint while it runs and then ``metrics.jsonl``
    and ``summary.json``. Resumes from ``work_dir/ckpt/last.pt`` (of the same run config only)."""
    t0 = time.time()
    with PreemptionGuard() as guard:
        r = _setup(model, data, oc, refs, work_dir, out_dir, device, run_config)
        guard.clock = SlurmClock.for_job(stop_before_limit_s) if r.d.is_main else None
        stopped = _loop(r, guard, stop_after, t0)
        if stopped is not None:
            return stopped
        return _finish(r, tokenizer, out_dir, run_config, t0)


def _setup(model, data, oc: LMTrainConfig, refs, work_dir, out_dir, device, run_config) -> _LMRun:
    """The run on its device, resumed from ``ckpt/last.pt`` when there is one of this run config (a killed job's
    temporary files are removed first)."""
    d, dev = init_distributed(device)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model.to(dev).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": oc.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=oc.lr, betas=oc.betas)
    r = _LMRun(d=d, dev=dev, oc=oc, model=model, opt=opt, loss_fn=token_objective(oc.loss, refs).to(dev), data=data,
               work=work, ckpt=work / "ckpt" / "last.pt", log=ResumableLog(work / "ckpt" / "metrics.jsonl",
                                                                             work / "metrics.jsonl"),
               run_hash=config_hash(run_config or asdict(oc)), amp=autocast_dtype(oc.precision, dev))
    outputs = (r.log.published, work / "summary.json", Path(out_dir), provenance_path(out_dir))
    state = load_training_state(r.ckpt, run_hash=r.run_hash, outputs=outputs)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        r.start = r.last_ckpt = int(state["step"])
        log.info("resumed from %s at step %d", r.ckpt, r.start)
    else:
        torch.manual_seed(oc.seed)
    if d.is_main:
        r.log.resume_at(r.start)
    return r


class SFTObjective(torch.nn.Module):
    """The causal LM's body, then its LM head and the objective on the trained positions only, in chunks
    (:func:`varup.lm.headloss.head_loss`): what a step runs, and what DDP wraps (its parameters are the LM's)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, labels, loss_fn: UncertaintyLoss, chunk: int | None, denom: int,
                entropy: bool = False):
        """(the objective of these sequences' trained tokens, summed and divided by ``denom``; :data:`STATS` alike):
        position t predicts label t+1, as :func:`lm_loss`."""
        h = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        y = labels[:, 1:]
        keep = y != IGNORE
        return head_loss(h[:, :-1][keep], self.lm.get_output_embeddings(), y[keep], loss_fn, chunk=chunk, denom=denom,
                         entropy=entropy)


def freeze_unused_parameters(obj: SFTObjective, data: dict, loss_fn: UncertaintyLoss, dev, amp) -> list[str]:
    """Freeze (requires_grad False) the parameters that the objective gives no gradient, found by one forward and
    backward on the first sequence (the RNG state restored, the gradients dropped); returns their names. DDP then
    syncs the trained parameters only, with no search for unused ones in every step."""
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        b = {k: v[:1].to(dev) for k, v in data.items()}
        with autocast(dev, amp):
            loss, _ = obj(b["input_ids"], b["attention_mask"], b["labels"], loss_fn, None, 1)
        loss.backward()
    unused = [n for n, p in obj.lm.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in obj.lm.named_parameters():
        if n in unused:
            p.requires_grad_(False)
    obj.lm.zero_grad(set_to_none=True)
    if unused:
        log.warning("frozen, as the objective gives them no gradient: %s", ", ".join(unused))
    return unused


def _micro_batches(n: int, size: int | None) -> list[slice]:
    size = n if size is None else size
    return [slice(a, min(n, a + size)) for a in range(0, n, size)]


def _step(r: _LMRun, net, step: int, idx, stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step over this rank's share of the batch, in micro-batches whose gradients add up (DDP syncs
    once, in the last); returns the :data:`STATS` (this rank's token means; the entropy only when ``stats``), the
    gradient norm and this rank's share of the global batch's supervised tokens (1 on one process)."""
    for g in r.opt.param_groups:
        g["lr"] = warmup_cosine(step, r.oc.lr, r.oc.warmup_steps, r.oc.steps)  # cosine to 10%
    b = {k: v[torch.as_tensor(idx)].to(r.dev) for k, v in r.data.items()}
    n = (b["labels"][:, 1:] != IGNORE).sum()
    share = _token_share(r.d, n)
    n = int(n)
    r.opt.zero_grad(set_to_none=True)
    parts = _micro_batches(len(idx), r.oc.micro_batch)
    sums = torch.zeros(len(STATS), device=r.dev)
    for i, part in enumerate(parts):
        mb = {k: v[part] for k, v in b.items()}
        T = int(mb["attention_mask"].sum(1).max())  # drop the columns that are padding in the whole micro-batch
        mb = {k: v[:, :T] for k, v in mb.items()}
        sync = net.no_sync() if r.d.enabled and i < len(parts) - 1 else contextlib.nullcontext()
        with sync:
            with autocast(r.dev, r.amp):
                loss, s = net(mb["input_ids"], mb["attention_mask"], mb["labels"], r.loss_fn, r.oc.head_chunk, n,
                              stats)
            # the loss is this micro-batch's share of this rank's token mean; DDP averages the ranks' gradients:
            # weighting by world x this rank's share of the tokens makes that the gradient of the global batch's
            # token mean, as on one process, however the tokens fall on the ranks and micro-batches
            (loss * share * r.d.world).backward()
        sums = s if len(parts) == 1 else sums + s
        del loss, s
    gnorm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), r.oc.grad_clip) if r.oc.grad_clip > 0 else torch.zeros(())
    r.opt.step()
    return sums, gnorm, share


def _token_share(d: Dist, n: torch.Tensor) -> torch.Tensor:
    """This rank's supervised tokens over the global batch's (one all-reduce; 1 without DDP)."""
    if not d.enabled:
        return torch.ones((), device=n.device)
    total = n.detach().float().clone()
    torch.distributed.all_reduce(total)
    return n.float() / total


def _record(r: _LMRun, done: int, sums, gnorm, share, t0: float) -> dict:
    """A log line: the loss terms and the predictive entropy of the trained positions as global-batch token means
    (share-weighted sums over the ranks)."""
    v = sums.detach().float() * share
    if r.d.enabled:
        torch.distributed.all_reduce(v)
    vals = dict(zip(STATS, v.tolist()))
    return {"step": done, **{k: vals[k] for k in ("loss", "ce", "l2nd", "lse")}, "grad_norm": float(gnorm),
            "pred_entropy": vals["pred_entropy"], "elapsed_s": round(time.time() - t0, 2)}


def _checkpoint(r: _LMRun, done: int) -> None:
    if r.d.is_main:
        save_training_state(r.ckpt, model=r.model, optimizer=r.opt, step=done, config=asdict(r.oc),
                            extra={"run_hash": r.run_hash})
    r.last_ckpt = done


def _loop(r: _LMRun, guard: PreemptionGuard, stop_after: int | None, t0: float) -> dict | None:
    oc, d = r.oc, r.d
    net = SFTObjective(r.model)
    if d.enabled:
        freeze_unused_parameters(net, r.data, r.loss_fn, r.dev, r.amp)
        net = DDP(net, device_ids=[r.dev.index] if r.dev.type == "cuda" else None)
    order = BatchOrder(len(r.data["input_ids"]), oc.batch_size, oc.seed, d)
    bar = progress(total=oc.steps, initial=r.start, desc=f"lm {r.work.name}", unit="step", disable=not d.is_main)
    steps_done = 0
    for step in range(r.start, oc.steps):
        done, steps_done = step + 1, steps_done + 1
        log_step = done % oc.log_every == 0 or done == oc.steps
        sums, gnorm, share = _step(r, net, step, order.indices(step), log_step)
        if not torch.isfinite(sums[0]):
            kept = kept_checkpoint_note(r.ckpt, r.last_ckpt)
            raise NonFiniteLossError(f"lm {r.work}: non-finite loss at step {done}; {kept}; lower the learning rate "
                                     f"or check the data")
        if log_step:
            rec = _record(r, done, sums, gnorm, share, t0)  # every rank joins the all-reduce
            if d.is_main:
                r.log.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", ce=f"{rec['ce']:.3f}")
        bar.update(1)
        if done % oc.ckpt_every == 0 and done < oc.steps:
            _checkpoint(r, done)
        signalled = guard.any_rank_requested(d, r.dev)
        if signalled or (stop_after is not None and steps_done >= stop_after):
            _checkpoint(r, done)
            bar.close()
            if signalled:
                shutdown_distributed()
                if guard.time_limit and d.is_main:
                    requeue_slurm_job()
                exit_preempted(guard.requested or "stop requested on another rank")
            return {"stopped_at": done}
    bar.close()
    return None


def save_folder(model, tokenizer, out_dir) -> None:
    """``save_pretrained`` of model and tokenizer into a sibling temp folder, then renamed: whole or not at all (a
    failed write removes the temp folder; out of space, :class:`varup.base.utils.NoSpaceError` names the folder)."""
    from varup.lm.hub import quiet_transformers

    quiet_transformers()
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unwrap(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    except Exception as e:
        full = is_out_of_space(e, out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise no_space_error(out, e) from e
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _finish(r: _LMRun, tokenizer, out_dir, run_config, t0: float) -> dict:
    summary = {"run_hash": r.run_hash, "steps": r.oc.steps, "wall_s_this_job": round(time.time() - t0, 2),
               "params": sum(p.numel() for p in r.model.parameters()), "n_sequences": len(r.data["input_ids"]),
               "supervised_tokens": int((r.data["labels"] != IGNORE).sum()), "config": asdict(r.oc)}
    if r.d.is_main:
        save_folder(r.model.eval(), tokenizer, out_dir)
        r.log.publish()
        atomic_write_json(r.work / "summary.json", summary)
        write_provenance(out_dir, config=run_config or asdict(r.oc), seed=r.oc.seed, device=str(r.dev), started=t0)
        discard_training_state(r.ckpt, r.log)  # last: see varup.training.loop._finish
    shutdown_distributed()
    return summary


__all__ = ["LMTrainConfig", "encode_records", "encode_lines", "lm_references", "token_objective",
           "lm_loss", "fit", "save_folder", "SFTObjective", "freeze_unused_parameters", "IGNORE", "LOSS_TOKENS"]
