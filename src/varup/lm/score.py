"""One generation set's scores (Table 6's cells): MAUVE against the human responses of the held-out prompts,
Self-BLEU of the generations, and, on the toy grammar, how the generations cover the known modes.

* MAUVE: p = the human responses of ``eval.jsonl``, q = the generations (mauve-text's convention), both featurised
  by the featurizer model (on a cluster GPT-2 large, the standard one; offline a small LM trained on the toy corpus:
  ``toy-MAUVE``, named so in the table). What is featurised is ``lm.score.featurize``: ``response`` (the response
  text alone) or ``prompt_response``. Both sides are cut the same way: each text to its first ``lm.score.max_length``
  featurizer tokens (truncation from the right, set on the featurizer's tokenizer whatever its own
  ``truncation_side``), so a long human response and a long generation are compared over the same length; how many
  texts of each side were cut is stored as ``truncated``.
* Self-BLEU: over all generations (``lm.score.self_bleu_over: all``) or within each prompt's samples, averaged
  over prompts (``prompt``); the human responses' own Self-BLEU is stored beside it as a reference point.
* Toy modes (:func:`varup.lm.grammar.mode_of`): ``valid`` share (the response is one of its instruction's modes),
  ``coverage`` (modes produced / modes allowed, mean over instructions), ``tv`` (total variation between the
  generated and the true mode distribution, invalid responses as one extra outcome, mean over instructions).
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from varup.base.runtime import resolve_device
from varup.base.utils import atomic_write_json, read_jsonl, write_provenance

log = logging.getLogger("varup.lm.score")
FEATURIZE = ("response", "prompt_response")
SELF_BLEU_OVER = ("all", "prompt")


@dataclass
class ScoreConfig:
    featurize: str = "response"
    self_bleu_over: str = "all"
    max_length: int = 256
    batch_size: int = 16
    mauve_seed: int = 25
    mauve_scaling_factor: float = 5.0
    mauve_num_buckets: str | int = "auto"
    self_bleu_sample: int | None = None  # score this many hypotheses (seeded), each against all others; None: all

    def __post_init__(self) -> None:
        if self.featurize not in FEATURIZE:
            raise ValueError(f"lm.score.featurize must be one of {FEATURIZE}, got {self.featurize!r}")
        if self.self_bleu_over not in SELF_BLEU_OVER:
            raise ValueError(f"lm.score.self_bleu_over must be one of {SELF_BLEU_OVER}, got {self.self_bleu_over!r}")


def toy_mode_scores(gens: list[dict]) -> dict:
    """Valid share, mode coverage and total variation to the grammar's mode distribution (see the module doc)."""
    from varup.lm.grammar import instructions, mode_of

    grammar = {i.text: i for i in instructions()}
    by_ins: dict[str, list[int | None]] = defaultdict(list)
    for g in gens:
        by_ins[g["instruction"]].append(mode_of(g["instruction"], g["generation"]))
    cov, tv, per = [], [], {}
    for text, modes in by_ins.items():
        ins, n = grammar[text], len(modes)
        counts = Counter(modes)
        freq = np.array([counts.get(m, 0) / n for m in range(len(ins.modes))] + [counts.get(None, 0) / n])
        true = np.array(list(ins.probs) + [0.0])
        cov.append(sum(1 for m in range(len(ins.modes)) if counts.get(m)) / len(ins.modes))
        tv.append(0.5 * float(np.abs(freq - true).sum()))
        per[text] = {"modes": len(ins.modes), "covered": sum(1 for m in range(len(ins.modes)) if counts.get(m)),
                     "valid": 1 - counts.get(None, 0) / n, "tv": tv[-1], "freq": freq[:-1].tolist(),
                     "true": list(ins.probs), "n": n}
    valid = float(np.mean([m is not None for ms in by_ins.values() for m in ms]))
    return {"valid": valid, "coverage": float(np.mean(cov)), "tv": float(np.mean(tv)), "per_instruction": per}


