"""The text arm's runs from the validated config: which runs, their training specification, and the checks that
the prompt study's prompts can be taken before any job starts (imported by the workflow at DAG build).

A text run is ``{dataset}/text_d{depth}/{method}/seed{seed}``: the text-conditioned VAR (VAR-CLIP layout) trained
on the dataset's caption table with a method's loss; the prompt study also uses the class-conditional runs
``{dataset}/d{depth}/{method}/seed{seed}`` of the same depth, methods and seeds (family ``var``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from varup.base.text import words_of
from varup.config.errors import ConfigError
from varup.config.keys import deep_merge
from varup.config.plan import Run, run_spec

FAMILY_NAMES = {"var": "VAR", "text": "VAR-CLIP"}  # the generator families of the prompt study, as tables name them
TOY_ENCODER_KEYS = ("dim", "width", "depth", "heads", "max_len")
TOY_FUNCTION_WORDS = {"a", "or", "on", "background", "shape"}


@dataclass(frozen=True)
class TextRun:
    family: str  # "text" (the text-conditioned VAR) or "var" (the class-conditional one)
    run: Run

    @property
    def path(self) -> str:
        r = self.run
        prefix = "text_" if self.family == "text" else ""
        return f"{r.dataset}/{prefix}d{r.depth}/{r.method}/seed{r.seed}"


def text_enabled(cfg: dict) -> bool:
    return bool(cfg["text"]["enabled"])


def text_dataset(cfg: dict) -> str:
    return cfg["text"].get("dataset") or next(iter(cfg["datasets"]))


def text_methods(cfg: dict) -> list[str]:
    return list(cfg["text"].get("methods") or cfg["methods"])


def text_runs(cfg: dict, family: str = "text") -> Iterator[TextRun]:
    t = cfg["text"]
    depth = t.get("depth") or cfg["model"]["depths"][0]
    for method in text_methods(cfg):
        for seed in t.get("seeds") or cfg["seeds"][:1]:
            yield TextRun(family, Run(text_dataset(cfg), int(depth), method, int(seed)))


def study_runs(cfg: dict) -> list[TextRun]:
    """The runs of the prompt study: every family of ``text.prompts.families``."""
    return [r for f in cfg["text"]["prompts"]["families"] for r in text_runs(cfg, f)]


def encoder_spec(cfg: dict) -> dict:
    """The text encoder's settings that define the run (the toy encoder's sizes, or CLIP's architecture)."""
    e = cfg["text"]["encoder"]
    if e["kind"] == "toy":
        return {"kind": "toy", **{k: e[k] for k in TOY_ENCODER_KEYS}}
    return {"kind": "clip", "arch": e["arch"]}


def text_run_spec(cfg: dict, run: Run) -> dict:
    """:func:`varup.config.plan.run_spec` of the class-conditional run, with ``text.train`` merged into its optimiser
    settings and the text settings (encoder, null condition) added."""
    spec = run_spec(cfg, run)
    spec["optim"] = deep_merge(spec["optim"], cfg["text"]["train"])
    spec["text"] = {"encoder": encoder_spec(cfg), "null_condition": cfg["text"]["null_condition"]}
    return spec


def clip_source(cfg: dict, file: str, key: str) -> str:
    """``--url …`` / ``--sha256 …`` of a CLIP weights file when the config overrides the registry's (a mirror):
    ``text.encoder`` for the text tower (ViT-L-14.pt), ``text.prompts.cmmd`` for CMMD's (ViT-L-14-336px.pt)."""
    t = cfg["text"]
    section = t["encoder"] if file == "ViT-L-14.pt" else t["prompts"]["cmmd"]
    return f"--{key} {section[key]}" if section.get(key) else ""  # not set: the registry's


def prompt_problems(cfg: dict) -> list[str]:
    """Why the configured text arm cannot run: unknown dataset or method, or (toy captions and encoder) prompt
    words outside the toy caption grammar's vocabulary, which the toy text encoder could not read."""
    t = cfg["text"]
    if not t["enabled"]:
        return []
    problems = []
    ds = text_dataset(cfg)
    if ds not in cfg["datasets"]:
        problems.append(f"text/dataset: {ds!r} is not a key of datasets")
    problems += [f"text/methods/{i}: {m!r} is not a key of methods" for i, m in enumerate(t.get("methods") or [])
                 if m not in cfg["methods"]]
    if problems or t["captions"]["kind"] != "toy" or t["encoder"]["kind"] != "toy":
        return problems
    d = cfg["datasets"][ds]
    if d["kind"] != "toy":
        return [f"text/captions/kind: toy captions need a toy dataset; datasets/{ds} is {d['kind']!r}"]
    g = d["generator"]
    known = TOY_FUNCTION_WORDS | set(g["shapes"]) | set(g["colours"]) | set(g["sizes"])
    known |= {"plain", "striped"}
    p = t["prompts"]
    prompts = [("text/prompts/droppath/prompt", p["droppath"]["prompt"])]
    prompts += [(f"text/prompts/entanglement/{i}", x) for i, x in enumerate(p["entanglement"])]
    prompts += [(f"text/prompts/descriptiveness/{i}", x) for i, x in enumerate(p["descriptiveness"])]
    for key, prompt in prompts:
        bad = [w for w in words_of(prompt) if w not in known]
        if bad:
            problems.append(f"{key}: {prompt!r} has words the toy captions never use: {bad} (known: {sorted(known)})")
    return problems


def check_text(cfg: dict) -> None:
    problems = prompt_problems(cfg)
    if problems:
        raise ConfigError("the text arm's configuration is invalid:\n  " + "\n  ".join(problems))


__all__ = ["FAMILY_NAMES", "TextRun", "text_enabled", "text_dataset", "text_methods", "text_runs", "study_runs",
           "encoder_spec", "text_run_spec", "prompt_problems", "check_text", "clip_source"]
