"""The text arm's configuration (``lm:``) as the Snakefile reads it: which runs exist, each job's settings, and the
checks a schema cannot make (raised at DAG build, naming the key).

Paths (under ``results/<experiment>/lm/``): ``corpus/`` (train.jsonl, eval.jsonl, toy: pretrain.txt), ``base/`` and
``featurizer/`` (toy models; hub models live under ``resources/hf/<repo>``), ``refs.pt``, and per run
``<method>/seed<seed>/`` with ``model/`` (a save_pretrained folder), ``train/``, ``generations.jsonl`` and
``scores.json``; the zero-shot row is the method ``zero_shot`` (the base model, no training).
"""
from __future__ import annotations

from dataclasses import dataclass

from varup.config.errors import ConfigError

ZERO_SHOT = "zero_shot"
#: files of a hub causal LM fetched when ``lm.base.files`` / ``lm.featurizer.files`` are not given
DEFAULT_FILES = {
    "Qwen/Qwen1.5-0.5B": ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "vocab.json", "merges.txt"],
    "gpt2-large": ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                   "merges.txt"],
}
DOLLY_URL = ("https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/"
             "databricks-dolly-15k.jsonl")
#: the prompt template of the toy corpus when lm.template is left at its default (the toy tokenizer knows its words)
TOY_TEMPLATE = "### instruction : {instruction} ### response :"


@dataclass(frozen=True)
class LMRun:
    method: str
    seed: int

    @property
    def path(self) -> str:
        return f"lm/{self.method}/seed{self.seed}"


def lm_enabled(cfg: dict) -> bool:
    return bool(cfg["lm"]["enabled"])


def lm_methods(cfg: dict) -> dict[str, dict]:
    """Loss of each SFT method: ``lm.methods``, else the top-level ``methods`` (the objective carries over)."""
    return cfg["lm"].get("methods") or cfg["methods"]


def lm_runs(cfg: dict) -> list[LMRun]:
    """Every generation set of Table 6: the zero-shot base (per seed: the generation seed) and each method x seed."""
    seeds = cfg["lm"]["seeds"]
    zs = [LMRun(ZERO_SHOT, s) for s in seeds] if cfg["lm"]["zero_shot"] else []
    return zs + [LMRun(m, s) for m in lm_methods(cfg) for s in seeds]


def is_toy(cfg: dict) -> bool:
    return cfg["lm"]["corpus"]["kind"] == "toy"


def template(cfg: dict) -> str:
    t = cfg["lm"]["template"]
    return TOY_TEMPLATE if cfg["lm"]["base"]["kind"] == "toy" and t == "dolly" else t


def hub_dir(cfg: dict, part: str) -> str:
    """Where a hub model of ``lm.base`` / ``lm.featurizer`` is fetched to."""
    return f"{cfg['resources_dir']}/hf/{cfg['lm'][part]['repo'].replace('/', '--')}"


def hub_files(cfg: dict, part: str) -> list[str]:
    p = cfg["lm"][part]
    return p.get("files") or DEFAULT_FILES.get(p["repo"], DEFAULT_FILES["Qwen/Qwen1.5-0.5B"])


def sft_spec(cfg: dict, run: LMRun) -> dict:
    """The SFT settings of one run: ``lm.train`` with the run's seed and its method's loss."""
    return {**cfg["lm"]["train"], "seed": run.seed, "loss": dict(lm_methods(cfg)[run.method])}


def pretrain_spec(cfg: dict, featurizer: bool = False) -> dict:
    t = dict(cfg["lm"]["base"]["train"])
    if featurizer:
        t["seed"] = cfg["lm"]["featurizer"]["seed"]
    return t


def featurizer_label(cfg: dict) -> str:
    f = cfg["lm"]["featurizer"]
    return "toy-MAUVE (a toy LM trained on the grammar)" if f["kind"] == "toy" else f"MAUVE ({f['repo']})"


def lm_problems(cfg: dict) -> list[str]:
    """What the schema cannot say about ``lm:``."""
    lm, out = cfg["lm"], []
    toy_corpus = lm["corpus"]["kind"] == "toy"
    if lm["base"]["kind"] == "toy" and not toy_corpus:
        out.append("lm/base/kind: 'toy' has a word-level tokenizer over the toy grammar only; with lm/corpus/kind "
                   f"{lm['corpus']['kind']!r} use kind 'hub'")
    if lm["featurizer"]["kind"] == "toy" and not toy_corpus:
        out.append("lm/featurizer/kind: 'toy' is trained on the toy grammar's text; with lm/corpus/kind "
                   f"{lm['corpus']['kind']!r} use kind 'hub' (gpt2-large)")
    if lm["base"]["kind"] == "toy" and lm["template"] not in ("dolly", TOY_TEMPLATE) \
            and "{instruction}" not in lm["template"]:
        out.append(f"lm/template: {lm['template']!r} has no {{instruction}} field")
    if ZERO_SHOT in lm_methods(cfg):
        out.append(f"lm/methods: {ZERO_SHOT!r} is the name of the zero-shot row; call the method something else")
    if not lm_methods(cfg):
        out.append("lm/methods: no SFT method (and no top-level methods)")
    return out


def check_lm(cfg: dict) -> None:
    problems = lm_problems(cfg)
    if problems:
        raise ConfigError("the language-model arm's configuration is invalid:\n  " + "\n  ".join(problems))


__all__ = ["LMRun", "ZERO_SHOT", "DEFAULT_FILES", "DOLLY_URL", "TOY_TEMPLATE", "lm_enabled", "lm_methods", "lm_runs",
           "is_toy", "template", "hub_dir", "hub_files", "sft_spec", "pretrain_spec", "featurizer_label",
           "lm_problems", "check_lm"]
