"""Config loading, schema validation and the mapping from the config to runs and per-job settings.

Imported by the Snakefile, so it must stay light (no torch import): ``snakemake -n`` is fast.
A *run* is one training job: (dataset, depth, method, seed). Its results live under
``results/{experiment}/{dataset}/d{depth}/{method}/seed{seed}/``.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import yaml

# The JSON schema ships inside the package (pyproject package-data), so an installed varup validates too.
DEFAULT_SCHEMA = resources.files("varup").joinpath("schema.yaml")

OFFICIAL_VAE_URL = "https://huggingface.co/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth"


class ConfigError(ValueError):
    pass


def _format_path(path) -> str:
    return "/".join(str(p) for p in path) or "<top level>"


def validate(cfg: dict, schema_path: str | os.PathLike = DEFAULT_SCHEMA, set_defaults: bool = True) -> dict:
    """Validate against the JSON schema, filling schema defaults; raise ConfigError naming every bad key."""
    import jsonschema

    schema = read_schema(schema_path)
    coerce_text_values(cfg, schema)
    cls = jsonschema.validators.validator_for(schema)
    errors = sorted(cls(schema).iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_format_path(e.absolute_path)}: {e.message}{_text_hint(e)}" for e in errors]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    if set_defaults:
        _fill_defaults(cfg, schema, schema)
    _check_cross_references(cfg)
    return cfg


_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def coerce_text_values(cfg: dict, schema: dict) -> dict:
    """Convert, in place, text where the schema wants an integer, a number, a boolean or null: Snakemake reads the
    values inside a nested ``--config`` override as text (``--config 'train={steps: 10}'`` gives ``'10'``). Text
    that does not read as the wanted type stays (validation then names its key)."""
    _coerce(cfg, schema, schema)
    return cfg


def _coerce(value: Any, node: dict, root: dict) -> Any:
    node = _resolve(node, root)
    if isinstance(value, dict):
        props, extra = node.get("properties", {}), node.get("additionalProperties")
        for k, v in value.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if sub is not None:
                value[k] = _coerce(v, sub, root)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        value[:] = [_coerce(v, node["items"], root) for v in value]
    elif isinstance(value, str):
        return _from_text(value, node)
    return value


def _from_text(text: str, node: dict) -> Any:
    types = node.get("type") or []
    types = [types] if isinstance(types, str) else types
    t = text.strip()
    if not types or "string" in types:
        return text
    if "null" in types and t.lower() in ("null", "~", "none", ""):
        return None
    if "boolean" in types and t.lower() in _BOOLEANS:
        return _BOOLEANS[t.lower()]
    for kind, parse in (("integer", int), ("number", int), ("number", float)):
        if kind in types:
            try:
                return parse(t)
            except ValueError:
                pass
    return text


def _text_hint(e) -> str:
    """What to do about text where the schema wants another type (a ``--config`` value it could not convert)."""
    if e.validator != "type" or not isinstance(e.instance, str):
        return ""
    return (" (a `--config` value is read as text and converted to the type the schema wants where it can; this "
            "one could not be: fix it, or put nested settings in a file given with --configfile)")


def read_schema(schema_path=DEFAULT_SCHEMA) -> dict:
    """The schema as a dict; a path, or the packaged resource (a Path, or a Traversable in a zipped install)."""
    src = Path(schema_path) if isinstance(schema_path, (str, os.PathLike)) else schema_path
    return yaml.safe_load(src.read_text())


def _resolve(node: dict, root: dict) -> dict:
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/")
        target = root
        for part in ref[2:].split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _fill_defaults(obj: Any, node: dict, root: dict) -> None:
    node = _resolve(node, root)
    if not isinstance(obj, dict):
        return
    for key, sub in node.get("properties", {}).items():
        sub = _resolve(sub, root)
        if key not in obj and "default" in sub:
            obj[key] = copy.deepcopy(sub["default"])
        if key in obj:
            _fill_defaults(obj[key], sub, root)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        for key, val in obj.items():
            if key not in node.get("properties", {}):
                _fill_defaults(val, extra, root)


def _check_cross_references(cfg: dict) -> None:
    problems = []
    for name, ds in cfg["datasets"].items():
        if ds["tokenizer"] not in cfg["tokenizers"]:
            problems.append(f"datasets/{name}/tokenizer: {ds['tokenizer']!r} is not defined under tokenizers "
                            f"(have {sorted(cfg['tokenizers'])})")
        if ds["kind"] in ("folder", "imagenet100") and "root" not in ds:
            problems.append(f"datasets/{name}/root: required for kind {ds['kind']!r}")
        if ds["kind"] == "toy" and "num_classes" in ds:
            n = len(ds.get("generator", {}).get("shapes", ["circle", "square", "triangle", "cross"]))
            if ds["num_classes"] != n:
                problems.append(f"datasets/{name}/num_classes: {ds['num_classes']} but the generator has {n} shapes")
        if ds.get("tokenizer_gate") and ds["kind"] != "toy":
            problems.append(f"datasets/{name}/tokenizer_gate: needs the toy mode classifier, so only kind 'toy' "
                            f"can have it (this dataset is {ds['kind']!r})")
    for name, tok in cfg["tokenizers"].items():
        if tok["kind"] == "train" and "vqvae" not in tok:
            problems.append(f"tokenizers/{name}/vqvae: required for kind 'train'")
    for name, d in cfg["datasets"].items():
        for key in LAUNCH_KEYS:
            if key in d.get("train", {}):
                problems.append(f"datasets/{name}/train/{key}: set {key} at the top level (train/{key}); it sizes the "
                                f"training rule for every dataset")
    ex = cfg.get("experiments", {})
    for key in ("figure4", "ood", "downstream"):
        if key in ex and ex[key]["dataset"] not in cfg["datasets"]:
            problems.append(f"experiments/{key}/dataset: {ex[key]['dataset']!r} is not defined under datasets")
    if "figure4" in ex:
        f4 = ex["figure4"]
        if int(f4["depth"]) not in cfg["model"]["depths"] and f4.get("cfg"):
            problems.append(f"experiments/figure4/depth: {f4['depth']} is not in model/depths, so the cfg sweep has "
                            f"no trained runs to sample")
        for m in f4.get("cfg_methods", []):
            if m not in cfg["methods"]:
                problems.append(f"experiments/figure4/cfg_methods: {m!r} is not defined under methods")
        base = f4.get("base_method", "ours")
        if base not in cfg["methods"]:
            problems.append(f"experiments/figure4/base_method: {base!r} is not defined under methods")
    problems += _lambda_study_problems(cfg)
    problems += _checkpoint_problems(cfg)
    if "downstream" in ex:
        missing = [m for m in ex["downstream"].get("methods", ["baseline", "ours"]) if m not in cfg["methods"]]
        if missing:
            problems.append(f"experiments/downstream/methods: {missing} not defined under methods")
    problems += _uncertainty_problems(cfg)
    problems += _folder_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join("  " + p for p in problems))


def _lambda_study_problems(cfg: dict) -> list[str]:
    ls = cfg.get("experiments", {}).get("lambda_study")
    if not ls:
        return []
    out = []
    d = cfg["datasets"].get(ls["dataset"])
    if d is None:
        return [f"experiments/lambda_study/dataset: {ls['dataset']!r} is not defined under datasets"]
    if d["kind"] != "toy":
        out.append(f"experiments/lambda_study/dataset: {ls['dataset']!r} is not a toy dataset; the study scores mode "
                   f"coverage, which needs known modes (on real data use experiments/figure4)")
    if ls.get("baseline", "baseline") not in ls["points"]:
        out.append(f"experiments/lambda_study/baseline: {ls.get('baseline', 'baseline')!r} is not one of the points "
                   f"{sorted(ls['points'])}")
    if ls.get("depth") and int(ls["depth"]) not in cfg["model"]["depths"]:
        out.append(f"experiments/lambda_study/depth: {ls['depth']} is not in model/depths")
    return out


def _checkpoint_problems(cfg: dict) -> list[str]:
    """A checkpoint is written only after a finite-loss check: ckpt_every must be a multiple of the check interval."""
    out = []
    for where, t in [("train", cfg["train"])] + [(f"datasets/{n}/train", deep_merge(cfg["train"], d.get("train")))
                                                  for n, d in cfg["datasets"].items() if d.get("train")]:
        every, check = t.get("ckpt_every", 200), t.get("nonfinite_check_every", 1)
        if every % check:
            out.append(f"{where}/ckpt_every: {every} is not a multiple of {where}/nonfinite_check_every ({check})")
    return out


def _uncertainty_problems(cfg: dict) -> list[str]:
    """The uncertainty study's image sets are scored by FID/KID/PR: each must hold enough images for the
    neighbourhood metrics; its classes must exist in every dataset the study runs on, and its runs be trained."""
    from varup.metrics import min_set_size

    if not uncertainty_enabled(cfg):
        return []
    u = cfg["uncertainty"]
    m = cfg.get("metrics", {})
    need = min_set_size(m.get("prc_neighborhood", 3), m.get("prdc_nearest_k", 5))
    problems = []
    sizes = {"uncertainty/sweep_n_per_class": u.get("sweep_n_per_class", 0) * len(u.get("classes", [])),
             "uncertainty/entanglement_n": u.get("entanglement_n", 0)}
    for key, n in sizes.items():
        if n < need:
            problems.append(f"{key}: its image sets hold {n} images, fewer than the {need} that "
                            f"metrics/prdc_nearest_k and metrics/prc_neighborhood need")
    for name in u.get("mask_dirs", {}):
        if name not in cfg["datasets"]:
            problems.append(f"uncertainty/mask_dirs/{name}: not a dataset defined under datasets")
    untrained = [s for s in u.get("run_seeds") or [] if s not in cfg["seeds"]]
    if untrained:
        problems.append(f"uncertainty/run_seeds: {untrained} not in seeds {cfg['seeds']}: the studies run on trained "
                        f"runs only, so these seeds would have none (choose run_seeds among seeds)")
    return problems + _uncertainty_class_problems(cfg)


def _uncertainty_class_problems(cfg: dict) -> list[str]:
    """Every class the studies sample (uncertainty/classes/<i>, uncertainty/entanglement_mixes/<i>/<j>) must exist in
    the datasets they run on; each bad value is named by its own key."""
    u = cfg["uncertainty"]
    where = [(f"uncertainty/classes/{i}", c) for i, c in enumerate(u.get("classes", []))]
    where += [(f"uncertainty/entanglement_mixes/{i}/{j}", c) for i, mix in enumerate(u.get("entanglement_mixes", []))
              for j, c in enumerate(mix)]
    problems = []
    for name in sorted({r.dataset for r in main_runs(cfg)}):
        n_cls = cfg["datasets"][name].get("num_classes")
        problems += [f"{key}: class {c} is out of range for datasets/{name} ({n_cls} classes: 0 to {n_cls - 1})"
                     for key, c in where if n_cls is not None and c >= n_cls]
    return problems


def _folder_problems(cfg: dict) -> list[str]:
    """``num_classes`` of a folder dataset against its folder, when the folder can be read now (else the prepare job
    checks it)."""
    out = []
    for name, ds in cfg["datasets"].items():
        root = Path(str(ds.get("root", ""))).expanduser()
        if ds["kind"] == "folder" and "num_classes" in ds and "root" in ds and root.is_dir():
            problem = num_classes_problem(f"datasets/{name}/num_classes", ds["num_classes"], root, folder_classes(root))
            out += [problem] if problem else []
    return out


def class_dir_names(folder: str | os.PathLike) -> list[str]:
    """The sorted, non-hidden sub-directories of ``folder``: the classes of a ``<folder>/<class>/<image>`` tree."""
    return sorted(d.name for d in Path(folder).iterdir() if d.is_dir() and not d.name.startswith("."))


def folder_classes(root: str | os.PathLike) -> list[str]:
    """The classes of a folder dataset as ``varup prepare --kind folder`` reads them: those of ``root/train`` when
    ``root`` has ``train/`` and ``val/`` (a released split), else those of ``root``."""
    root = Path(root)
    released = (root / "train").is_dir() and (root / "val").is_dir()
    return class_dir_names(root / "train" if released else root)


def num_classes_problem(key: str, num_classes: int, root: str | os.PathLike, classes: list[str]) -> str | None:
    """Why ``num_classes`` (config ``key``) does not fit the folder ``root`` with ``classes``; None when it does."""
    if num_classes == len(classes):
        return None
    shown = classes if len(classes) <= 8 else classes[:8] + ["..."]
    return (f"{key}: {num_classes}, but the folder {root} has {len(classes)} class folders {shown}: set num_classes "
            f"to {len(classes)} (or leave it out: the classes are the folder's)")


def load_config(path: str | os.PathLike, schema_path: str | os.PathLike = DEFAULT_SCHEMA) -> dict:
    p = Path(path)
    try:
        cfg = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    try:
        return validate(cfg, schema_path)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def deep_merge(base: dict, over: dict | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# ---------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    dataset: str
    depth: int
    method: str
    seed: int

    @property
    def path(self) -> str:
        return f"{self.dataset}/d{self.depth}/{self.method}/seed{self.seed}"


def main_runs(cfg: dict) -> Iterator[Run]:
    """Table 2: every dataset x depth x method x seed."""
    for ds in cfg["datasets"]:
        for depth in cfg["model"]["depths"]:
            for method in cfg["methods"]:
                for seed in cfg["seeds"]:
                    yield Run(ds, int(depth), method, int(seed))


def _num(v: float) -> str:
    return f"{v:g}"


def grid_method(l1: float, l2: float) -> str:
    return f"grid_l1-{_num(l1)}_l2-{_num(l2)}"


def method_with_loss(cfg: dict, loss: dict, new_name: str) -> str:
    """The configured method whose loss is exactly ``loss`` (its runs are reused), else ``new_name``."""
    return next((m for m, l in cfg["methods"].items() if l == loss), new_name)


def grid_points(cfg: dict) -> dict[tuple[float, float], str]:
    """Figure 4's lambda_2nd x lambda_se grid -> the method that trains each point: an existing method when its
    loss is identical (e.g. (0, 0) is the baseline), else a derived ``grid_l1-*_l2-*`` method."""
    f4 = cfg.get("experiments", {}).get("figure4")
    if not f4:
        return {}
    base = cfg["methods"][f4.get("base_method", "ours")]
    out = {}
    for a in f4.get("lambda_2nd", []):
        for b in f4.get("lambda_se", []):
            out[(a, b)] = method_with_loss(cfg, {**base, "lambda_2nd": a, "lambda_se": b}, grid_method(a, b))
    return out


def ablation_methods(cfg: dict) -> dict[str, dict]:
    """The extra methods Figure 4's grid needs (points not already trained as a configured method)."""
    f4 = cfg.get("experiments", {}).get("figure4")
    if not f4:
        return {}
    base = cfg["methods"][f4.get("base_method", "ours")]
    return {m: {**base, "lambda_2nd": a, "lambda_se": b} for (a, b), m in grid_points(cfg).items()
            if m not in cfg["methods"]}


