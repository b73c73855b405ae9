"""The λ study (issue 11): does any reading or weight of the uncertainty-preserving objective beat the
cross-entropy baseline beyond seed noise on the toy?

Every point (a loss setting) is trained with the same training seeds as the baseline; a seed fixes the
initialisation and the data order, so the difference point − baseline at one seed is a paired observation. For
each point and metric this module gives the mean with a t-interval over the seeds and the paired difference to
the baseline with its t-interval, and one verdict line naming every (point, metric) whose interval excludes 0 in
the favourable direction. It computes and writes ``lambda_study.json``; :mod:`varup.report.tables` only renders it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

# (key, title, better: +1 higher / -1 lower / 0 a reading, not a score, digits)
METRICS = (
    ("class_error", "class error", -1, 3),
    ("modes_covered", "modes covered", +1, 1),
    ("kl_gen_true", "KL(gen‖true)", -1, 3),
    ("toy_fd", "toy-FD", -1, 1),
    ("toy_precision", "toy-precision", +1, 3),
    ("toy_recall", "toy-recall", +1, 3),
    ("codebook_perplexity", "codebook perplexity", +1, 1),
    ("pred_dispersion", "pred. dispersion s", 0, 4),
    ("pred_entropy", "pred. entropy (nats)", 0, 3),
    ("gshare_2nd", "‖∇λ1·L_2nd‖/‖∇CE‖", 0, 5),
    ("gshare_se", "‖∇λ2·L_SE‖/‖∇CE‖", 0, 4),
)


def t_interval(x: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a two-sided Student-t interval for the mean of ``x`` (n ≥ 2; n = 1 gives no width)."""
    from scipy import stats

    a = np.asarray([v for v in x if v is not None], np.float64)
    if len(a) == 0:
        return (math.nan, math.nan, math.nan)
    m = float(a.mean())
    if len(a) < 2:
        return (m, math.nan, math.nan)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return (m, m - half, m + half)


def run_readings(mode_cov: Mapping, toy: Mapping, tokens: np.ndarray, patch_nums: Sequence[int], vocab_size: int,
                 final: Mapping | None) -> dict[str, float | None]:
    """One run's numbers: mode coverage, class error and KL (mode classifier), toy-feature metrics, the codebook
    perplexity of its sampled tokens, and the last log step's dispersion, entropy and gradient shares."""
    from varup.metrics.codebook import codebook_stats

    cov = mode_cov["coverage"]
    final = final or {}
    return {"class_error": cov["class_error"], "modes_covered": cov["overall"]["covered"],
            "kl_gen_true": cov["overall"]["kl_gen_true"], "toy_fd": toy["toy"]["fd"],
            "toy_precision": toy["toy"]["precision"], "toy_recall": toy["toy"]["recall"],
            "codebook_perplexity": codebook_stats(tokens, patch_nums, vocab_size)["overall"]["perplexity"],
            **{k: final.get(k) for k in ("pred_dispersion", "pred_entropy", "gshare_2nd", "gshare_se")}}


def summarise(per_run: Mapping[str, Mapping[int, Mapping[str, Any]]], baseline: str, confidence: float = 0.95) -> dict:
    """``per_run[point][seed]`` -> per point and metric: values, mean and t-interval, and the paired difference to
    ``baseline`` over the seeds both have (with its t-interval and whether it is a significant improvement)."""
    if baseline not in per_run:
        raise ValueError(f"baseline point {baseline!r} is not among the study's points {sorted(per_run)}")
    base = per_run[baseline]
    points = []
    for name, runs in per_run.items():
        seeds = sorted(runs)
        entry: dict[str, Any] = {"point": name, "seeds": seeds, "metrics": {}}
        for key, _, better, _ in METRICS:
            vals = [runs[s].get(key) for s in seeds]
            m, lo, hi = t_interval(vals, confidence)
            row = {"values": vals, "mean": m, "ci_low": lo, "ci_high": hi}
            shared = [s for s in seeds if s in base and runs[s].get(key) is not None and base[s].get(key) is not None]
            if name != baseline and shared:
                diffs = [runs[s][key] - base[s][key] for s in shared]
                dm, dlo, dhi = t_interval(diffs, confidence)
                beyond_noise = len(shared) > 1 and (dlo > 0 or dhi < 0)  # the interval excludes 0
                row.update(diff_mean=dm, diff_ci_low=dlo, diff_ci_high=dhi, diff_n=len(shared),
                           better=bool(beyond_noise and better * dm > 0), worse=bool(beyond_noise and better * dm < 0))
            entry["metrics"][key] = row
        points.append(entry)
    return {"baseline": baseline, "confidence": confidence, "points": points,
            "verdict": verdict(points, baseline, confidence)}


def verdict(points: Sequence[Mapping], baseline: str, confidence: float) -> str:
    """One plain line: which settings beat (or trail) the baseline beyond noise, on which metric, by how much."""
    titles = {k: (t, d) for k, t, _, d in METRICS}
    wins, losses = [], []
    for p in points:
        for key, row in p["metrics"].items():
            title, digits = titles[key]
            if row.get("better") or row.get("worse"):
                txt = (f"{p['point']} on {title} by {row['diff_mean']:+.{digits}f} "
                       f"[{row['diff_ci_low']:+.{digits}f}, {row['diff_ci_high']:+.{digits}f}]")
                (wins if row.get("better") else losses).append(txt)
    n = len(points[0]["seeds"]) if points else 0
    head = f"{int(round(confidence * 100))} % paired t-intervals over {n} training seeds against {baseline}: "
    if wins:
        out = head + "beats the baseline beyond noise: " + "; ".join(wins) + "."
    else:
        out = head + "no setting beats the baseline beyond noise on any score."
    if losses:
        out += " Worse than the baseline beyond noise: " + "; ".join(losses) + "."
    return out


def run_lambda_study(entries: Sequence[Mapping[str, Any]], out_json, *, baseline: str, confidence: float = 0.95,
                     losses: Mapping[str, Mapping] | None = None) -> dict:
    """``entries``: one per (point, seed) with ``point``, ``seed``, ``run`` (results path) and the paths
    ``mode_coverage``, ``toy_metrics``, ``samples``, ``summary``, ``tokens_meta``. Writes ``out_json``."""
    from varup.base.utils import atomic_write_json, read_json

    per_run: dict[str, dict[int, dict]] = {}
    for e in entries:
        meta = read_json(e["tokens_meta"])
        with np.load(e["samples"]) as z:
            tokens = z["tokens"]
        summary = read_json(e["summary"])
        per_run.setdefault(e["point"], {})[int(e["seed"])] = run_readings(
            read_json(e["mode_coverage"]), read_json(e["toy_metrics"]), tokens, meta["patch_nums"],
            int(meta["vocab_size"]), summary.get("final"))
    res = summarise(per_run, baseline, confidence)
    res["kind"] = "lambda_study"
    res["runs"] = {f"{e['point']}/seed{e['seed']}": e["run"] for e in entries}
    res["losses"] = dict(losses or {})
    res["metrics"] = [{"key": k, "title": t, "better": b, "digits": d} for k, t, b, d in METRICS]
    atomic_write_json(out_json, res)
    return res


__all__ = ["METRICS", "t_interval", "run_readings", "summarise", "verdict", "run_lambda_study"]
