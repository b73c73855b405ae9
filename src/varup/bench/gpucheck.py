"""``varup gpu-check``: the GPU acceptance run, one call on one GPU with no network (under 8 minutes on an H100).

Sections (each in its own try/except: one failure does not stop the rest; each prints one line
``PASS|FAIL|SKIP <section> <key figures>`` and adds a record to the JSON file; the exit code is 1 when any
section FAILed):

1. ``ceilings`` — matmul TFLOP/s (bf16 and fp32 with TF32 on CUDA; fp32 on CPU): :func:`suite.ceilings_benchmark`.
2. ``train_d16`` — d16 training at batch 64, eager and ``torch.compile``d, bf16, CE only and the full objective
   (:func:`suite.train_benchmark`), and the official recipe (``bench --plain``: fp16 + GradScaler, TF32, fused
   AdamW, VQVAE in the step): img/s, MFU against the measured ceiling and against 800 TFLOP/s, peak memory, the
   compiled step's Dynamo graph breaks, full/CE. PASS = every variant ran with finite losses and no graph break.
   The issue's targets (compiled MFU ≥ 45 %, ≥ 2 × the official recipe's img/s, full ≤ 1.05 × CE) are reported
   met/missed, never failed on.
3. ``train_d20`` — a d20 step at the paper's per-GPU batch (768 over 8 GPUs = 96) in bf16, the whole batch at
   once, its measured peak beside the trainer's memory plan (``varup.training.memplan.plan_step``: the estimated
   peak, and the micro-batch ``choose_micro_batch`` would pick on this GPU); an out-of-memory error is a FAIL naming
   it and the plan.
4. ``sample`` — CFG 1.5, top-k 900, top-p 0.95 in the pipeline's precision (bf16 on CUDA) at batch 64 and 256:
   img/s; the same seed twice gives identical tokens (PASS needs that).
5. ``ddp`` — class VAR, text VAR (null condition ``empty_caption`` and ``learned``) and LM SFT, each trained a few
   steps by the real trainers under DistributedDataParallel at world size 1 (NCCL on CUDA, gloo on CPU) on tiny
   assets built in a temporary folder. The trainers use DDP only when the world has several ranks, so here they see
   a one-rank world that reports itself distributed (:func:`ddp_world_one`): the process group, the DDP wrapper,
   its all-reduces and the per-rank checkpoint state are the real ones. The LM family needs ``transformers``: SKIP
   with the reason where it is missing.
6. ``resume`` — class VAR trained N steps in one go vs killed at step k (the trainer's ``stop_after``) and resumed:
   same curve steps, and the weights: bit-identical required on CPU; on CUDA (whose kernels, e.g. the embedding
   backward's atomics, need not be deterministic) a second uninterrupted run measures the run-to-run noise, and the
   resumed run must be within 2 × that noise (+1e-6 · max|w|): a resume that lost state (optimizer moments, RNG,
   data order) moves the weights by whole AdamW updates, far beyond it.

``--tiny`` runs every section's code on CPU with depth 1-2 models (about a minute on 2 cores; the test suite runs
it); the compiled step is traced with Dynamo's ``eager`` backend there (graph breaks counted, no code generation).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence
from unittest import mock

import numpy as np
import torch

from varup.base.runtime import resolve_device, tf32_matmuls
from varup.bench import suite

SECTIONS = ("ceilings", "train_d16", "train_d20", "sample", "ddp", "resume")
VENDOR_BF16_TFLOPS = 800.0  # the MFU denominator the issue names beside the measured ceiling
PAPER_PER_GPU_BATCH = 96  # config/paper.yaml: 768 global over 8 GPUs

#: sizes: full = the official sizes on CUDA; tiny = depth 1-2 on CPU
FULL = {"depth": 16, "batch": 64, "patch_nums": suite.OFFICIAL_PN, "vocab": 4096, "num_classes": 1000,
        "warmup": 3, "repeats": 10, "matmul": 8192, "copy_mib": 1024, "sample_batches": (64, 256), "d20": 20,
        "d20_batch": PAPER_PER_GPU_BATCH, "compile": True, "vae": "official", "precision": "bf16",
        "ddp_model": {"depth": 4, "embed_dim": 256, "num_heads": 4}, "ddp_steps": 6, "resume_steps": 12,
        "resume_kill": 5}
TINY = {"depth": 1, "batch": 2, "patch_nums": (1, 2, 3, 4), "vocab": 64, "num_classes": 10, "warmup": 1,
        "repeats": 1, "matmul": 128, "copy_mib": 4, "sample_batches": (2, 4), "d20": 2, "d20_batch": 4,
        "compile": "eager", "vae": "small", "precision": "auto",
        "ddp_model": {"depth": 1, "embed_dim": 32, "num_heads": 2}, "ddp_steps": 4, "resume_steps": 8,
        "resume_kill": 3}
CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a small red circle", "a large blue square"]


def _finite(*vals: float) -> bool:
    return all(v is not None and math.isfinite(v) for v in vals)


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


# ------------------------------------------------------------------------------------------- sections
def check_ceilings(ctx: dict) -> tuple[bool, str, dict]:
    z = ctx["sizes"]
    dtypes = ("bf16", "fp32") if ctx["dev"].type == "cuda" else ("fp32",)
    with contextlib.ExitStack() as st:
        if ctx["dev"].type == "cuda":
            st.enter_context(tf32_matmuls(ctx["dev"]))
        c = suite.ceilings_benchmark(ctx["dev"], matmul_size=z["matmul"], copy_mib=z["copy_mib"], dtypes=dtypes,
                                     warmup=z["warmup"], repeats=z["repeats"])
    ctx["ceilings"] = c
    ok = all(_finite(v) and v > 0 for v in c["matmul_tflops"].values())
    figs = " ".join(f"{k} {v:.1f} TFLOP/s" for k, v in c["matmul_tflops"].items())
    return ok, f"{figs}; copy {c['copy_gbps']:.0f} GB/s", c


def _train_kw(ctx: dict) -> dict:
    z = ctx["sizes"]
    return dict(patch_nums=z["patch_nums"], vocab=z["vocab"], num_classes=z["num_classes"], device=str(ctx["dev"]),
                warmup=z["warmup"], repeats=z["repeats"], ceilings=ctx.get("ceilings"),
                peak=None if ctx.get("ceilings") else 1.0)


def _train_figures(r: dict) -> dict:
    """The figures of one train_benchmark record that gpu-check reports."""
    keep = ("mode", "precision", "compile", "recipe", "batch", "depth", "imgs_per_s_ce", "imgs_per_s_full",
            "mfu_ce", "mfu_full", "tflops_ce", "tflops_full", "ce_only_peak_mem_gb", "full_objective_peak_mem_gb",
            "ratio_full_vs_ce", "loss_ce_only", "loss_full_objective", "ce_only_s", "full_objective_s")
    out = {k: r.get(k) for k in keep}
    out["mfu_800_ce"] = r["tflops_ce"] / VENDOR_BF16_TFLOPS
    out["mfu_800_full"] = r["tflops_full"] / VENDOR_BF16_TFLOPS
    return out


def compiled_train(ctx: dict, depth: int, batch: int) -> dict:
    """The compiled training benchmark with Dynamo's graph-break counter read over it."""
    from torch._dynamo.utils import counters

    counters.clear()
    r = suite.train_benchmark(depth, batch, precision=ctx["sizes"]["precision"], compile=ctx["sizes"]["compile"],
                              **_train_kw(ctx))
    r = _train_figures(r)
    r["graph_breaks"] = int(sum(counters["graph_break"].values()))
    r["graph_break_reasons"] = sorted(counters["graph_break"])[:10]
    return r


