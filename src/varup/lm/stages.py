"""The LM arm's stages as the CLI runs them (one function per Snakemake rule): corpus, toy base model and featurizer
pre-training, the objective's references, SFT. Each reads and writes the files documented in :mod:`varup.lm`."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from varup.base.runtime import resolve_device
from varup.base.utils import atomic_torch_save, atomic_write_json, write_provenance
from varup.data.textfile import read_jsonl, read_utf8, text_lines
from varup.lm.sft import LMTrainConfig, encode_lines, encode_records, fit, lm_references
from varup.training.references import reference_stats

log = logging.getLogger("varup.lm")


def pretrain_toy(corpus_dir, out_dir, work_dir, *, model_cfg: dict, train_cfg: dict, template: str,
                 device: str = "auto", stop_before_limit_s: float | None = None) -> dict:
    """The toy base model (or the toy MAUVE featurizer, another seed): a fresh Qwen2 of ``model_cfg`` trained with
    cross-entropy on the grammar's plain text (``pretrain.txt``), written as a ``save_pretrained`` folder."""
    from varup.lm.toy import build_toy_model, build_toy_tokenizer

    oc = LMTrainConfig(**{**train_cfg, "loss": {}, "loss_tokens": "all"})
    tok = build_toy_tokenizer(template)
    path = Path(corpus_dir) / "pretrain.txt"
    lines = [x for x in text_lines(read_utf8(path)) if x.strip()]
    if not lines:
        raise ValueError(f"{path}: no text to pre-train on (lm.corpus.n_pretrain); run lm_corpus again")
    model = build_toy_model(tok, model_cfg, seed=oc.seed)
    return fit(model, tok, encode_lines(tok, lines, oc.max_length), oc, refs=None, out_dir=out_dir, work_dir=work_dir,
               device=device, run_config={"model": model_cfg, "train": train_cfg, "template": template},
               stop_before_limit_s=stop_before_limit_s)


def train_records(corpus_dir) -> list[dict]:
    """The SFT pairs of ``corpus_dir/train.jsonl``, read strictly (file and line named for a bad line); ValueError
    naming the file and the keys when there are none."""
    path = Path(corpus_dir) / "train.jsonl"
    records = read_jsonl(path, required=("prompt", "response"))
    if not records:
        raise ValueError(f"{path}: no SFT records; check lm.corpus (n_train, n_eval, categories) and run lm_corpus again")
    return records


def write_lm_references(base_dir, corpus_dir, out, *, max_length: int, loss_tokens: str, num_clusters: int,
                        cluster_seed: int, support_k: float | None, device: str = "auto") -> dict:
    """The objective's references from the base model's input-embedding matrix (and the SFT targets' histogram),
    computed on ``device`` (the rule's ``--device``: :func:`varup.base.runtime.resolve_device`), saved on the CPU."""
    from varup.lm.hub import load_causal_lm, load_tokenizer

    dev = resolve_device(device)
    model, tok = load_causal_lm(base_dir), load_tokenizer(base_dir)
    data = encode_records(tok, train_records(corpus_dir), max_length, loss_tokens)
    emb = model.get_input_embeddings().weight
    log.info("references from the %d x %d embedding matrix of %s on %s", *emb.shape, base_dir, dev)
    refs = lm_references(emb, data["labels"][:, 1:], num_clusters=num_clusters, cluster_seed=cluster_seed,
                         support_k=support_k, device=dev)
    atomic_torch_save(refs, out)
    stats = reference_stats(refs)
    atomic_write_json(Path(str(out) + ".json"), stats)
    write_provenance(out, config={"num_clusters": num_clusters, "cluster_seed": cluster_seed, "support_k": support_k},
                     device=str(dev))
    return stats


def sft(base_dir, corpus_dir, refs_path, out_dir, work_dir, *, train_cfg: dict, device: str = "auto",
        dtype: str = "float32", stop_before_limit_s: float | None = None) -> dict:
    """Fine-tune the base model on ``train.jsonl`` with ``train_cfg['loss']`` (empty or zero λ: cross-entropy)."""
    from varup.lm.hub import load_causal_lm, load_tokenizer
    from varup.training.references import load_references

    oc = LMTrainConfig(**train_cfg)
    model, tok = load_causal_lm(base_dir, dtype=dtype), load_tokenizer(base_dir)
    data = encode_records(tok, train_records(corpus_dir), oc.max_length, oc.loss_tokens)
    refs = load_references(refs_path) if refs_path else None
    torch.manual_seed(oc.seed)
    return fit(model, tok, data, oc, refs=refs, out_dir=out_dir, work_dir=work_dir, device=device,
               run_config={"base": Path(base_dir).name, "train": train_cfg}, stop_before_limit_s=stop_before_limit_s)


__all__ = ["pretrain_toy", "write_lm_references", "sft", "train_records"]
