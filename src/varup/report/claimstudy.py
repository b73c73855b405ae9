"""The claim study's table and figure (target ``claim_study``), from ``claim_study/claim_study.json``
(:mod:`varup.studies.claimstudy`); it reads that file only.

* ``tables/claim_study.{csv,md,tex,html}``: one row per comparison (arm x diversity reading against the baseline):
  the shared quality range, the mean diversity gain at matched quality with its paired t-interval, p and the
  corrected p, and the verdict (moves the frontier, moves along it, ...); a power row (the minimum detectable effect
  planned and observed); then the collapse curve: per arm and kept training step, the default setting's rare-mode
  recall, modes covered, KL(true || generated), memorised share, toy-precision and toy-recall (mean ± std over seeds).
* ``figures/claim_study.{png,pdf}``: (left) each arm's mean grid in the quality-diversity plane, one line per
  (top-p, cfg) through its temperatures, the default setting ringed; (right) modes covered and the memorised share
  against training steps at the default setting.

``python -m varup.report.claimstudy --study claim_study.json --tables DIR --figures DIR`` (rule
``claim_study_report``).
"""
from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import pandas as pd

from varup.base.utils import read_json
from varup.report.tablefmt import MISSING, fmt
from varup.report.tables import study_report_main, write_table

log = logging.getLogger("varup.report.claimstudy")

CURVE_KEYS = (("rare_recall", "rare-mode recall", 3), ("covered", "modes covered", 1),
              ("kl_true_gen", "KL(true‖gen)", 3), ("memorised", "memorised", 3), ("precision", "toy-P", 3),
              ("recall", "toy-R", 3))


def _p(v) -> str:
    return MISSING if v is None else f"{v:.3g}"


def comparison_rows(st: dict) -> tuple[list[dict], list[dict]]:
    rows, disp = [], []
    for c in st["comparisons"]:
        fr, m = c["frontier"], c["frontier"].get("mean_gain") or {}
        lo, hi = fr["quality_range"]
        rows.append({"part": "frontier", "arm": c["arm"], "diversity": c["diversity"], "quality": st["quality"],
                     "quality_low": lo, "quality_high": hi, "gain": m.get("mean"), "gain_ci_low": m.get("ci_low"),
                     "gain_ci_high": m.get("ci_high"), "n": fr["n"], "p": c["p"], "p_adjusted": c["p_adjusted"],
                     "verdict": fr["verdict"]})
        gain = MISSING if not m else f"{m['mean']:+.3f} [{m['ci_low']:+.3f}, {m['ci_high']:+.3f}]"
        shared = f"[{lo:.3g}, {hi:.3g}]" if hi > lo else "each seed's own"
        disp.append({"": f"{c['arm']} vs {st['frontier_baseline']}", "diversity": c["diversity"], "n": str(fr["n"]),
                     f"{st['quality']} range": shared, "gain at matched quality": gain,
                     "p": _p(c["p"]), f"p ({st['correction']})": _p(c["p_adjusted"]), "verdict": fr["verdict"]})
    return rows, disp


def power_rows(st: dict) -> tuple[list[dict], list[dict]]:
    pw = st["power"]
    obs = MISSING if pw["mde_observed"] is None else f"{pw['mde_observed']:.3f} (sd {pw['observed_sd']:.3f})"
    planned = MISSING if pw["mde_planned"] is None else f"{pw['mde_planned']:.3f} (sd {pw['planning_sd']:.3f})"
    text = (f"n = {pw['n']} paired seeds, power {pw['target_power']}, two-sided α = {pw['alpha']:.2f}: "
            f"planned {planned}, observed {obs} (n = {pw.get('n_used', pw['n'])})")
    return [{"part": "power", **pw}], [{"": "minimum detectable gain", "diversity": st["diversity"], "verdict": text}]


def curve_rows(st: dict) -> tuple[list[dict], list[dict]]:
    rows, disp = [], []
    for arm, pts in st["curve"].items():
        for p in pts:
            setting = p.get("setting", "default")
            rows.append({"part": "curve", "arm": arm, "setting": setting, "step": p["step"], "n": p["n"],
                         **{k: p[k] for k, _, _ in CURVE_KEYS}, **{f"{k}_sd": p[f"{k}_sd"] for k, _, _ in CURVE_KEYS}})
            disp.append({"": f"{arm} @ step {p['step']}, {setting}",
                         **{name: fmt(p[k], p[f"{k}_sd"], d) for k, name, d in CURVE_KEYS}})
    return rows, disp


