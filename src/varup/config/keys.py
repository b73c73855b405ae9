"""Small helpers over nested config dicts: dotted-key lookup and deep merge."""
from __future__ import annotations

import copy


def deep_merge(base: dict, over: dict | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def get_key(cfg: dict, key: str):
    """The value at dotted ``key`` (``datasets.afhq.root``), or None when a part of it is not set."""
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg
