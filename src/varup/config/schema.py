"""Config loading and validation: the JSON schema (the one home of every default), text values coerced to the
schema's types, defaults filled in, then the cross-checks of :mod:`varup.config.checks`.

The whole :mod:`varup.config` package is imported by the Snakefile, so it imports no torch (an import-linter contract
holds this): ``snakemake -n`` stays fast.
"""
from __future__ import annotations

import copy
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from varup.config.checks import check_cross_references
from varup.config.errors import ConfigError
from varup.config.keys import deep_merge

# The JSON schema ships inside the package (pyproject package-data), so an installed varup validates too.
DEFAULT_SCHEMA = resources.files("varup.config").joinpath("schema.yaml")

def _format_path(path) -> str:
    return "/".join(str(p) for p in path) or "<top level>"


def validate(cfg: dict, schema_path: str | os.PathLike = DEFAULT_SCHEMA) -> dict:
    """Validate against the JSON schema, filling schema defaults; raise ConfigError naming every bad key. Everything
    downstream (the checks, the run plans, the workflow) reads the config this returns, with every default present."""
    import jsonschema

    schema = read_schema(schema_path)
    coerce_text_values(cfg, schema)
    cls = jsonschema.validators.validator_for(schema)
    errors = sorted(cls(schema).iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_format_path(e.absolute_path)}: {e.message}{_text_hint(e)}" for e in errors]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    _fill_defaults(cfg, schema, schema)
    check_cross_references(cfg)
    return cfg


def check_settings(value: Any, section: str, key: str, plan_keys: dict[str, str] | None = None,
                   schema_path: str | os.PathLike = DEFAULT_SCHEMA) -> Any:
    """Check one settings object that reaches a command without a config (a ``varup lm-sft --train '<json>'``
    argument) by the rules its config section obeys, so a hand-written command is refused as a config would be.

    ``section``: a ``$defs`` name of the schema (``lm_train``) or the slash path of a config section
    (``lm/references``); ``key``: the config key named in messages (``lm/train``); ``plan_keys``: keys the plan adds
    to the section's settings, each with the ``$defs`` name of its rule (lm-sft's ``{"seed": "seed", "loss":
    "loss"}``). Nothing is converted or filled in (the job's dataclass supplies what is not set). Returns
    ``value``; raises ConfigError naming each bad key as ``key/<sub-key>``."""
    import jsonschema

    root = read_schema(schema_path)
    node = _section_node(root, section)
    if plan_keys:
        node = deep_merge(node, {"properties": {k: {"$ref": f"#/$defs/{d}"} for k, d in plan_keys.items()}})
    schema = {"$schema": root["$schema"], "$defs": root["$defs"], **{k: v for k, v in node.items() if k != "default"}}
    cls = jsonschema.validators.validator_for(schema)
    errors = sorted(cls(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_format_path([key, *e.absolute_path])}: {e.message}" for e in errors]
        raise ConfigError(f"invalid {key} settings (the schema's rules for {key}, src/varup/config/schema.yaml):\n"
                          + "\n".join(lines))
    return value


def _section_node(root: dict, section: str) -> dict:
    """The schema node of a ``$defs`` name or a config section's slash path, its ``$ref`` resolved."""
    if section in root["$defs"]:
        return _resolve(root["$defs"][section], root)
    node = root
    for part in section.split("/"):
        node = _resolve(node, root)["properties"][part]
    return _resolve(node, root)


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
    if not types or types == ["string"]:
        return text
    if "string" in types and ("pattern" not in node or re.search(node["pattern"], text)):
        return text  # text the schema accepts as text (e.g. mauve_num_buckets 'auto'); else try its other types
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
    """The node a ``$ref`` points at, with the keys written beside the ``$ref`` merged in (deeply, so a section can add
    defaults to some of the referenced properties: the top-level ``train`` and ``sample``)."""
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/")
        target = root
        for part in ref[2:].split("/"):
            target = target[part]
        node = deep_merge(target, {k: v for k, v in node.items() if k != "$ref"})
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


