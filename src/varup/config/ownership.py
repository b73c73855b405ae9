"""Which configuration owns ``results/<experiment>/``: a second configuration with the same ``experiment:`` name
would write into the same result paths and overwrite the first one's results, so it is refused when the DAG is
built, naming the key to change.

A run records its owner in ``results/<experiment>/.varup-owner.json`` when it starts jobs (not on a dry run): the
config file(s) it was given and the configuration's identity (everything but where and how the jobs run: threads,
device, cluster, paths). A later run may use the directory when it has the same config file(s) (an edit of that
configuration: Snakemake re-runs what changed) or the same identity (e.g. the file was renamed or copied).
Otherwise it is another experiment and must get its own name.

Imported by the Snakefile: standard library only.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from varup.config.errors import ConfigError

OWNER_FILE = ".varup-owner.json"

#: keys that say where and how the jobs run, not what they compute: a config differing only in these is the same
#: experiment
PLACEMENT_KEYS = ("threads", "serial_threads", "device", "allow_cpu_fallback", "cluster", "results_dir",
                  "resources_dir")


def identity(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in PLACEMENT_KEYS}


def fingerprint(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_labels(configfiles, workdir: str | os.PathLike) -> list[str]:
    """The config files as recorded: relative to the working directory when inside it (so a moved checkout keeps
    its results), else absolute."""
    out = []
    for f in configfiles:
        p, w = os.path.realpath(f), os.path.realpath(workdir)
        out.append(os.path.relpath(p, w) if p.startswith(w + os.sep) else p)
    return out


def owner_record(cfg: dict, configfiles, workdir: str | os.PathLike) -> dict:
    ident = identity(cfg)
    return {"experiment": cfg["experiment"], "configfiles": config_labels(configfiles, workdir),
            "fingerprint": fingerprint(ident), "identity": ident}


def read_owner(results: str | os.PathLike) -> dict | None:
    f = Path(results) / OWNER_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def differing_keys(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix or "<top level>"]
    out = []
    for k in sorted(set(a) | set(b), key=str):
        out += differing_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
    return out


def ownership_problem(results: str | os.PathLike, owner: dict | None, record: dict) -> str | None:
    """Why this run (``record``) may not write into ``results`` (owned by ``owner``); None when it may."""
    if owner is None or owner["configfiles"] == record["configfiles"] or owner["fingerprint"] == record["fingerprint"]:
        return None
    mine, theirs = " + ".join(record["configfiles"]) or "the config", " + ".join(owner["configfiles"])
    keys = differing_keys(owner.get("identity"), record["identity"])
    shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    return (f"{results}/ holds the results of another configuration, {theirs} (experiment '{owner['experiment']}'); "
            f"this run's configuration ({mine}) differs from it in {shown} and would overwrite them. Set "
            f"`experiment:` in {mine} to a new name: its results then go to their own directory. If {mine} is "
            f"{theirs} renamed or moved, delete {Path(results) / OWNER_FILE} to make it the owner.")


def check_owner(results: str | os.PathLike, record: dict) -> None:
    """Raise ConfigError when another configuration owns ``results``."""
    problem = ownership_problem(results, read_owner(results), record)
    if problem:
        raise ConfigError(problem)


def claim(results: str | os.PathLike, record: dict) -> None:
    """Record this configuration as the owner of ``results`` (atomically; before any job writes there)."""
    d = Path(results)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{OWNER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, d / OWNER_FILE)