def ablation_runs(cfg: dict) -> Iterator[Run]:
    f4 = cfg.get("experiments", {}).get("figure4")
    if not f4:
        return
    for method in ablation_methods(cfg):
        for seed in f4.get("seeds", [cfg["seeds"][0]]):
            yield Run(f4["dataset"], int(f4["depth"]), method, int(seed))


def runs(cfg: dict) -> Iterator[Run]:
    """Every training job: Table 2's runs, then Figure 4's grid (without duplicates)."""
    seen = set()
    for r in (*main_runs(cfg), *ablation_runs(cfg)):
        if r not in seen:
            seen.add(r)
            yield r


def lambda_points(cfg: dict) -> dict[str, str]:
    """The λ study's points -> the method that trains each: a configured method when its loss is identical
    (so e.g. the baseline's seeds 0 and 1 are the default run's), else a derived ``lam_<point>`` method."""
    ls = cfg.get("experiments", {}).get("lambda_study")
    if not ls:
        return {}
    return {name: method_with_loss(cfg, loss, f"lam_{name}") for name, loss in ls["points"].items()}


def lambda_methods(cfg: dict) -> dict[str, dict]:
    ls = cfg.get("experiments", {}).get("lambda_study")
    return {m: dict(ls["points"][p]) for p, m in lambda_points(cfg).items() if m not in cfg["methods"]}


