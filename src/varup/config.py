"""Config loading, schema validation and the mapping from the config to runs and per-job settings.

Imported by the Snakefile, so it must stay light (no torch import): ``snakemake -n`` is fast.
A *run* is one training job: (dataset, depth, method, seed). Its results live under
``results/{experiment}/{dataset}/d{depth}/{method}/seed{seed}/``.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SCHEMA = REPO / "config" / "schema.yaml"

OFFICIAL_VAE_URL = "https://huggingface.co/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth"


class ConfigError(ValueError):
    pass


def _format_path(path) -> str:
    return "/".join(str(p) for p in path) or "<top level>"


def validate(cfg: dict, schema_path: str | os.PathLike = DEFAULT_SCHEMA, set_defaults: bool = True) -> dict:
    """Validate against the JSON schema, filling schema defaults; raise ConfigError naming every bad key."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    cls = jsonschema.validators.validator_for(schema)
    errors = sorted(cls(schema).iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_format_path(e.absolute_path)}: {e.message}" for e in errors]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    if set_defaults:
        _fill_defaults(cfg, schema, schema)
    _check_cross_references(cfg)
    return cfg


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
    for name, tok in cfg["tokenizers"].items():
        if tok["kind"] == "train" and "vqvae" not in tok:
            problems.append(f"tokenizers/{name}/vqvae: required for kind 'train'")
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join("  " + p for p in problems))


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


def runs(cfg: dict) -> Iterator[Run]:
    for ds in cfg["datasets"]:
        for depth in cfg["model"]["depths"]:
            for method in cfg["methods"]:
                for seed in cfg["seeds"]:
                    yield Run(ds, int(depth), method, int(seed))


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
    optim = {k: v for k, v in train_settings(cfg, run.dataset).items() if k != "gpus"}
    return {"model": model_settings(cfg, run.depth), "loss": dict(cfg["methods"][run.method]), "optim": optim,
            "seed": run.seed, "extra": {}}


def tokenizer_of(cfg: dict, dataset: str) -> tuple[str, dict]:
    name = cfg["datasets"][dataset]["tokenizer"]
    return name, cfg["tokenizers"][name]


def patch_nums_of(cfg: dict, dataset: str) -> list[int]:
    _, tok = tokenizer_of(cfg, dataset)
    if tok["kind"] == "official":
        return list(tok.get("vqvae", {}).get("patch_nums", [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]))
    return list(tok["vqvae"]["patch_nums"])