def check_train_d16(ctx: dict) -> tuple[bool, str, dict]:
    z = ctx["sizes"]
    d, b = z["depth"], z["batch"]
    eager = _train_figures(suite.train_benchmark(d, b, precision=z["precision"], **_train_kw(ctx)))
    comp = compiled_train(ctx, d, b)
    plain = _train_figures(suite.train_benchmark(d, b, plain=True, vae=z["vae"], **_train_kw(ctx)))
    runs = {"eager": eager, "compiled": comp, "official_recipe": plain}
    finite = all(_finite(r["loss_ce_only"], r["loss_full_objective"], r["ce_only_s"], r["full_objective_s"])
                 for r in runs.values())
    targets = {"compiled_mfu_ge_45pct": _met((comp["mfu_ce"] or 0) >= suite.TARGETS["train_mfu"]),
               "compiled_mfu800_ge_45pct": _met(comp["mfu_800_ce"] >= suite.TARGETS["train_mfu"]),
               "compiled_ge_2x_official": _met(comp["imgs_per_s_ce"] >= 2 * plain["imgs_per_s_ce"]),
               "full_le_1.05x_ce": _met(comp["ratio_full_vs_ce"] <= suite.TARGETS["full_vs_ce"])}
    rec = {**runs, "graph_breaks": comp["graph_breaks"], "finite": finite, "targets": targets,
           "compiled_vs_official_imgs": comp["imgs_per_s_ce"] / plain["imgs_per_s_ce"]}
    ok = finite and comp["graph_breaks"] == 0
    line = (f"d{d} b{b} eager {eager['imgs_per_s_ce']:.1f} img/s, compiled {comp['imgs_per_s_ce']:.1f} img/s "
            f"(MFU {100 * (comp['mfu_ce'] or 0):.1f}% measured, {100 * comp['mfu_800_ce']:.1f}% of 800), "
            f"official recipe {plain['imgs_per_s_ce']:.1f} img/s, full/CE x{comp['ratio_full_vs_ce']:.3f}, "
            f"peak {comp['full_objective_peak_mem_gb']:.2f} GiB, graph breaks {comp['graph_breaks']}, finite {finite}; "
            "targets " + ", ".join(f"{k} {v}" for k, v in targets.items()))
    return ok, line, rec


