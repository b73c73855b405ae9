"""The run plan of the text arm: the text-conditioned VAR (VAR-CLIP layout) and the companion study's prompt
experiments (config ``text``; target ``prompt_study``). Imported by the workflow when the DAG is built.

Its shape is that of every arm's plan (:mod:`varup.config.plan` for the image arm, :mod:`varup.config.lmplan` for
the LM arm): a frozen run record whose ``path`` is where the run's results live under ``results/<experiment>/``
(:class:`TextRun`), :func:`text_enabled`, :func:`text_runs` (every run; none when the arm is off),
:func:`text_run_spec` (the specification its training job records) and :func:`text_problems` /
:func:`check_text` (what the schema cannot say, before any job starts).

A text run is ``{dataset}/text_d{depth}/{method}/seed{seed}``: the text-conditioned VAR trained on the dataset's
caption table with a method's loss. The prompt study also samples the class-conditional runs
``{dataset}/d{depth}/{method}/seed{seed}`` of the same depth, methods and seeds (family ``var``).
"""
from __future__ import annotations

from dataclasses import dataclass

from varup.base.text import words_of
from varup.config.checks import heads_problem, metric_set_size
from varup.config.errors import ConfigError
from varup.config.keys import deep_merge
from varup.config.plan import Run, run_spec

FAMILY_NAMES = {"var": "VAR", "text": "VAR-CLIP"}  # the generator families of the prompt study, as tables name them
TOY_ENCODER_KEYS = ("dim", "width", "depth", "heads", "max_len")
RELEASED = "released"  # the method name of VAR-CLIP's released generator in the prompt study (text.released)
TOY_FUNCTION_WORDS = {"a", "or", "on", "background", "shape"}
#: the toy caption kinds (varup.data.captions.KINDS, unset weights 1) and the shapes each names: or2 / or3 need 2 / 3
TOY_CAPTION_KINDS = {"shape": 1, "class": 1, "attributes": 1, "full": 1, "or2": 2, "or3": 3}


@dataclass(frozen=True)
class TextRun:
    """One run of the text arm (family ``text``), or the class-conditional run of the same dataset, depth, method
    and seed that the prompt study compares it with (family ``var``, an image-arm run)."""
    dataset: str
    depth: int
    method: str
    seed: int
    family: str = "text"

    @property
    def path(self) -> str:
        prefix = "text_" if self.family == "text" else ""
        return f"{self.dataset}/{prefix}d{self.depth}/{self.method}/seed{self.seed}"


def text_enabled(cfg: dict) -> bool:
    return bool(cfg["text"]["enabled"])


def text_dataset(cfg: dict) -> str:
    return cfg["text"].get("dataset") or next(iter(cfg["datasets"]))  # no dataset: the first


def text_methods(cfg: dict) -> list[str]:
    return list(cfg["text"].get("methods") or cfg["methods"])  # no methods: every method


def text_runs(cfg: dict, family: str = "text") -> list[TextRun]:
    """Every run of the text arm (text.methods x text.seeds at text.depth; none when the arm is off); with family
    ``var``, the class-conditional runs the prompt study compares them with."""
    if not text_enabled(cfg):
        return []
    t = cfg["text"]
    depth = int(t.get("depth") or cfg["model"]["depths"][0])  # no depth: the first of model.depths
    seeds = t.get("seeds") or cfg["seeds"][:1]  # no seeds: the first seed
    return [TextRun(text_dataset(cfg), depth, method, int(seed), family)
            for method in text_methods(cfg) for seed in seeds]


def released_run(cfg: dict) -> TextRun | None:
    """VAR-CLIP's released generator as a run of the text family (method :data:`RELEASED`, seed 0), when
    ``text.released`` is set, the arm is on and the study samples the text family; else None."""
    t = cfg["text"]
    if not text_enabled(cfg) or not t.get("released") or "text" not in t["prompts"]["families"]:
        return None
    return TextRun(text_dataset(cfg), int(t["released"]["depth"]), RELEASED, 0, "text")


def study_runs(cfg: dict) -> list[TextRun]:
    """The runs of the prompt study: every family of ``text.prompts.families``, and the released VAR-CLIP."""
    runs = [r for f in cfg["text"]["prompts"]["families"] for r in text_runs(cfg, f)]
    return runs + [r for r in [released_run(cfg)] if r is not None]