def _self_bleu(texts_by_prompt: dict[int, list[str]], sc: ScoreConfig) -> float:
    from varup.lm.textmetrics import self_bleu

    if sc.self_bleu_over == "prompt":
        return float(np.mean([self_bleu(t, sample=sc.self_bleu_sample) for t in texts_by_prompt.values() if len(t) > 1]))
    return self_bleu([t for ts in texts_by_prompt.values() for t in ts], sample=sc.self_bleu_sample)


def _texts(records: list[dict], key: str, sc: ScoreConfig) -> list[str]:
    return [r[key] if sc.featurize == "response" else f"{r['prompt']} {r[key]}" for r in records]


def n_truncated(tok, texts: list[str], max_length: int) -> int:
    """How many of ``texts`` have more than ``max_length`` tokens (featurised by their first ``max_length``)."""
    return sum(len(tok(t, truncation=True, max_length=max_length + 1)["input_ids"]) > max_length for t in texts)


def score_generations(gens_jsonl, eval_jsonl, featurizer_dir, out_json, *, score: dict, toy: bool,
                      featurizer_label: str, device: str = "auto") -> dict:
    """Write one set's scores: mauve, self_bleu, human_self_bleu, n, (toy) the mode scores."""
    from varup.lm.hub import load_causal_lm, load_tokenizer
    from varup.lm.textmetrics import featurize, mauve_score

    sc = ScoreConfig(**score)
    dev = resolve_device(device)
    gens, human = read_jsonl(gens_jsonl), read_jsonl(eval_jsonl)
    for path, recs, what, keys in ((gens_jsonl, gens, "generations", "lm.generate.n_per_prompt, max_prompts"),
                                   (eval_jsonl, human, "held-out human responses", "lm.corpus")):
        if len(recs) < 2:  # MAUVE (and Self-BLEU) compare at least 2 texts on each side
            raise ValueError(f"{path}: {len(recs)} {what}; MAUVE needs at least 2 samples on each side ({keys})")
    fmodel, ftok = load_causal_lm(featurizer_dir, device=str(dev)), load_tokenizer(featurizer_dir)
    ftok.truncation_side = "right"  # human and generated texts alike: their first max_length tokens
    texts = {"p": _texts(human, "response", sc), "q": _texts(gens, "generation", sc)}
    feats = {k: featurize(fmodel, ftok, t, max_length=sc.max_length, batch_size=sc.batch_size, device=str(dev))
             for k, t in texts.items()}
    mv = mauve_score(feats["p"], feats["q"], seed=sc.mauve_seed, scaling_factor=sc.mauve_scaling_factor,
                     num_buckets=sc.mauve_num_buckets)
    by_prompt: dict[int, list[str]] = defaultdict(list)
    for g in gens:
        by_prompt[g["prompt_id"]].append(g["generation"])
    h_by_prompt: dict[str, list[str]] = defaultdict(list)
    for h in human:
        h_by_prompt[h["prompt"]].append(h["response"])
    out = {"mauve": mv["mauve"], "mauve_features": featurizer_label, "self_bleu": _self_bleu(by_prompt, sc),
           "human_self_bleu": _self_bleu(dict(enumerate(h_by_prompt.values())), sc), "n": len(gens),
           "n_human": len(human), "config": asdict(sc),
           "truncated": {"human": n_truncated(ftok, texts["p"], sc.max_length),
                         "generated": n_truncated(ftok, texts["q"], sc.max_length), "max_length": sc.max_length}}
    if toy:  # the human responses are draws from the true modes: their TV is the sampling floor of the set size
        out["modes"] = toy_mode_scores(gens)
        out["human_modes"] = toy_mode_scores([{"instruction": h["instruction"], "generation": h["response"]}
                                              for h in human])
    atomic_write_json(out_json, out)
    write_provenance(out_json, config=asdict(sc), device=str(dev))
    log.info("%s: MAUVE %.4f (%s), Self-BLEU %.4f%s", gens_jsonl, out["mauve"], featurizer_label, out["self_bleu"],
             f", valid {out['modes']['valid']:.2f}, coverage {out['modes']['coverage']:.2f}" if toy else "")
    return out


__all__ = ["ScoreConfig", "score_generations", "toy_mode_scores", "n_truncated", "FEATURIZE", "SELF_BLEU_OVER"]