def memory_plan(ctx: dict, depth: int, batch: int) -> dict | None:
    """The trainer's memory plan for this step (``varup.training.memplan``; None where that module is missing):
    the estimated peak of the whole batch at once and the micro-batch it would choose on this GPU."""
    try:
        from varup.training import memplan  # type: ignore[attr-defined]
    except ImportError:
        return None
    z, dev = ctx["sizes"], ctx["dev"]
    kw = dict(precision=z["precision"], patch_nums=tuple(z["patch_nums"]), vocab=z["vocab"],
              num_classes=z["num_classes"], device=dev.type)
    whole = memplan.plan_step(depth, batch, **kw)
    out = {"estimated_peak_gb": whole["peak_gb"]}
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory / 2**30
        out.update(gpu_mem_gb=total, chosen_micro_batch=memplan.choose_micro_batch(depth, batch, total, **kw))
    return out


def check_train_d20(ctx: dict) -> tuple[bool, str, dict]:
    """One d20 step (CE and full objective) at the paper's per-GPU batch, the whole batch at once, beside the
    memory plan's estimate of its peak and the micro-batch the plan would pick."""
    z = ctx["sizes"]
    d, b = z["d20"], z["d20_batch"]
    plan = memory_plan(ctx, d, b)
    rec: dict = {"depth": d, "batch": b, "memplan": plan or "varup.training.memplan not found"}
    note = ("plan: no module" if plan is None else f"plan: est. {plan['estimated_peak_gb']:.2f} GiB"
            + (f", micro-batch {plan['chosen_micro_batch']}" if "chosen_micro_batch" in plan else ""))
    try:
        r = suite.train_benchmark(d, b, precision=z["precision"], **{**_train_kw(ctx), "warmup": 1, "repeats": 1})
    except torch.cuda.OutOfMemoryError as e:
        rec["error"] = f"out of memory with the whole batch at once: {str(e).splitlines()[0]}"
        return False, f"d{d} b{b}: {rec['error']} ({note})", rec
    rec.update(_train_figures(r))
    ok = _finite(rec["loss_ce_only"], rec["loss_full_objective"])
    return ok, (f"d{d} b{b} {rec['precision']}: {rec['imgs_per_s_ce']:.1f} img/s, peak "
                f"{rec['full_objective_peak_mem_gb']:.2f} GiB ({note}), finite {ok}"), rec