def text_settings(cfg: dict) -> dict:
    """The one home of the text settings whose default follows the weights: ``act`` (``text.encoder.act``) and
    ``null_condition`` (``text.null_condition``). Their schema default ``auto`` means: with VAR-CLIP's released
    weights (``text.released`` set) what VAR-CLIP ran, plain GELU in CLIP's text tower (open_clip loads its
    ``ViT-L-14.pt`` by path) and its learned null vector for CFG; otherwise OpenAI's QuickGELU and the empty
    caption. A value other than ``auto`` is kept as given."""
    t = cfg["text"]
    released = bool(t.get("released"))
    act = t["encoder"].get("act", "auto")
    null = t.get("null_condition", "auto")
    return {"act": ("gelu" if released else "quick_gelu") if act == "auto" else act,
            "null_condition": ("learned" if released else "empty_caption") if null == "auto" else null}


def encoder_spec(cfg: dict) -> dict:
    """The text encoder's settings that define the run (the toy encoder's sizes, or CLIP's architecture and
    activation)."""
    e = cfg["text"]["encoder"]
    if e["kind"] == "toy":
        return {"kind": "toy", **{k: e[k] for k in TOY_ENCODER_KEYS}}
    return {"kind": "clip", "arch": e["arch"], "act": text_settings(cfg)["act"]}


def text_run_spec(cfg: dict, run: TextRun) -> dict:
    """The complete specification of one text run's training job: :func:`varup.config.plan.run_spec` of the
    class-conditional run of the same dataset, depth, method and seed, with ``text.train`` merged into its optimiser
    settings and the text settings (encoder, null condition) added."""
    spec = run_spec(cfg, Run(run.dataset, run.depth, run.method, run.seed))
    spec["optim"] = deep_merge(spec["optim"], cfg["text"]["train"])
    spec["text"] = {"encoder": encoder_spec(cfg), "null_condition": text_settings(cfg)["null_condition"]}
    return spec


def clip_source(cfg: dict, file: str, key: str) -> str:
    """``--url …`` / ``--sha256 …`` of a CLIP weights file when the config overrides the registry's (a mirror):
    ``text.encoder`` for the text tower (ViT-L-14.pt), ``text.prompts.cmmd`` for CMMD's (ViT-L-14-336px.pt)."""
    t = cfg["text"]
    section = t["encoder"] if file == "ViT-L-14.pt" else t["prompts"]["cmmd"]
    return f"--{key} {section[key]}" if section.get(key) else ""  # not set: the registry's


def text_problems(cfg: dict) -> list[str]:
    """Why the configured text arm cannot run (none when it is off), each named by its key: an unknown dataset or
    method, settings a job would refuse only after training (heads that do not split a width, captions that cannot
    be drawn, prompt sets too small for the metrics that score them: varup.config.checks.metric_set_size), and
    (toy captions and encoder) prompt words outside the toy caption grammar's vocabulary, which the toy text
    encoder could not read, or prompts longer than it takes."""
    t = cfg["text"]
    if not t["enabled"]:
        return []
    problems = []
    ds = text_dataset(cfg)
    if ds not in cfg["datasets"]:
        problems.append(f"text/dataset: {ds!r} is not a key of datasets")
    problems += [f"text/methods/{i}: {m!r} is not a key of methods" for i, m in enumerate(t.get("methods") or [])
                 if m not in cfg["methods"]]
    problems += _size_problems(cfg) + _released_problems(cfg)
    if problems:
        return problems
    problems += _caption_problems(cfg, cfg["datasets"][ds])
    if problems or t["captions"]["kind"] != "toy" or t["encoder"]["kind"] != "toy":
        return problems
    return _toy_prompt_problems(cfg, cfg["datasets"][ds]["generator"])


def _size_problems(cfg: dict) -> list[str]:
    """Heads against widths (the text VAR's and the toy encoder's) and the prompt sets' size against the metrics."""
    t, out = cfg["text"], []
    depth = int(t.get("depth") or cfg["model"]["depths"][0])  # no depth: the first of model.depths
    if p := heads_problem(cfg, depth, " (the text runs' depth, text/depth)"):
        out.append(p)
    e = t["encoder"]
    if e["kind"] == "toy" and e["width"] % e["heads"]:  # the layer is built even at depth 0
        out.append(f"text/encoder/heads: {e['heads']} does not divide text/encoder/width {e['width']}")
    need, n = metric_set_size(cfg), t["prompts"]["n_images"]
    if n < need:
        m = cfg["metrics"]
        out.append(f"text/prompts/n_images: {n} images per prompt set; FID/KID scoring takes precision/recall and "
                   f"PRDC too, which need {need} (metrics/prc_neighborhood {m['prc_neighborhood']}, "
                   f"metrics/prdc_nearest_k {m['prdc_nearest_k']})")
    return out


