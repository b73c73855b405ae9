"""Responses for the held-out prompts with fixed decoding settings (``lm.generate``).

Each distinct prompt of ``eval.jsonl`` (in order of first appearance) gets ``n_per_prompt`` samples; prompts are
left-padded into batches of ``batch_size`` and each batch is seeded by (seed, batch index), so a generation set is
a function of the model, the prompts, the settings and the seed (``batch_size`` included: it is part of the key).
Output, one JSON object per line: ``{"prompt_id", "sample", "prompt", "generation"}`` (+ ``instruction`` where the
corpus has it), the text decoded without special tokens and cut at the first eos.

The stop rule (``lm.generate.stop``): with ``template`` (the default) a sequence also stops where it starts a new
instruction block, i.e. once its decoded continuation contains the prompt template's instruction header
(:func:`instruction_header`: ``### Instruction:`` for dolly, ``### instruction :`` for the toy template), and the
stored response is cut before the header; with ``eos`` only the eos token (or ``max_new_tokens``) ends it. The
header is matched on the decoded text of each row after every step (:class:`StopAtText`), not on token ids, so a
header split over several tokens, or falling inside one, is found with any tokenizer (as written and as the tokenizer
decodes it, :func:`as_decoded`); a row that stopped is padded
while the rest of its batch goes on. Which header: the header of each named template (:data:`varup.lm.dolly.TEMPLATES`
and the toy's :data:`varup.config.lmplan.TOY_TEMPLATE`) that the held-out prompts contain, or, where ``generate`` is
given the template, that template's; a template with no header (``plain``) stops at eos only.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import torch

from varup.base.runtime import resolve_device
from varup.base.seeding import derive_seed
from varup.base.utils import atomic_write_text, progress, write_provenance
from varup.config.lmplan import TOY_TEMPLATE
from varup.data.textfile import read_jsonl
from varup.lm.dolly import TEMPLATES

log = logging.getLogger("varup.lm.generate")
STOP = ("template", "eos")


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
    stop: str = "template"  # also stop at the template's next instruction header (see the module doc); eos: eos only

    def __post_init__(self) -> None:
        if self.stop not in STOP:
            raise ValueError(f"lm.generate.stop must be one of {STOP}, got {self.stop!r}")
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


# ------------------------------------------------------------------------------------------- the stop rule
def instruction_header(template: str) -> str | None:
    """The header that opens ``template``'s instruction block (a name of :data:`varup.lm.dolly.TEMPLATES` or a literal
    format string): the last line of its text before ``{instruction}``, stripped; None when that is blank (or the
    template has no ``{instruction}``), so generation stops at eos only."""
    t = TEMPLATES.get(template, template)
    if "{instruction}" not in t:
        return None
    return t.split("{instruction}", 1)[0].rstrip().rsplit("\n", 1)[-1].strip() or None


#: the headers of the named templates and of the toy's template
KNOWN_HEADERS = tuple(dict.fromkeys(h for h in map(instruction_header, [*TEMPLATES, TOY_TEMPLATE]) if h))


def stop_strings(prompts: list[str], stop: str, template: str | None = None) -> list[str]:
    """What ends a generation besides eos: nothing with ``stop: eos``; else the header of ``template`` when given,
    otherwise every header of :data:`KNOWN_HEADERS` that one of ``prompts`` contains."""
    if stop == "eos":
        return []
    if template is not None:
        return [h] if (h := instruction_header(template)) else []
    return [h for h in KNOWN_HEADERS if any(h in p for p in prompts)]


def as_decoded(tok, stops: list[str]) -> list[str]:
    """Each of ``stops`` and, beside it, the text ``tok`` decodes its tokens to after other text, where that differs
    (the toy's word-level decoder writes ``###`` after a word as ``#`` glued to it, so ``### instruction :`` comes
    out of a generation as ``...# instruction :``); not for a string with a token the tokenizer does not know."""
    out = []
    for s in stops:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        out.append(s)
        if ids and (tok.unk_token_id is None or tok.unk_token_id not in ids):
            alone, twice = (tok.decode(x, skip_special_tokens=True) for x in (ids, ids + ids))
            out += [alone.strip()] + ([twice[len(alone):].strip()] if twice.startswith(alone) else [])
    return list(dict.fromkeys(x for x in out if x))


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any of ``stops`` (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


class StopAtText:
    """A transformers stopping criterion: row r is done once the decoded text of its tokens from position ``start``
    on (special tokens skipped) contains one of ``stops``."""

    def __init__(self, tok, stops: list[str], start: int):
        self.tok, self.stops, self.start = tok, list(stops), start

    def __call__(self, input_ids: torch.Tensor, scores=None, **kw) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


def _batch_generate(model, tok, prompts: list[str], dc: DecodeConfig, seed: int, dev,
                    stops: list[str] = ()) -> list[str]:
    from transformers import StoppingCriteriaList

    torch.manual_seed(seed)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
    start = enc["input_ids"].shape[1]
    kw = {"do_sample": dc.do_sample, "max_new_tokens": dc.max_new_tokens, "pad_token_id": tok.pad_token_id,
          "eos_token_id": tok.eos_token_id}
    if dc.do_sample:
        kw.update(temperature=dc.temperature, top_p=dc.top_p, top_k=dc.top_k)
    if stops:
        kw["stopping_criteria"] = StoppingCriteriaList([StopAtText(tok, stops, start)])
    with torch.no_grad():
        out = model.generate(**enc, **kw)
    return [cut_at_stop(t, stops).strip() for t in tok.batch_decode(out[:, start:], skip_special_tokens=True)]


def generate(model_dir, eval_jsonl, out_jsonl, *, decode: dict, seed: int, device: str = "auto",
             dtype: str = "float32", template: str | None = None) -> dict:
    """Sample ``decode['n_per_prompt']`` responses for every distinct held-out prompt and write them; ``template``:
    the prompt template, whose header ends a generation (None: the named templates' headers found in the prompts)."""
    from varup.lm.hub import load_causal_lm, load_tokenizer

    dc = DecodeConfig(**decode)
    prompts = held_out_prompts(eval_jsonl, dc.max_prompts)  # before the model loads: an empty set fails at once
    jobs = [(i, k, r) for i, r in enumerate(prompts) for k in range(dc.n_per_prompt)]
    dev = resolve_device(device)
    model, tok = load_causal_lm(model_dir, dtype=dtype, device=str(dev)), load_tokenizer(model_dir)
    model.eval()
    stops = as_decoded(tok, stop_strings([r["prompt"] for r in prompts], dc.stop, template))
    log.info("generation stops at eos%s", "".join(f" and at {s!r}" for s in stops))
    rows = []
    for b in progress(range(0, len(jobs), dc.batch_size), desc="generate", unit="batch"):
        chunk = jobs[b:b + dc.batch_size]
        texts = _batch_generate(model, tok, [r["prompt"] for _, _, r in chunk], dc,
                                derive_seed(seed, "lm-generate", b // dc.batch_size), dev, stops)
        for (i, k, r), g in zip(chunk, texts):
            rows.append({"prompt_id": i, "sample": k, "prompt": r["prompt"], "generation": g,
                         **({"instruction": r["instruction"]} if "instruction" in r else {})})
    atomic_write_text(out_jsonl, "".join(json.dumps(x) + "\n" for x in rows))
    write_provenance(out_jsonl, config={"decode": asdict(dc), "stop_strings": stops, "model": str(model_dir)},
                     seed=seed, device=str(dev))
    log.info("%d generations for %d prompts -> %s", len(rows), len(rows) // max(dc.n_per_prompt, 1), out_jsonl)
    return {"n": len(rows)}


__all__ = ["DecodeConfig", "generate", "distinct_prompts", "held_out_prompts", "instruction_header", "stop_strings",
           "as_decoded", "cut_at_stop", "StopAtText", "KNOWN_HEADERS", "STOP"]