def lambda_runs(cfg: dict) -> list[tuple[str, Run]]:
    """(point, run) for every point x seed of the λ study."""
    ls = cfg.get("experiments", {}).get("lambda_study")
    if not ls:
        return []
    depth = int(ls.get("depth") or cfg["model"]["depths"][0])
    return [(p, Run(ls["dataset"], depth, m, int(s))) for p, m in lambda_points(cfg).items() for s in ls["seeds"]]


def all_methods(cfg: dict) -> dict[str, dict]:
    return {**cfg["methods"], **ablation_methods(cfg), **lambda_methods(cfg)}


def cfg_sweep(cfg: dict) -> list[tuple[Run, float]]:
    """Figure 4's classifier-free-guidance sweep: (run, cfg) pairs sampled and scored at another CFG scale."""
    f4 = cfg.get("experiments", {}).get("figure4")
    if not f4 or not f4.get("cfg"):
        return []
    seeds = f4.get("seeds", [cfg["seeds"][0]])
    return [(Run(f4["dataset"], int(f4["depth"]), m, int(s)), float(c))
            for m in f4.get("cfg_methods", ["baseline", "ours"]) for s in seeds for c in f4["cfg"]]


def ood_runs(cfg: dict) -> list[Run]:
    o = cfg.get("experiments", {}).get("ood")
    return [r for r in main_runs(cfg) if o and r.dataset == o["dataset"]]


