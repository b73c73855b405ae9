"""The LM arm's offline corpus: a seeded grammar of instruction/response pairs whose modes are known.

Every instruction of the grammar has a finite set of correct responses (its *modes*), each with a fixed
probability (Zipf-like weights over the modes, so some modes are rare); a model's generations can therefore be
scored the way the image toy's are: which modes it produces (coverage), how far its mode frequencies are from the
true ones (total variation), and how many of its responses are correct at all (valid share). The instruction kinds:

* ``name a colour`` (one instruction, 6 modes) and ``name an animal that can {swim, fly, run}`` (3 instructions,
  4 modes each: many correct answers, the case where cross-entropy training tends to collapse on the frequent ones);
* ``describe the {sky, sea, forest}`` (3 instructions, 6 modes each: two adjectives from the object's own list);
* ``count to {three, four, five}`` (3 instructions, 1 mode each: a deterministic answer, where a good model is
  certain).

Three texts come out of one seed (records in the LM arm's common format, one JSON object per line:
``{"id", "prompt", "response", "category", "instruction", "mode"}``; ``prompt`` is formatted with the configured
template, see :func:`varup.lm.dolly.format_prompt`):

* ``train.jsonl`` — instruction/response pairs for SFT, instructions uniform over the grammar, modes by their weights;
* ``eval.jsonl`` — every instruction ``eval_per_prompt`` times with independently drawn responses: the human
  references MAUVE compares generations against, and the held-out prompts generation is asked for (the toy's prompt
  set is finite, so *held out* means fresh responses, not unseen instructions);
* ``pretrain.txt`` — the "pre-training" text of the toy base model: the same sentences as plain lines without the
  instruction template, so the zero-shot base knows the words but not the task format (as a pre-trained LM knows
  language but not dolly's response style).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from varup.base.utils import atomic_write_json, atomic_write_text

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
ANIMALS = {"swim": ("fish", "duck", "seal", "frog"), "fly": ("bird", "bat", "bee", "owl"),
           "run": ("dog", "horse", "cat", "fox")}
ADJECTIVES = {"sky": ("blue", "clear", "grey", "vast"), "sea": ("deep", "calm", "cold", "wide"),
              "forest": ("dark", "green", "quiet", "old")}
NUMBERS = ("one", "two", "three", "four", "five")
COUNT_TO = {"three": 3, "four": 4, "five": 5}
#: special tokens of the toy tokenizer (a word-level vocabulary over the grammar's words)
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


@dataclass(frozen=True)
class Instruction:
    """One instruction of the grammar with its modes (correct responses) and their probabilities."""
    text: str
    category: str
    modes: tuple[str, ...]
    probs: tuple[float, ...]


def _zipf(n: int, a: float = 1.0) -> tuple[float, ...]:
    w = 1.0 / np.arange(1, n + 1) ** a
    return tuple(float(x) for x in w / w.sum())


def instructions() -> list[Instruction]:
    """The grammar's instructions, in a fixed order (the order is part of the corpus's definition)."""
    out = [Instruction("name a colour .", "open_qa", tuple(f"i would say {c} ." for c in COLOURS), _zipf(6))]
    for verb, names in ANIMALS.items():
        out.append(Instruction(f"name an animal that can {verb} .", "open_qa",
                               tuple(f"a {a} can {verb} ." for a in names), _zipf(len(names))))
    for obj, adjs in ADJECTIVES.items():
        pairs = [(a, b) for i, a in enumerate(adjs) for b in adjs[i + 1:]]
        out.append(Instruction(f"describe the {obj} .", "creative_writing",
                               tuple(f"the {obj} is {a} and {b} ." for a, b in pairs), _zipf(len(pairs), 0.7)))
    for word, n in COUNT_TO.items():
        out.append(Instruction(f"count to {word} .", "closed_qa", (" ".join(NUMBERS[:n]) + " .",), (1.0,)))
    return out


def vocabulary(template: str) -> list[str]:
    """Every whitespace-separated word the corpus and the prompt template can produce, specials first."""
    words = {w for ins in instructions() for text in (ins.text, *ins.modes) for w in text.split()}
    words |= {w for w in template.replace("{instruction}", " ").replace("{context_block}", " ").split()}
    return [PAD, EOS, UNK] + sorted(words)


def mode_of(instruction: str, response: str) -> int | None:
    """The index of ``response`` among the modes of ``instruction`` (whitespace-normalised), None when it is none."""
    ins = {i.text: i for i in instructions()}.get(" ".join(instruction.split()))
    if ins is None:
        raise KeyError(f"not an instruction of the toy grammar: {instruction!r}")
    r = " ".join(response.replace(EOS, " ").split())
    return ins.modes.index(r) if r in ins.modes else None


def _draw(rng: np.random.Generator, ins: Instruction) -> int:
    return int(rng.choice(len(ins.modes), p=np.asarray(ins.probs)))


def _record(i: int, ins: Instruction, mode: int, template: str) -> dict:
    from varup.lm.dolly import format_prompt

    return {"id": i, "prompt": format_prompt({"instruction": ins.text, "context": ""}, template),
            "response": ins.modes[mode], "category": ins.category, "instruction": ins.text, "mode": mode}


def _freq(records: list[dict], ins: Instruction) -> list[float]:
    """The share of each mode among the records of ``ins`` (what SFT sees, as opposed to ``ins.probs``)."""
    m = np.bincount([r["mode"] for r in records if r["instruction"] == ins.text], minlength=len(ins.modes))
    return (m / max(m.sum(), 1)).tolist()


def make_corpus(out_dir: str | Path, *, seed: int, n_train: int, eval_per_prompt: int, n_pretrain: int,
                template: str) -> dict:
    """Write ``train.jsonl``, ``eval.jsonl``, ``pretrain.txt`` and ``summary.json`` (counts and the grammar's modes
    with their probabilities) into ``out_dir``; everything is a function of ``seed``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grammar = instructions()
    rng = np.random.default_rng(seed)
    train = [_record(i, ins, _draw(rng, ins), template)
             for i, ins in enumerate(grammar[k] for k in rng.integers(0, len(grammar), n_train))]
    ev = [_record(len(train) + j * len(grammar) + k, ins, _draw(rng, ins), template)
          for j in range(eval_per_prompt) for k, ins in enumerate(grammar)]
    pre_rng = np.random.default_rng([seed, 1])
    lines = []
    for ins in (grammar[k] for k in pre_rng.integers(0, len(grammar), n_pretrain)):
        lines.append(ins.text if pre_rng.random() < 0.3 else ins.modes[_draw(pre_rng, ins)])
    for name, recs in (("train.jsonl", train), ("eval.jsonl", ev)):
        atomic_write_text(out / name, "".join(json.dumps(r) + "\n" for r in recs))
    atomic_write_text(out / "pretrain.txt", "\n".join(lines) + "\n")
    summary = {"seed": seed, "n_train": len(train), "n_eval": len(ev), "n_pretrain": len(lines),
               "template": template, "instructions": [
                   {"instruction": i.text, "category": i.category, "modes": list(i.modes), "probs": list(i.probs),
                    "train_freq": _freq(train, i)} for i in grammar]}
    atomic_write_json(out / "summary.json", summary)
    return summary


__all__ = ["Instruction", "instructions", "vocabulary", "mode_of", "make_corpus", "PAD", "EOS", "UNK"]
