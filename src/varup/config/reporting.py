"""What the tables and figures depend on, and whether ``snakemake --report`` can be built yet."""
from __future__ import annotations

import os

from varup.config.plan import toy_metrics_enabled, uncertainty_enabled


def report_config(cfg: dict) -> dict:
    """The part of the config that shapes the tables and figures (which runs exist and how they are grouped); the
    rest (threads, paths, sizes) changes no table, so editing it re-runs none."""
    return {"datasets": {n: {"kind": d["kind"]} for n, d in cfg["datasets"].items() if d.get("main", True)},
            "model": {"depths": cfg["model"]["depths"]}, "methods": cfg["methods"], "seeds": cfg["seeds"],
            "experiments": cfg["experiments"],
            "metrics": {"toy_features": {"enabled": toy_metrics_enabled(cfg)}},
            "uncertainty": ({"enabled": True, "run_seeds": cfg["uncertainty"].get("run_seeds")}
                            if uncertainty_enabled(cfg) else {"enabled": False})}


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