def downstream_pairs(cfg: dict) -> list[tuple[str, int]]:
    d = cfg.get("experiments", {}).get("downstream")
    if not d:
        return []
    return [(d["dataset"], int(d.get("depth", cfg["model"]["depths"][0])))]


def train_settings(cfg: dict, dataset: str) -> dict:
    out = deep_merge(cfg["train"], cfg["datasets"][dataset].get("train"))
    out.setdefault("precision", cfg.get("precision", "auto"))
    return out


def sample_settings(cfg: dict, dataset: str) -> dict:
    return deep_merge(cfg["sample"], cfg["datasets"][dataset].get("sample"))


def model_settings(cfg: dict, depth: int) -> dict:
    m = cfg["model"]
    return {
        "depth": depth,
        "embed_dim": m.get("width_per_depth", 64) * depth,
        "num_heads": m.get("heads") or depth,
        "mlp_ratio": m.get("mlp_ratio", 4.0),
        "drop_path_rate": m.get("drop_path_rate"),
        "cond_drop_rate": m.get("cond_drop_rate", 0.1),
        "attn_l2_norm": m.get("attn_l2_norm", True),
    }


def run_spec(cfg: dict, run: Run) -> dict:
    """The complete, JSON-able specification of one training job (varup.train.RunSpec fields). Snakemake records
    it as a rule parameter, so editing anything in it re-runs exactly this job and what depends on it."""
    optim = {k: v for k, v in train_settings(cfg, run.dataset).items() if k not in LAUNCH_KEYS}
    return {"model": model_settings(cfg, run.depth), "loss": dict(all_methods(cfg)[run.method]), "optim": optim,
            "seed": run.seed, "extra": {}}