def sampled_tokens(ctx: dict, batch: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Two sampling calls with the same seed (CFG 1.5, top-k 900, top-p 0.95, the pipeline's precision): their
    tokens."""
    from varup.base.seeding import make_generator
    from varup.models.var import VAR, VARConfig
    from varup.models.vqvae import VQVAE
    from varup.sampling.sampler import sample, sampling_precision

    z, dev = ctx["sizes"], ctx["dev"]
    torch.manual_seed(seed)
    var = VAR(VARConfig(vocab_size=z["vocab"], z_channels=32, num_classes=z["num_classes"], depth=z["depth"],
                        embed_dim=64 * z["depth"], num_heads=z["depth"], patch_nums=tuple(z["patch_nums"])))
    var = var.init_weights().to(dev).eval()
    vae = VQVAE(suite.vqvae_config(z["vae"], dev, z["vocab"], 32, z["patch_nums"])).freeze().to(dev)
    labels = torch.arange(batch, device=dev) % z["num_classes"]
    out = []
    for _ in range(2):
        with torch.inference_mode(), sampling_precision(dev, "auto"):
            s = sample(var, vae, labels, cfg=1.5, top_k=min(900, z["vocab"]), top_p=0.95,
                       generator=make_generator(seed, dev), decode=False)
        out.append([t.cpu() for t in s.tokens])
    return out


def check_sample(ctx: dict) -> tuple[bool, str, dict]:
    z = ctx["sizes"]
    rec: dict = {}
    for b in z["sample_batches"]:
        r = suite.sample_benchmark(z["depth"], b, patch_nums=z["patch_nums"], vocab=z["vocab"],
                                   num_classes=z["num_classes"], device=str(ctx["dev"]), vae=z["vae"],
                                   warmup=min(z["warmup"], 2), repeats=min(z["repeats"], 5),
                                   ceilings=ctx.get("ceilings"), peak=None if ctx.get("ceilings") else 1.0)
        rec[f"batch_{b}"] = {k: r[k] for k in ("imgs_per_s", "sample_s", "precision", "peak_mem_gb", "mfu")}
    a, b2 = sampled_tokens(ctx, z["sample_batches"][0])
    rec["same_seed_same_tokens"] = same = all(torch.equal(x, y) for x, y in zip(a, b2))
    big = rec[f"batch_{z['sample_batches'][-1]}"]
    rec["target_400_imgs_per_s_at_256"] = _met(big["imgs_per_s"] >= suite.TARGETS["sample_imgs_per_s"])
    ok = same and all(_finite(v["imgs_per_s"]) for k, v in rec.items() if k.startswith("batch_"))
    figs = ", ".join(f"b{k[6:]} {v['imgs_per_s']:.1f} img/s" for k, v in rec.items() if k.startswith("batch_"))
    return ok, (f"{big['precision']} cfg 1.5: {figs}; same seed same tokens {same}; "
                f"target 400 img/s at b256 {rec['target_400_imgs_per_s_at_256']}"), rec


# ------------------------------------------------------------------------------------------ tiny assets
def build_tiny_assets(root: str | os.PathLike, n_images: int = 64, seed: int = 0) -> dict[str, Path]:
    """A tiny tokenizer file, its token cache (train/val, 4 classes), the loss references and a caption table (two
    captions per image, drawn 0.7 / 0.3): what the trainers read, in ``root``."""
    from varup.base.utils import atomic_npz_save, atomic_torch_save, atomic_write_json
    from varup.models.vqvae import VQVAE, VQVAEConfig
    from varup.tokenizer.tokens import TokenCache, encode_split, write_meta
    from varup.training.references import build_references

    root = Path(root)
    torch.manual_seed(seed)
    vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                            patch_nums=(1, 2, 3, 4), share_quant_resi=4, norm_groups=8)).eval()
    vae.quantize.embedding.weight.data.normal_(0, 0.3)
    atomic_torch_save({"model": vae.state_dict(), "config": vae.cfg.to_dict()}, root / "vqvae.pt")
    g = torch.Generator().manual_seed(seed)
    R = vae.cfg.resolution
    imgs = torch.rand(n_images, 3, R, R, generator=g) * 2 - 1
    labels = [i % 4 for i in range(n_images)]
    splits = {s: encode_split(vae, lambda i, v: imgs[i], labels, root / "tokens", s, batch_size=32)
              for s in ("train", "val")}
    write_meta(root / "tokens", vae, splits, ["a", "b", "c", "d"])
    cache = TokenCache(root / "tokens")
    refs = build_references(vae.quantize.embedding.weight.detach(), torch.from_numpy(cache.tokens.astype(np.int64)),
                            vae.patch_nums, num_clusters=8)
    atomic_torch_save(refs, root / "refs.pt")
    cap = root / "captions"
    ids = np.array([[i % 5, (i + 2) % 5] for i in range(n_images)], np.int64).reshape(-1)
    atomic_npz_save(cap / "captions.npz", offsets=np.arange(0, 2 * n_images + 1, 2, dtype=np.int64), ids=ids,
                    weights=np.tile([0.7, 0.3], n_images))
    atomic_write_json(cap / "captions.json", {"source": "gpu-check", "split": "train", "n_images": n_images,
                                              "captions": CAPTIONS, "kinds": ["test"] * 5, "n_modes": [None] * 5})
    return {"tokens": root / "tokens", "tokenizer": root / "vqvae.pt", "refs": root / "refs.pt", "captions": cap}


def var_spec(ctx: dict, steps: int, text: dict | None = None):
    """The RunSpec of a tiny VAR run (the full objective), text-conditioned with ``text``."""
    from varup.training.loop import RunSpec

    model = {**ctx["sizes"]["ddp_model"], "drop_path_rate": 0.0, "cond_drop_rate": 0.1}
    optim = dict(steps=steps, batch_size=16, lr=3e-3, warmup_steps=2, log_every=1, ckpt_every=4,
                 precision="bf16" if ctx["dev"].type == "cuda" else "fp32")
    s = RunSpec(model=model, loss={"lambda_2nd": 0.01, "lambda_se": 0.02, "reference": "semantic"}, optim=optim,
                seed=3)
    if text:
        s.text = {"encoder": {"kind": "toy", "dim": 16, "width": 16, "max_len": 8}, **text}
    return s


def train_var(ctx: dict, assets: dict, out: Path, spec, **kw) -> dict:
    from varup.training.loop import train

    return train(spec, tokens_dir=assets["tokens"], tokenizer=assets["tokenizer"], references=assets["refs"],
                 out_model=out / "model.pt", work_dir=out / "work", device=str(ctx["dev"]),
                 captions=assets["captions"] if spec.text else None, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ddp_world_one(dev: torch.device):
    """The environment torchrun gives one rank (MASTER_ADDR 127.0.0.1, a free port, RANK 0, WORLD_SIZE 1), so the
    trainers' ``init_distributed`` joins a one-rank process group (NCCL on CUDA, gloo on CPU) and trains through
    the DDP wrapper and its all-reduces; the group is destroyed and the environment restored after."""
    import torch.distributed as dist

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    with mock.patch.dict(os.environ, env):
        try:
            yield
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _last_loss(work: Path) -> float | None:
    lines = (work / "metrics.jsonl").read_text().splitlines() if (work / "metrics.jsonl").exists() else []
    return json.loads(lines[-1])["loss"] if lines else None


def lm_family(ctx: dict, root: Path) -> dict:
    """LM SFT a few steps under DDP on a toy LM (``transformers`` needed: a SKIP record where it is missing)."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        return {"status": "SKIP", "reason": f"transformers is not installed ({e})"}
    import varup.lm.sft  # noqa: F401  (imported before ddp_world_one patches its init_distributed)
    from varup.config.lmplan import TOY_TEMPLATE
    from varup.lm.grammar import make_corpus
    from varup.lm.stages import pretrain_toy, sft, write_lm_references

    corpus = root / "corpus"
    make_corpus(corpus, seed=0, n_train=64, eval_per_prompt=1, n_pretrain=64, template=TOY_TEMPLATE)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1}
    pretrain_toy(corpus, root / "base", root / "base_work", model_cfg=small, template=TOY_TEMPLATE, device="cpu",
                 train_cfg={"steps": 2, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "max_length": 24,
                            "log_every": 1})
    write_lm_references(root / "base", corpus, root / "refs.pt", max_length=24, loss_tokens="response",
                        num_clusters=4, cluster_seed=0, support_k=None)
    spec = {"steps": ctx["sizes"]["ddp_steps"], "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "max_length": 24,
            "log_every": 1, "ckpt_every": 4, "seed": 1, "loss": {"lambda_2nd": 0.3, "lambda_se": 0.2,
                                                                  "reference": "semantic"}}
    with ddp_world_one(ctx["dev"]):
        sft(root / "base", corpus, root / "refs.pt", root / "sft", root / "sft_work", train_cfg=spec,
            device=str(ctx["dev"]))
    loss = _last_loss(root / "sft_work")
    return {"status": "PASS" if _finite(loss) else "FAIL", "loss": loss}


def check_ddp(ctx: dict) -> tuple[bool | None, str, dict]:
    root = Path(ctx["tmp"]) / "ddp"
    assets = build_tiny_assets(root / "assets")
    fams: dict[str, dict] = {}
    for name, text in (("class", None), ("text_empty_caption", {"null_condition": "empty_caption"}),
                       ("text_learned", {"null_condition": "learned"})):
        try:
            with ddp_world_one(ctx["dev"]):
                s = train_var(ctx, assets, root / name, var_spec(ctx, ctx["sizes"]["ddp_steps"], text))
            loss = s["final"]["loss"] if s.get("final") else None
            fams[name] = {"status": "PASS" if _finite(loss) and s["world_size"] == 1 else "FAIL", "loss": loss}
        except Exception as e:  # noqa: BLE001 - one family's failure is reported, the others still run
            fams[name] = {"status": "FAIL", "error": f"{type(e).__name__}: {e}"}
    try:
        fams["lm_sft"] = lm_family(ctx, root / "lm")
    except Exception as e:  # noqa: BLE001
        fams["lm_sft"] = {"status": "FAIL", "error": f"{type(e).__name__}: {e}"}
    backend = "nccl" if ctx["dev"].type == "cuda" else "gloo"
    ok = all(f["status"] != "FAIL" for f in fams.values())
    line = f"{backend} world 1: " + ", ".join(
        f"{k} {v['status']}" + (f" (loss {v['loss']:.3f})" if _finite(v.get("loss")) else "")
        + (f" ({v.get('reason') or v.get('error')})" if v["status"] != "PASS" else "") for k, v in fams.items())
    return ok, line, {"backend": backend, "families": fams}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a else 0.0


def check_resume(ctx: dict) -> tuple[bool, str, dict]:
    z, root = ctx["sizes"], Path(ctx["tmp"]) / "resume"
    assets = build_tiny_assets(root / "assets")
    n, k = z["resume_steps"], z["resume_kill"]
    train_var(ctx, assets, root / "whole", var_spec(ctx, n))
    cut = train_var(ctx, assets, root / "cut", var_spec(ctx, n), stop_after=k)
    train_var(ctx, assets, root / "cut", var_spec(ctx, n))
    curves = {r: [json.loads(x) for x in (root / r / "work" / "metrics.jsonl").read_text().splitlines()]
              for r in ("whole", "cut")}
    wa, wb = _weights(root / "whole" / "model.pt"), _weights(root / "cut" / "model.pt")
    diff = _max_diff(wa, wb)
    scale = max(float(v.float().abs().max()) for v in wa.values())
    same_steps = [r["step"] for r in curves["whole"]] == [r["step"] for r in curves["cut"]]
    rec = {"steps": n, "killed_at": cut.get("stopped_at"), "curve_len": {r: len(c) for r, c in curves.items()},
           "same_curve_steps": same_steps, "max_abs_dw": diff, "bit_identical": diff == 0.0 and wa.keys() == wb.keys()}
    if ctx["dev"].type == "cuda":
        train_var(ctx, assets, root / "whole2", var_spec(ctx, n))
        noise = _max_diff(wa, _weights(root / "whole2" / "model.pt"))
        rec.update(run_to_run_max_abs_dw=noise, tolerance=2 * noise + 1e-6 * scale)
        ok_w = diff <= rec["tolerance"]
    else:
        rec["tolerance"] = 0.0
        ok_w = rec["bit_identical"]
    ok = same_steps and rec["killed_at"] == k and ok_w
    return ok, (f"{n} steps vs killed at {rec['killed_at']} + resumed: curve {rec['curve_len']['cut']}/"
                f"{rec['curve_len']['whole']} steps, max|dw| {diff:.3g} (tolerance {rec['tolerance']:.3g}), "
                f"bit-identical {rec['bit_identical']}"), rec


# --------------------------------------------------------------------------------------------- driver
def section_function(name: str) -> Callable[[dict], tuple[bool | None, str, dict]]:
    """The check of a section, looked up when it runs (so a test can replace one)."""
    return getattr(sys.modules[__name__], f"check_{name}")


def run_section(name: str, ctx: dict, emit: Callable[[str], None]) -> dict:
    t0 = time.perf_counter()
    try:
        ok, line, rec = section_function(name)(ctx)
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    except Exception as e:  # noqa: BLE001 - a section's failure is its FAIL line; the others still run
        status, line = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rec = {"error": line, "traceback": traceback.format_exc()[-4000:]}
    rec = {"section": name, "status": status, "seconds": round(time.perf_counter() - t0, 2), "summary": line, **rec}
    emit(f"{status} {name} {line}")
    return rec


def gpu_check(device: str = "auto", *, tiny: bool = False, sections: Sequence[str] | None = None,
              out: str | os.PathLike | None = None, emit: Callable[[str], None] = print) -> tuple[int, dict]:
    """Run the sections (all by default) and write ``out`` (JSON): (exit code: 1 on any FAIL, the results)."""
    from varup.base.utils import atomic_write_json

    names = list(sections or SECTIONS)
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise ValueError(f"gpu-check --sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    dev = torch.device("cpu") if tiny else resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    results: dict[str, Any] = {"env": suite.env_info(dev), "tiny": tiny, "sections": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="varup-gpucheck-") as tmp:
        ctx = {"dev": dev, "sizes": TINY if tiny else FULL, "tmp": tmp}
        for name in names:
            results["sections"][name] = run_section(name, ctx, emit)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    failed = [n for n, r in results["sections"].items() if r["status"] == "FAIL"]
    results["passed"] = not failed
    emit(f"{'FAIL' if failed else 'PASS'} gpu-check {len(names) - len(failed)}/{len(names)} sections"
         + (f" (failed: {', '.join(failed)})" if failed else "") + f" in {results['seconds']} s on {dev}")
    if out:
        atomic_write_json(out, results)
    return (1 if failed else 0), results


__all__ = ["gpu_check", "SECTIONS", "build_tiny_assets", "ddp_world_one"]
