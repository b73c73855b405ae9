"""The claim study (issue 25): does the objective give more diverse samples without losing quality, where the
baseline has something to lose? The summary over every run's grid (:mod:`varup.studies.claimgrid` scores the runs).

* The regime: a toy dataset whose modes are long-tailed within each class (``datasets.<name>.generator.mode_zipf``;
  the rarest at about 2 % of a class) and small, trained far past convergence, sampled with truncation (top-p, low
  temperatures) and, where configured, classifier-free guidance.
* Collapse over training: per arm, curve setting (the default first) and kept step, the readings' mean and spread
  over seeds (:func:`collapse_curve`).
* Frontiers: :func:`summarise` compares every arm with the baseline by their quality-diversity frontiers, paired by
  seed (:func:`varup.base.frontier.compare_frontiers`), corrects the p-values over arms x diversity readings, and
  states the minimum detectable effect planned before the run (``planning_sd``) beside the one the run's own spread
  gives (:func:`power_statement`).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger("varup.studies.claimstudy")


def curves(grids: Mapping[int, Mapping[str, Any]], quality: str, diversity: str) -> dict[int, dict]:
    """Per seed: the grid's (quality, diversity) curve over the settings where both readings are numbers (a reading
    a setting could not give, e.g. rare-mode recall where the data has no rare mode, is left out) and the index of
    its default setting among them (None when that setting is left out)."""
    out = {}
    for seed, g in grids.items():
        d = g["default"]
        pts = [p for p in g["grid"] if math.isfinite(p[quality]) and math.isfinite(p[diversity])]
        idx = next((i for i, p in enumerate(pts) if all(p.get(k) == v for k, v in d.items())), None)
        out[seed] = {"quality": [p[quality] for p in pts], "diversity": [p[diversity] for p in pts], "default": idx}
    return out


def no_curve(why: str, confidence: float) -> dict[str, Any]:
    """The comparison of a reading some seed has no finite point of: undetermined, saying why."""
    from varup.base.frontier import UNDETERMINED

    return {"seeds": [], "n": 0, "confidence": confidence, "quality_range": [math.nan, math.nan],
            "seeds_without_overlap": [], "defaults": {}, "verdict": UNDETERMINED, "why": why, "regions_better": [],
            "regions_worse": []}


def comparisons(grids: Mapping[str, Mapping[int, Any]], *, baseline: str, quality: str,
                diversity: Sequence[str], confidence: float, correction: str) -> list[dict]:
    """Every arm against the baseline on every diversity reading, with the family's adjusted p-values."""
    from varup.base.frontier import compare_frontiers, describe
    from varup.base.power import adjust

    rows = []
    for arm in (a for a in grids if a != baseline):
        for div in diversity:
            a, b = curves(grids[arm], quality, div), curves(grids[baseline], quality, div)
            if all(c["quality"] for c in (*a.values(), *b.values())):
                res = compare_frontiers(a, b, confidence=confidence)
            else:
                res = no_curve(f"{div} or {quality} is not a number at any setting of some run", confidence)
            rows.append({"arm": arm, "diversity": div, "frontier": res, "text": describe(res, quality, div),
                         "p": (res.get("mean_gain") or {}).get("p")})
    for r, p in zip(rows, adjust([r["p"] for r in rows], correction)):
        r["p_adjusted"] = p
    return rows


def collapse_curve(grids: Mapping[str, Mapping[int, Any]], keys: Sequence[str] = ("rare_recall", "covered",
                   "kl_true_gen", "memorised", "precision", "recall")) -> dict[str, list[dict]]:
    """Per arm, curve setting (the default first) and kept step: the mean and spread over seeds of the readings.
    A grid without setting labels (written before ``curve_settings``) holds the default setting's curve only."""
    out = {}
    for arm, by_seed in grids.items():
        pts = [{"setting": "default", "default": True, **c} for g in by_seed.values() for c in g["curve"]]
        labels = list(dict.fromkeys(p["setting"] for p in sorted(pts, key=lambda p: not p["default"])))
        rows = []
        for label in labels:
            for step in sorted({p["step"] for p in pts if p["setting"] == label}):
                sel = [p for p in pts if p["setting"] == label and p["step"] == step]
                rows.append({"setting": label, "default": sel[0]["default"], "step": step, "n": len(sel),
                             **{k: float(np.mean([p[k] for p in sel])) for k in keys},
                             **{f"{k}_sd": float(np.std([p[k] for p in sel], ddof=1)) if len(sel) > 1 else None
                                for k in keys}})
        out[arm] = rows
    return out