def tokenizer_of(cfg: dict, dataset: str) -> tuple[str, dict]:
    name = cfg["datasets"][dataset]["tokenizer"]
    return name, cfg["tokenizers"][name]


def patch_nums_of(cfg: dict, dataset: str) -> list[int]:
    _, tok = tokenizer_of(cfg, dataset)
    if tok["kind"] == "official":
        return list(tok.get("vqvae", {}).get("patch_nums", [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]))
    return list(tok["vqvae"]["patch_nums"])


def get_key(cfg: dict, key: str):
    """The value at dotted ``key`` (``datasets.afhq.root``), or None when a part of it is not set."""
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


#: sub-folders that a folder given by a config key must hold: ImageNet-100 is built from an ImageNet-1k root
REQUIRED_SUBDIRS = {"imagenet100": ("train", "val")}


def dir_problem(cfg: dict, key: str) -> str | None:
    """Why the folder at dotted ``key`` cannot be read (None: it can, or the key is not set)."""
    val = get_key(cfg, key)
    if val is None:
        return None
    p = Path(val).expanduser()
    hint = " (the config's placeholder: fill in the path marked REQUIRED)" if str(val).startswith("/path/to/") else ""
    if not p.is_dir():
        return f"{key}: {val} is not an existing folder{hint}"
    parts = key.split(".")
    kind = get_key(cfg, ".".join(parts[:-1] + ["kind"])) if parts[-1] == "root" else None
    missing = [s for s in REQUIRED_SUBDIRS.get(kind, ()) if not (p / s).is_dir()]
    return f"{key}: {val} has no {' or '.join(f'{s}/' for s in missing)} (kind {kind})" if missing else None


