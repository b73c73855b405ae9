"""The scaling study's table and figure (target ``scaling_study``), from ``scaling/scaling.json``
(:mod:`varup.studies.scaling`); it reads that file only.

* ``tables/scaling.{csv,md,tex,html}``: per method the exponent α with its interval, a, the OLS standard error of α,
  R², the number of sizes and seeds, and the held-out loss at every size (mean ± std over the seeds); then one row
  per compared method with α_method − α_baseline and its interval.
* ``figures/scaling.{png,pdf}``: held-out loss against non-embedding parameters on log-log axes, every run as a
  small dot, each size's geometric mean over the seeds as a marker, and each method's fitted line.

``python -m varup.report.scaling --study scaling.json --tables DIR --figures DIR`` (the rule ``scaling_report``).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from varup.base.utils import read_json
from varup.report.tablefmt import MISSING, fmt, mean_std
from varup.report.tables import study_report_main, write_table

log = logging.getLogger("varup.report.scaling")


def _num(v: float) -> str:
    """A parameter count, short: 83k, 0.63M, 304M."""
    if v >= 1e8:
        return f"{v / 1e6:.0f}M"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    return f"{v / 1e3:.0f}k"


def _ci(est: float, lo: float, hi: float, digits: int = 4, sign: str = "") -> str:
    if est is None or not math.isfinite(est):
        return MISSING
    if lo is None or not math.isfinite(lo):
        return f"{est:{sign}.{digits}f} (no interval)"
    return f"{est:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def size_columns(st: dict) -> list[tuple[str, int, float]]:
    """(size key, depth, N) of every size, smallest first."""
    return [(s, int(s), n) for s, n in zip(st["sizes"], st["n_params"])]


def scaling_frames(st: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The CSV rows (full precision) and the display rows of the scaling table."""
    sizes = size_columns(st)
    runs = st["runs"]
    rows, disp = [], []
    for m, f in st["methods"].items():
        n_seeds = sorted({len(v) for v in st["seeds"].values()})
        row = {"kind": "fit", "method": m, "alpha": f["alpha"], "alpha_ci_low": f["ci_low"],
               "alpha_ci_high": f["ci_high"], "a": f["a"], "alpha_ols_se": f["se_alpha"], "r2": f["r2"],
               "n_sizes": f["n_points"], "seeds_per_size": "/".join(map(str, n_seeds))}
        if "c" in f:  # form offset: the irreducible loss
            row["c"] = f["c"]
        d = {"": m, "α [CI]": _ci(f["alpha"], f["ci_low"], f["ci_high"]), "a": f"{f['a']:.3f}",
             **({"c": f"{f['c']:.4f}"} if "c" in f else {}),
             "OLS SE(α)": MISSING if not math.isfinite(f["se_alpha"]) else f"{f['se_alpha']:.4f}",
             "R²": MISSING if not math.isfinite(f["r2"]) else f"{f['r2']:.3f}", "sizes": str(f["n_points"]),
             "seeds/size": row["seeds_per_size"]}
        for s, depth, n in sizes:
            stat = mean_std(r["loss"] for r in runs if r["method"] == m and r["depth"] == depth)
            row.update({f"loss_d{depth}_mean": stat.mean, f"loss_d{depth}_std": stat.std, f"n_params_d{depth}": n})
            d[f"L d{depth} (N {_num(n)})"] = fmt(stat.mean, stat.std, 4)
        rows.append(row)
        disp.append(d)
    for m, dd in st["differences"].items():
        rows.append({"kind": "difference", "method": f"{m} - {st['baseline']}", "alpha": dd["diff"],
                     "alpha_ci_low": dd["ci_low"], "alpha_ci_high": dd["ci_high"],
                     "excludes_zero": dd["excludes_zero"]})
        mark = " ▲" if dd["excludes_zero"] and dd["diff"] > 0 else (" ▼" if dd["excludes_zero"] else "")
        disp.append({"": f"α {m} − α {st['baseline']}", "α [CI]": _ci(dd["diff"], dd["ci_low"], dd["ci_high"],
                                                                       sign="+") + mark})
    return pd.DataFrame(rows), pd.DataFrame(disp).fillna("")


FORM_TEXT = {"power": "L = a·N^−α by least squares of log L on log N",
             "offset": "L = c + a·N^−α (c: an irreducible loss) by least squares of log L"}


def caption(st: dict) -> str:
    conf = int(round(st["confidence"] * 100))
    ds = f" on {st['dataset']}" if st.get("dataset") else ""
    return (f"Scaling study{ds}: held-out loss L ({st.get('loss_measure', '')}) against N = "
            f"{st.get('size_measure', 'parameters')}; " + FORM_TEXT[st.get("form", "power")] + " fitted per method, "
            f"one point per size (the mean of log L over its seeds). α [{conf} % interval]: {st['note']}. "
            "L columns: mean ± std over the training seeds (sample std). Difference rows: ▲ the method's exponent is "
            "larger (its loss falls faster with N), ▼ smaller, where the interval excludes 0.")


def scaling_table(st: dict, out: str | Path) -> pd.DataFrame:
    df, disp = scaling_frames(st)
    write_table(df, out, "scaling", caption(st), disp)
    return df


def scaling_figure(st: dict, out: str | Path) -> None:
    """Log-log held-out loss against non-embedding parameters: runs, per-size geometric means, fitted lines."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from varup.base.plotting import save_figure

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    n = np.array(st["n_params"])
    grid = np.geomspace(n.min() / 1.3, n.max() * 1.3, 50)
    by_depth = dict(zip((int(s) for s in st["sizes"]), n))
    for i, (m, f) in enumerate(st["methods"].items()):
        colour = f"C{i}"
        pts = [(by_depth[r["depth"]], r["loss"]) for r in st["runs"] if r["method"] == m]
        ax.scatter(*zip(*pts), s=10, alpha=0.45, color=colour, linewidths=0)
        ax.scatter(n, f["loss_geomeans"], s=36, color=colour, marker="o", edgecolors="black", linewidths=0.5, zorder=3)
        band = "" if not math.isfinite(f["ci_low"]) else f" [{f['ci_low']:.3f}, {f['ci_high']:.3f}]"
        ax.plot(grid, f.get("c", 0.0) + f["a"] * grid ** (-f["alpha"]), color=colour, lw=1.3,
                label=f"{m}: α = {f['alpha']:.3f}{band}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")  # losses span less than a decade: plain numbers, not 2×10^0
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel(f"held-out NLL per token (nats, {st['runs'][0]['split'] if st['runs'] else ''})")
    diffs = "; ".join(f"Δα {m} − {st['baseline']} = {_ci(d['diff'], d['ci_low'], d['ci_high'], 3, '+')}"
                      for m, d in st["differences"].items())
    ax.set_title(diffs, fontsize=8)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(True, which="both", alpha=0.25)
    save_figure(fig, out, "scaling")


def make_scaling_report(study: str | Path, tables: str | Path, figures: str | Path) -> pd.DataFrame:
    st = read_json(study)
    df = scaling_table(st, tables)
    scaling_figure(st, figures)
    log.info("scaling table: %d rows; %s", len(df), json.dumps({m: d["diff"] for m, d in st["differences"].items()}))
    return df


def main(argv: list[str] | None = None) -> int:
    """``python -m varup.report.scaling``: the rule ``scaling_report``."""
    return study_report_main(argv, "python -m varup.report.scaling",
                             "the scaling table and figure", "scaling.json", make_scaling_report)


__all__ = ["scaling_frames", "caption", "scaling_table", "scaling_figure", "make_scaling_report", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