def claim_frames(st: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    parts = [comparison_rows(st), power_rows(st), curve_rows(st)]
    return (pd.DataFrame([r for rows, _ in parts for r in rows]),
            pd.DataFrame([d for _, disp in parts for d in disp]).fillna(""))


def caption(st: dict) -> str:
    conf = int(round(st["frontier"]["confidence"] * 100))
    return (f"Claim study ({st['setting']}): every run sampled over a temperature x top-p x cfg grid; each arm against "
            f"{st['frontier_baseline']} by its {st['quality']}–diversity frontier, paired by training seed (mean "
            f"diversity gain at matched {st['quality']} over the quality range each seed's pair of curves shares; "
            f"range: the one all seeds share, where there is one; {conf} % "
            f"paired t; p corrected over the table's comparisons by {st['correction']}). 'moves along the frontier': "
            "the frontiers coincide but the default operating points differ, as a temperature change would give. "
            "Curve rows: the default setting, and each curve setting, at each kept training step (mean ± std over "
            "seeds).")


def claim_figure(st: dict, out: str | Path) -> None:
    import matplotlib.pyplot as plt

    from varup.base.plotting import save_figure

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.9))
    q, dv = st["quality"], st["diversity"]
    d = st["default_setting"]
    for i, (arm, pts) in enumerate(st["mean_grid"].items()):
        for j, (tp, g) in enumerate(sorted({(p["top_p"], p.get("cfg", 1.0)) for p in pts})):
            line = sorted((p for p in pts if (p["top_p"], p.get("cfg", 1.0)) == (tp, g)),
                          key=lambda p: p["temperature"])
            ax.plot([p[q] for p in line], [p[dv] for p in line], color=f"C{i}", ls=("--", "-", ":", "-.")[j % 4],
                    marker="os^v"[j % 4], ms=3, lw=1.1,
                    label=f"{arm}, top-p {tp:g}" + (f", cfg {g:g}" if g != 1 else ""))
        dp = next(p for p in pts if all(p.get(k, 1.0) == v for k, v in d.items()))
        ax.scatter([dp[q]], [dp[dv]], s=90, facecolors="none", edgecolors=f"C{i}", linewidths=1.5, zorder=3)
    ax.set_xlabel(f"{q} (quality)")
    ax.set_ylabel(f"{dv} (diversity)")
    ax.set_title("each arm's grid, mean over seeds (ringed: the default setting)", fontsize=8)
    ax.legend(fontsize=6, frameon=False)
    curve_panel(bx, st["curve"])
    fig.suptitle(textwrap.fill(st["frontier_text"], 150), fontsize=8)
    fig.tight_layout()
    save_figure(fig, out, "claim_study")


def curve_panel(bx, curve: dict) -> None:
    """Modes covered over training per arm: the default setting solid (its memorised share dotted on the right
    axis), each further curve setting dashed."""
    cx = bx.twinx()
    for i, (arm, pts) in enumerate(curve.items()):
        for j, label in enumerate(dict.fromkeys(p.get("setting", "default") for p in pts)):
            line = [p for p in pts if p.get("setting", "default") == label]
            bx.errorbar([p["step"] for p in line], [p["covered"] for p in line],
                        yerr=[p["covered_sd"] or 0 for p in line], color=f"C{i}", ls=("-", "--", "-.")[min(j, 2)],
                        marker="os^"[min(j, 2)], ms=3, capsize=2, lw=1.1,
                        label=f"{arm}" + ("" if line[0].get("default", True) else f", {label}"))
            if line[0].get("default", True):
                cx.plot([p["step"] for p in line], [p["memorised"] for p in line], color=f"C{i}", ls=":", lw=1.2)
    bx.set_xlabel("training step")
    bx.set_ylabel("modes covered")
    cx.set_ylabel("memorised share, default setting (dotted)")
    bx.legend(fontsize=5.5, frameon=False, loc="upper left", ncol=2)  # the curves rise from the lower left
    bx.set_title("over training: the default setting (solid) and the curve settings (mean ± std over seeds)",
                 fontsize=7)


def make_claim_report(study: str | Path, tables: str | Path, figures: str | Path) -> pd.DataFrame:
    st = read_json(study)
    df, disp = claim_frames(st)
    write_table(df, tables, "claim_study", caption(st), disp)
    claim_figure(st, figures)
    log.info("claim study table: %d rows; %s", len(df), st["frontier_text"])
    return df


def main(argv: list[str] | None = None) -> int:
    """``python -m varup.report.claimstudy``: the rule ``claim_study_report``."""
    return study_report_main(argv, "python -m varup.report.claimstudy",
                             "the claim study's table and figure", "claim_study/claim_study.json", make_claim_report)


__all__ = ["comparison_rows", "power_rows", "curve_rows", "claim_frames", "caption", "claim_figure", "curve_panel",
           "make_claim_report", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