def _released_problems(cfg: dict) -> list[str]:
    """VAR-CLIP's released generator needs CLIP's text tower and the official VQVAE it was trained with, and its
    method name must be free."""
    t = cfg["text"]
    if not t.get("released"):
        return []
    out = []
    if t["encoder"]["kind"] != "clip":
        out.append("text/released: VAR-CLIP's released generator reads CLIP ViT-L/14 text embeddings: set "
                   "text/encoder/kind clip")
    ds = text_dataset(cfg)
    tok = cfg["datasets"].get(ds, {}).get("tokenizer")
    if ds in cfg["datasets"] and cfg["tokenizers"].get(tok, {}).get("kind") != "official":
        out.append(f"text/released: VAR-CLIP's released generator decodes with the official VQVAE "
                   f"(vae_ch160v4096z32): datasets/{ds}/tokenizer must name a tokenizer of kind official")
    if RELEASED in cfg["methods"]:
        out.append(f"methods/{RELEASED}: the name is taken by VAR-CLIP's released generator (text/released)")
    return out


def _caption_problems(cfg: dict, d: dict) -> list[str]:
    """The caption source: toy captions need a toy dataset and a kind of positive weight that its shapes can
    form (or2/or3 name 2/3 shapes); file needs a path, templates the templates."""
    c = cfg["text"]["captions"]
    if c["kind"] == "file" and "path" not in c:
        return ["text/captions/path: required for kind 'file' (a path,caption CSV or VAR-CLIP's .txt)"]
    if c["kind"] == "templates" and "templates" not in c:
        return ["text/captions/templates: required for kind 'templates' (e.g. ['a photo of a {}'])"]
    if c["kind"] != "toy":
        return []
    if d["kind"] != "toy":
        return [f"text/captions/kind: toy captions need a toy dataset; datasets/{text_dataset(cfg)} is {d['kind']!r}"]
    n_shapes = len(d["generator"]["shapes"])
    weights = {k: c.get("kind_weights", {}).get(k, 1.0) for k in TOY_CAPTION_KINDS}  # unset: 1 (varup.data.captions)
    usable = [k for k, w in weights.items() if w > 0 and n_shapes >= TOY_CAPTION_KINDS[k]]
    if usable:
        return []
    return [f"text/captions/kind_weights: no caption kind has a positive weight that datasets/{text_dataset(cfg)} "
            f"({n_shapes} shapes) can use (weights {weights}; or2 / or3 name 2 / 3 shapes), so no image would have a "
            f"caption: give one kind a weight > 0"]


def _toy_prompt_problems(cfg: dict, g: dict) -> list[str]:
    """The study's prompts against the toy grammar's words and the toy encoder's max_len."""
    known = TOY_FUNCTION_WORDS | set(g["shapes"]) | set(g["colours"]) | set(g["sizes"])
    known |= {"plain", "striped"}
    p, max_len = cfg["text"]["prompts"], cfg["text"]["encoder"]["max_len"]
    prompts = [("text/prompts/droppath/prompt", p["droppath"]["prompt"])]
    prompts += [(f"text/prompts/entanglement/{i}", x) for i, x in enumerate(p["entanglement"])]
    prompts += [(f"text/prompts/descriptiveness/{i}", x) for i, x in enumerate(p["descriptiveness"])]
    problems = []
    for key, prompt in prompts:
        words = words_of(prompt)
        bad = [w for w in words if w not in known]
        if bad:
            problems.append(f"{key}: {prompt!r} has words the toy captions never use: {bad} (known: {sorted(known)})")
        if len(words) + 1 > max_len:
            problems.append(f"{key}: {prompt!r} has {len(words)} words; the toy text encoder takes "
                            f"text/encoder/max_len - 1 = {max_len - 1}")
    return problems


def check_text(cfg: dict) -> None:
    """Raise ConfigError naming every problem of :func:`text_problems`."""
    problems = text_problems(cfg)
    if problems:
        raise ConfigError("the text arm's configuration is invalid:\n  " + "\n  ".join(problems))

