"""The run plan of the LM arm: the paper's Table 6, supervised fine-tuning of a causal language model with
cross-entropy and with the objective, scored by MAUVE and Self-BLEU (config ``lm``; target ``lm_study``). Imported
by the workflow when the DAG is built.

Its shape is that of every arm's plan (:mod:`varup.config.plan` for the image arm, :mod:`varup.config.textplan` for
the text arm): a frozen run record whose ``path`` is where the run's results live under ``results/<experiment>/``
(:class:`LMRun`), :func:`lm_enabled`, :func:`lm_runs` (every run; none when the arm is off), :func:`lm_run_spec`
(the specification its SFT job records) and :func:`lm_problems` / :func:`check_lm` (what the schema cannot say,
raised at DAG build, naming the key).

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
    """One generation set of Table 6: an SFT run (method x seed), or the zero-shot base model (method ``zero_shot``,
    the seed that of its generations)."""
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
    """Every generation set of Table 6 (none when the arm is off): the zero-shot base (per seed: the generation
    seed) and each method x seed."""
    if not lm_enabled(cfg):
        return []
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


def lm_run_spec(cfg: dict, run: LMRun) -> dict:
    """The complete specification of one run's SFT job: ``lm.train`` with the run's seed and its method's loss."""
    return {**cfg["lm"]["train"], "seed": run.seed, "loss": dict(lm_methods(cfg)[run.method])}


def pretrain_spec(cfg: dict, featurizer: bool = False) -> dict:
    """The pre-training settings of the toy base model (or, with another seed, of the toy MAUVE featurizer)."""
    t = dict(cfg["lm"]["base"]["train"])
    if featurizer:
        t["seed"] = cfg["lm"]["featurizer"]["seed"]
    return t


def featurizer_label(cfg: dict) -> str:
    f = cfg["lm"]["featurizer"]
    return "toy-MAUVE (a toy LM trained on the grammar)" if f["kind"] == "toy" else f"MAUVE ({f['repo']})"


def lm_problems(cfg: dict) -> list[str]:
    """Why the configured LM arm cannot run (none when it is off): what the schema cannot say about ``lm``."""
    if not lm_enabled(cfg):
        return []
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
    if "toy" in (lm["base"]["kind"], lm["featurizer"]["kind"]):
        out += toy_model_problems(lm["base"]["model"])
    if lm["score"].get("self_bleu_over") == "prompt" and lm["generate"].get("n_per_prompt", 1) < 2:  # DecodeConfig's 1
        out.append("lm/score/self_bleu_over: 'prompt' compares each prompt's samples with each other, so it needs "
                   "lm/generate/n_per_prompt >= 2 (use 'all', or sample more per prompt)")
    return out


#: the attention shape of varup.lm.toy.TOY_MODEL (varup.lm imports torch, so varup.config cannot read it; a test
#: holds the two equal), which lm.base.model's keys override
TOY_MODEL_HEADS = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}


def toy_model_problems(model: dict) -> list[str]:
    """The toy LM's attention shape (``lm.base.model`` over :data:`TOY_MODEL_HEADS`): Qwen2 splits hidden_size into
    num_attention_heads heads of an even size (rotary embeddings rotate pairs) and shares each key/value head among
    num_attention_heads / num_key_value_heads query heads."""
    m = {**TOY_MODEL_HEADS, **model}
    hidden, heads, kv = m["hidden_size"], m["num_attention_heads"], m["num_key_value_heads"]
    key = "lm/base/model"
    if hidden % heads:
        return [f"{key}/num_attention_heads: {heads} does not divide {key}/hidden_size {hidden}"]
    out = []
    if (hidden // heads) % 2:
        out.append(f"{key}/num_attention_heads: {heads} heads of {hidden // heads} dimensions ({key}/hidden_size "
                   f"{hidden}); rotary position embeddings need an even head size")
    if heads % kv:
        out.append(f"{key}/num_key_value_heads: {kv} does not divide {key}/num_attention_heads {heads} (each "
                   f"key/value head serves a whole group of query heads)")
    return out


def check_lm(cfg: dict) -> None:
    """Raise ConfigError naming every problem of :func:`lm_problems`."""
    problems = lm_problems(cfg)
    if problems:
        raise ConfigError("the LM arm's configuration is invalid:\n  " + "\n  ".join(problems))