def check_dirs(cfg: dict, keys) -> None:
    """Raise ConfigError naming every key of ``keys`` whose folder cannot be read (see :func:`dir_problem`)."""
    problems = [m for k in keys if (m := dir_problem(cfg, k))]
    if problems:
        raise ConfigError("a configured folder that this job reads is missing:\n" + "\n".join("  " + m for m in problems))


def job_device(cfg: dict, gpu_rule: bool) -> str:
    """The ``--device`` of a rule's job: the configured device, where ``auto`` becomes ``auto:any`` with
    ``allow_cpu_fallback`` and ``auto:gpu`` for a GPU rule (which then refuses the CPU in a Slurm job;
    :func:`varup.runtime.resolve_device`)."""
    dev = cfg.get("device", "auto")
    if dev != "auto":
        return dev
    return "auto:any" if cfg.get("allow_cpu_fallback") else ("auto:gpu" if gpu_rule else "auto")


def cluster_resources(cfg: dict, gpu: bool) -> dict:
    """Slurm partition/account resources from ``cluster`` (only the ones set)."""
    c = cfg.get("cluster", {})
    part = (c.get("gpu_partition") or c.get("partition")) if gpu else c.get("partition")
    return {k: v for k, v in (("slurm_partition", part), ("slurm_account", c.get("account"))) if v}


#: train keys that say how a run is launched (processes, nodes, time-limit margin), not what it computes: they
#: are not part of the run specification, so changing them re-trains nothing
LAUNCH_KEYS = ("gpus", "nodes", "stop_before_limit_s")


def train_launch(cfg: dict) -> tuple[str, dict]:
    """The command prefix that starts ``varup train`` and the Slurm resources of the training rule.

    1 GPU: ``varup``. G > 1 on one node: ``torchrun --standalone --nproc_per_node=G -m varup`` with ``gpu=G,
    nodes=1``. K > 1 nodes: ``srun`` starts ``python -m varup.launch`` once per node (``nodes=K, tasks=K, mpi=srun``,
    ``--gpus-per-task=G``), which reads the node list from the task's own environment and starts torchrun
    (:mod:`varup.launch`); ``{cpus}`` in the command is the rule's ``cpus_per_task`` resource. CPUs and memory
    scale with the GPUs of a node (``cluster.train_cpus_per_gpu``, ``cluster.train_mem_mb_per_gpu``). No ``--signal`` is requested: the trainer stops itself
    ``train.stop_before_limit_s`` before the time limit (:class:`varup.runtime.SlurmClock`)."""
    t, c = cfg["train"], cfg.get("cluster", {})
    g, k = int(t.get("gpus", 1)), int(t.get("nodes", 1))
    res = cluster_resources(cfg, gpu=True)
    res.update(cpus_per_task=g * int(c.get("train_cpus_per_gpu", 8)), mem_mb=g * int(c.get("train_mem_mb_per_gpu", 60000)),
               runtime=int(c.get("train_runtime_min", 2880)))
    if k > 1:  # the job step lost the allocation's SLURM_* settings: srun is told the task's CPUs and GPUs again
        res.update(nodes=k, tasks=k, mpi="srun", slurm_extra=f"--gpus-per-task={g}")
        return (f"srun -n {k} --cpus-per-task={{cpus}} --gpus-per-task={g} python -m varup.launch "
                f"--nproc-per-node={g} --"), res
    res.update(gpu=g, nodes=1)
    return ("varup" if g == 1 else f"torchrun --standalone --nproc_per_node={g} -m varup"), res


