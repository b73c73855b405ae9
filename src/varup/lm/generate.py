"""Responses for the held-out prompts with fixed decoding settings (``lm.generate``).

Each distinct prompt of ``eval.jsonl`` (in order of first appearance) gets ``n_per_prompt`` samples; prompts are
left-padded into batches of ``batch_size`` and each batch is seeded by (seed, batch index), so a generation set is
a function of the model, the prompts, the settings and the seed (``batch_size`` included: it is part of the key).
Output, one JSON object per line: ``{"prompt_id", "sample", "prompt", "generation"}`` (+ ``instruction`` where the
corpus has it), the text decoded without special tokens and cut at the first eos.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import torch

from varup.base.runtime import resolve_device
from varup.base.seeding import derive_seed
from varup.base.utils import atomic_write_text, progress, write_provenance
from varup.data.textfile import read_jsonl

log = logging.getLogger("varup.lm.generate")


@dataclass
class DecodeConfig:
    n_per_prompt: int = 1
    max_new_tokens: int = 256
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    batch_size: int = 16
    max_prompts: int | None = None  # None: every held-out prompt

    def __post_init__(self) -> None:
        for key in ("n_per_prompt", "batch_size", "max_new_tokens", "max_prompts"):
            v = getattr(self, key)
            if not (v is None and key == "max_prompts") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"lm.generate.{key} must be an integer >= 1{' or null' * (key == 'max_prompts')}, "
                                 f"got {v!r}")


def distinct_prompts(records: list[dict], max_prompts: int | None = None) -> list[dict]:
    seen: dict[str, dict] = {}
    for r in records:
        seen.setdefault(r["prompt"], r)
    out = list(seen.values())
    return out if max_prompts is None else out[:max_prompts]


def held_out_prompts(eval_jsonl, max_prompts: int | None) -> list[dict]:
    """The distinct prompts of ``eval_jsonl`` to generate for (read strictly: file and line named for a bad line);
    ValueError naming the file and the keys when there are none, so the job fails here and not at scoring."""
    records = read_jsonl(eval_jsonl, required=("prompt",))
    prompts = distinct_prompts(records, max_prompts)
    if not prompts:
        raise ValueError(f"{eval_jsonl}: no held-out prompt to generate for ({len(records)} records, "
                         f"lm.generate.max_prompts={max_prompts}); the corpus' held-out set is empty: check "
                         f"lm.corpus (n_eval, categories, eval_per_prompt) and run lm_corpus again")
    return prompts


def _batch_generate(model, tok, prompts: list[str], dc: DecodeConfig, seed: int, dev) -> list[str]:
    torch.manual_seed(seed)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
    kw = {"do_sample": dc.do_sample, "max_new_tokens": dc.max_new_tokens, "pad_token_id": tok.pad_token_id,
          "eos_token_id": tok.eos_token_id}
    if dc.do_sample:
        kw.update(temperature=dc.temperature, top_p=dc.top_p, top_k=dc.top_k)
    with torch.no_grad():
        out = model.generate(**enc, **kw)
    return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def generate(model_dir, eval_jsonl, out_jsonl, *, decode: dict, seed: int, device: str = "auto",
             dtype: str = "float32") -> dict:
    """Sample ``decode['n_per_prompt']`` responses for every distinct held-out prompt and write them."""
    from varup.lm.hub import load_causal_lm, load_tokenizer

    dc = DecodeConfig(**decode)
    prompts = held_out_prompts(eval_jsonl, dc.max_prompts)  # before the model loads: an empty set fails at once
    jobs = [(i, k, r) for i, r in enumerate(prompts) for k in range(dc.n_per_prompt)]
    dev = resolve_device(device)
    model, tok = load_causal_lm(model_dir, dtype=dtype, device=str(dev)), load_tokenizer(model_dir)
    model.eval()
    rows = []
    for b in progress(range(0, len(jobs), dc.batch_size), desc="generate", unit="batch"):
        chunk = jobs[b:b + dc.batch_size]
        texts = _batch_generate(model, tok, [r["prompt"] for _, _, r in chunk], dc,
                                derive_seed(seed, "lm-generate", b // dc.batch_size), dev)
        for (i, k, r), g in zip(chunk, texts):
            rows.append({"prompt_id": i, "sample": k, "prompt": r["prompt"], "generation": g,
                         **({"instruction": r["instruction"]} if "instruction" in r else {})})
    atomic_write_text(out_jsonl, "".join(json.dumps(x) + "\n" for x in rows))
    write_provenance(out_jsonl, config={"decode": asdict(dc), "model": str(model_dir)}, seed=seed, device=str(dev))
    log.info("%d generations for %d prompts -> %s", len(rows), len(rows) // max(dc.n_per_prompt, 1), out_jsonl)
    return {"n": len(rows)}


__all__ = ["DecodeConfig", "generate", "distinct_prompts", "held_out_prompts"]