def power_statement(n_planned: int, n_used: int, planning_sd: float, observed_sd: float | None,
                    confidence: float) -> dict:
    """The minimum detectable mean frontier gain (power 0.8, two-sided paired t at 1 − confidence): planned from the
    configured seeds and ``planning_sd`` (stated before the run), and observed from the seeds the comparison could
    use and their spread (None where fewer than two)."""
    from varup.base.power import mde

    alpha = 1 - confidence
    return {"n": n_planned, "n_used": n_used, "alpha": alpha, "target_power": 0.8, "planning_sd": planning_sd,
            "mde_planned": mde(n_planned, planning_sd, alpha) if n_planned >= 2 else None,
            "observed_sd": observed_sd,
            "mde_observed": mde(n_used, observed_sd, alpha) if observed_sd and n_used >= 2 else None}


def summarise(grids: Mapping[str, Mapping[int, Any]], *, baseline: str, primary: str, quality: str,
              diversity: Sequence[str], confidence: float, correction: str, planning_sd: float,
              setting: str) -> dict[str, Any]:
    """The study's result (``claim_study.json``): the ledger's frontier (primary arm, first diversity reading),
    every comparison, the power statement, the collapse curves and every arm's mean grid."""
    rows = comparisons(grids, baseline=baseline, quality=quality, diversity=diversity, confidence=confidence,
                       correction=correction)
    main = next(r for r in rows if r["arm"] == primary and r["diversity"] == diversity[0])
    sd = (main["frontier"].get("mean_gain") or {}).get("sd")
    n_planned, n_used = len(grids[primary]), len(main["frontier"]["seeds"])
    default = next(iter(next(iter(grids.values())).values()))["default"]
    return {"kind": "claim_study", "setting": setting, "quality": quality, "diversity": diversity[0],
            "frontier": main["frontier"], "frontier_text": main["text"], "frontier_baseline": baseline,
            "primary": primary, "default_setting": default, "comparisons": rows, "correction": correction,
            "power": power_statement(n_planned, n_used, planning_sd, sd if sd == sd else None, confidence),
            "curve": collapse_curve(grids), "mean_grid": mean_grids(grids)}


def mean_grids(grids: Mapping[str, Mapping[int, Any]]) -> dict[str, list[dict]]:
    """Per arm: every grid setting's readings averaged over the seeds (the frontier figure's points)."""
    out = {}
    for arm, by_seed in grids.items():
        gs = [g["grid"] for g in by_seed.values()]
        keys = [k for k, v in gs[0][0].items() if isinstance(v, (int, float))]
        out[arm] = [{k: float(np.mean([g[i][k] for g in gs])) for k in keys} for i in range(len(gs[0]))]
    return out


def run_claim_study(entries: Sequence[Mapping[str, Any]], out_json, **kw) -> dict:
    """Read every run's grid (``entries``: {arm, seed, grid}) and write :func:`summarise`'s result."""
    from varup.base.utils import atomic_write_json, read_json

    grids: dict[str, dict[int, Any]] = {}
    for e in entries:
        grids.setdefault(e["arm"], {})[int(e["seed"])] = read_json(e["grid"])
    res = summarise(grids, **kw)
    atomic_write_json(out_json, res)
    log.info("claim study: %s", res["frontier_text"])
    return res


__all__ = ["curves", "no_curve", "comparisons", "collapse_curve", "power_statement", "summarise",
           "mean_grids", "run_claim_study"]