def report_config(cfg: dict) -> dict:
    """The part of the config that shapes the tables and figures (which runs exist and how they are grouped); the
    rest (threads, paths, sizes) changes no table, so editing it re-runs none."""
    return {"datasets": {n: {"kind": d["kind"]} for n, d in cfg["datasets"].items()},
            "model": {"depths": cfg["model"]["depths"]}, "methods": cfg["methods"], "seeds": cfg["seeds"],
            "experiments": cfg.get("experiments", {}),
            "metrics": {"toy_features": {"enabled": toy_metrics_enabled(cfg)}},
            "uncertainty": ({"enabled": True, "run_seeds": cfg["uncertainty"].get("run_seeds")}
                            if uncertainty_enabled(cfg) else {})}


def report_requested(argv) -> bool:
    """Whether a Snakemake command line asks for the report of results already computed (``--report [file]``;
    ``--report-after-run`` computes them first)."""
    args = [str(a) for a in argv]
    return any(a == "--report" or a.startswith("--report=") for a in args) and "--report-after-run" not in args


def unfinished_report(files: list[str], exists=os.path.exists) -> str | None:
    """Why ``snakemake --report`` cannot build the report of ``files`` (the tables and figures) yet; None: it can."""
    missing = [f for f in files if not exists(f)]
    if not missing:
        return None
    what = ("nothing has been run yet" if len(missing) == len(files) else
            f"the workflow has not finished: {len(missing)} of the report's {len(files)} tables and figures are "
            f"missing (the first: {missing[0]})")
    return (f"snakemake --report: {what}. The report shows the results of a finished run: run `snakemake --cores 2` "
            f"(or scripts/toy.sh) first, with the same --configfile, then ask for the report again.")


def uncertainty_enabled(cfg: dict) -> bool:
    u = cfg.get("uncertainty")
    return bool(u) and u.get("enabled", True)


def uncertainty_runs(cfg: dict) -> list[Run]:
    """Runs that get the MC-dropout, DropPath-sweep and entanglement studies."""
    if not uncertainty_enabled(cfg):
        return []
    seeds = cfg["uncertainty"].get("run_seeds") or [cfg["seeds"][0]]
    return [r for r in main_runs(cfg) if r.seed in seeds]


def mode_runs(cfg: dict) -> list[Run]:
    """Runs whose samples are scored by the mode classifier (datasets that know their modes: the toy)."""
    if not uncertainty_enabled(cfg):
        return []
    return [r for r in main_runs(cfg) if cfg["datasets"][r.dataset]["kind"] == "toy"]


def toy_metrics_enabled(cfg: dict) -> bool:
    return bool(cfg.get("metrics", {}).get("toy_features", {}).get("enabled", True))


def toy_runs(cfg: dict) -> list[Run]:
    """Runs scored in the toy mode classifier's feature space (``metrics.toy_features``): those of toy datasets."""
    if not toy_metrics_enabled(cfg):
        return []
    return [r for r in main_runs(cfg) if cfg["datasets"][r.dataset]["kind"] == "toy"]
