"""The memory plan of a whole config (``varup plan-memory``): every training run's per-GPU peak by
:mod:`varup.training.memplan`'s formula, and whether it fits ``cluster.gpu_mem_gb``, as a table.

Apart from :mod:`varup.training.memplan` because it reads the config's plan (:mod:`varup.config.plan`) and the
trainer does not: the trainer imports memplan for its micro-batch choice, and the code fingerprints follow imports,
so a planning edit here would otherwise re-train every model.
"""
from __future__ import annotations

from varup.training.memplan import choose_micro_batch, fits, plan_step


def _tokenizer_geometry(cfg: dict, dataset: str) -> tuple[int, int, tuple[int, ...]]:
    """(vocabulary, z_channels, patch_nums) of a dataset's tokenizer (official: the released VQVAE's)."""
    from varup.config.plan import tokenizer_of
    from varup.models.vqvae import VQVAEConfig

    _, tok = tokenizer_of(cfg, dataset)
    vq = VQVAEConfig(**(tok.get("vqvae") or {})) if tok.get("kind") == "train" else VQVAEConfig()
    return vq.vocab_size, vq.z_channels, tuple(vq.patch_nums)


def plan_config(cfg: dict) -> list[dict]:
    """One row per training run of a validated config: its depth, global batch, GPUs, batch per GPU, precision,
    micro-batch (``auto`` resolved against ``cluster.gpu_mem_gb``), checkpointing, estimated peak and whether it
    fits ``cluster.gpu_mem_gb``."""
    from varup.config.plan import lambda_runs, run_spec, runs

    gpu_gb = float(cfg["cluster"]["gpu_mem_gb"])
    world = int(cfg["train"]["gpus"]) * int(cfg["train"]["nodes"])
    rows = []
    for run in dict.fromkeys([*runs(cfg), *(r for _, r in lambda_runs(cfg))]):
        spec = run_spec(cfg, run)
        o, m = spec["optim"], spec["model"]
        batch = int(o.get("batch_size", 64))
        per_gpu = max(1, batch // world)
        vocab, cvae, pns = _tokenizer_geometry(cfg, run.dataset)
        kw = dict(precision=o.get("precision", "auto"), activation_checkpointing=bool(o.get("activation_checkpointing")),
                  patch_nums=pns, vocab=vocab, width=m["embed_dim"], heads=m["num_heads"], mlp_ratio=m["mlp_ratio"],
                  z_channels=cvae)
        mb = o.get("micro_batch")
        chosen = choose_micro_batch(run.depth, per_gpu, gpu_gb, **kw) if mb == "auto" else mb
        p = plan_step(run.depth, per_gpu, micro_batch=chosen or (1 if mb == "auto" else None), **kw)
        rows.append({"run": run.path, "depth": run.depth, "batch": batch, "gpus": world, "batch_per_gpu": per_gpu,
                     "precision": p["precision"], "micro_batch": p["micro_batch"], "micro_batch_setting": mb,
                     "activation_checkpointing": p["activation_checkpointing"], "params_m": p["params"] / 1e6,
                     "peak_gb": p["peak_gb"], "gpu_mem_gb": gpu_gb, "fits": fits(p["peak"], gpu_gb)})
    return rows


def format_plan(rows: list[dict]) -> str:
    """The plan as a Markdown table, runs of equal settings on one line."""
    head = ("| runs | depth | batch (GPUs) | per GPU | micro-batch | precision | checkpointing | peak GB | fits |\n"
            "|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        mb = f"{r['micro_batch']}" + (" (auto)" if r["micro_batch_setting"] == "auto" else "")
        key = (r["depth"], f"{r['batch']} ({r['gpus']})", r["batch_per_gpu"], mb, r["precision"],
               "yes" if r["activation_checkpointing"] else "no", f"{r['peak_gb']:.1f}",
               f"{'yes' if r['fits'] else 'NO'} (of {r['gpu_mem_gb']:g})")
        groups.setdefault(key, []).append(r["run"])
    lines = [head]
    for key, names in groups.items():
        first = names[0] + (f" +{len(names) - 1}" if len(names) > 1 else "")
        lines.append("| " + " | ".join([first, *map(str, key)]) + " |")
    return "\n".join(lines)



__all__ = ["plan_config", "format_plan"]
