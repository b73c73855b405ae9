"""The scaling claim (issue 24): "our second-order objective shifts the scaling exponent ... comparable test losses
can be achieved with smaller models". Held-out token loss L against model size N per method, the power law
L(N) = a · N^(−α) fitted to each method, α's confidence interval, and the difference α_method − α_baseline with its
interval.

The fit: ordinary least squares of log L on log N over the sizes, one point per size: the mean over the training
seeds of log L (the geometric mean of the seeds' losses), so every size weighs the same whatever its seed count.
N is what the caller gives (the scaling study passes each VAR's non-embedding parameter count, see
:mod:`varup.studies.heldout`). By default (``form: power``) no irreducible-loss term: L = c + a·N^(−α)
(``form: offset``, :func:`fit_offset_power_law`, least squares of log L) needs at least four sizes to leave a
residual degree of freedom, and the toy's three and the paper's two sizes have fewer.

The intervals:

* **bootstrap over seeds** (when a size has two seeds or more): each of ``n_boot`` resamples draws, per size, as many
  seeds as it has, with replacement, and refits; the same draw serves every method (a training seed fixes the
  initialisation and the data order of every method at that size, so the methods are paired by seed), so the
  difference of two exponents is a paired bootstrap. Percentile interval, each size's seed values spread by
  sqrt(n / (n − 1)) first (:func:`inflate`); it still runs narrow with few seeds (about 83 % coverage of a 95 %
  interval with 2 seeds per size, 92 % with 5). It measures seed noise only: with two
  sizes the line through them is exact, and with more it leaves out how far the sizes lie from a power law (the
  OLS standard error, recorded beside it, measures that);
* **OLS** (every size has one seed, three sizes or more): α ± t(k − 2) · SE of the slope; the difference from the
  regression of log(L_method / L_baseline) on log N (paired by size);
* **none** (one seed per size and two sizes): the exact line has no interval.

Pure: numpy only (scipy for the t quantile); :func:`main` reads the per-run result files and writes ``scaling.json``
(``python -m varup.studies.scaling``, the rule ``scaling_fit``); :mod:`varup.report.scaling` renders it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger("varup.studies.scaling")

#: Losses[method][size][seed]: held-out loss of one run; sizes are keys of the parameter counts
Losses = Mapping[str, Mapping[Any, Mapping[int, float]]]


def fit_power_law(n_params: Sequence[float], loss: Sequence[float]) -> dict:
    """OLS of log L on log N: ``alpha`` (L ∝ N^−α), ``a`` (L at N = 1), ``se_alpha`` (the slope's standard error;
    NaN with fewer than three points), ``r2`` and ``n_points``. Raises ValueError for fewer than two distinct N or a
    loss that is not positive."""
    x = np.log(np.asarray(n_params, np.float64))
    y_raw = np.asarray(loss, np.float64)
    if len(x) != len(y_raw):
        raise ValueError(f"fit_power_law: {len(x)} sizes but {len(y_raw)} losses")
    if not (np.isfinite(y_raw).all() and (y_raw > 0).all()):
        raise ValueError(f"fit_power_law: every loss must be finite and positive, got {y_raw.tolist()}")
    y = np.log(y_raw)
    xc = x - x.mean()
    sxx = float(xc @ xc)
    if len(np.unique(x)) < 2 or sxx == 0:
        raise ValueError(f"fit_power_law: needs at least two distinct sizes, got {np.exp(x).tolist()}")
    slope = float(xc @ (y - y.mean()) / sxx)
    intercept = float(y.mean() - slope * x.mean())
    resid = y - (intercept + slope * x)
    k = len(x)
    se = math.sqrt(float(resid @ resid) / (k - 2) / sxx) if k > 2 else math.nan
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(resid @ resid) / sst if sst > 0 else math.nan
    return {"alpha": -slope, "a": math.exp(intercept), "se_alpha": se, "r2": r2, "n_points": k}


def fit_offset_power_law(n_params: Sequence[float], loss: Sequence[float], start: Mapping | None = None) -> dict:
    """L = c + a·N^−α with an irreducible loss 0 ≤ c < min L, by least squares of log L from three starts of c
    (``experiments.scaling.form: offset``): ``alpha``, ``a``, ``c``, ``se_alpha`` (from the Jacobian, k − 3 degrees of
    freedom), ``r2``, ``n_points``. Needs four sizes or more (three parameters and a residual degree of freedom).
    ``start``: a fit of similar losses (its alpha, a, c) as the only start (the bootstrap's resamples)."""
    from scipy.optimize import least_squares

    if len(n_params) < 4:
        raise ValueError(f"fit_offset_power_law: L = c + a·N^-α needs at least 4 sizes, got {len(n_params)} "
                         "(experiments.scaling.form: power fits 2 or 3)")
    fit_power_law(n_params, loss)  # the same checks of the input
    x, y_raw = np.log(np.asarray(n_params, np.float64)), np.asarray(loss, np.float64)
    y, cmax = np.log(y_raw), float(y_raw.min()) * (1 - 1e-9)

    def resid(p):
        return np.log(p[2] + np.exp(p[0] - p[1] * x)) - y

    starts = ([[math.log(start["a"]), start["alpha"], min(start["c"], 0.99 * cmax)]] if start else
              [[math.log(f["a"]), f["alpha"], c0] for c0 in (0.01 * cmax, 0.5 * cmax, 0.9 * cmax)
               for f in [fit_power_law(np.exp(x), y_raw - c0)]])
    best = None
    for p0 in starts:
        r = least_squares(resid, p0, bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, cmax]))
        best = r if best is None or r.cost < best.cost else best
    k, sse = len(x), 2 * float(best.cost)
    try:
        var = float(np.linalg.inv(best.jac.T @ best.jac)[1, 1]) * sse / (k - 3)
    except np.linalg.LinAlgError:
        var = math.nan
    sst = float(((y - y.mean()) ** 2).sum())
    return {"alpha": float(best.x[1]), "a": math.exp(best.x[0]), "c": float(best.x[2]),
            "se_alpha": math.sqrt(var) if var >= 0 else math.nan, "r2": 1 - sse / sst if sst > 0 else math.nan,
            "n_points": k}


#: experiments.scaling.form -> (fit, its number of parameters)
FORMS = {"power": (fit_power_law, 2), "offset": (fit_offset_power_law, 3)}


def _t_interval(est: float, se: float, dof: int, confidence: float) -> tuple[float, float]:
    if dof < 1 or not math.isfinite(se):
        return (math.nan, math.nan)
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * se
    return (est - half, est + half)


def paired_seeds(losses: Losses, sizes: Sequence) -> dict[Any, list[int]]:
    """Per size, the seeds every method has (the bootstrap draws these, the same draw for every method)."""
    out = {}
    for s in sizes:
        common = set.intersection(*(set(losses[m].get(s, {})) for m in losses))
        if not common:
            raise ValueError(f"size {s!r}: no training seed that every method {sorted(losses)} has")
        out[s] = sorted(common)
    return out


def _log_means(losses: Losses, sizes: Sequence, seeds: Mapping[Any, list[int]]) -> dict[str, np.ndarray]:
    """Per method, the mean over each size's seeds of log L: (k,)."""
    return {m: np.array([np.mean(np.log([losses[m][s][i] for i in seeds[s]])) for s in sizes]) for m in losses}


def _boot_slopes(logl: Mapping[str, np.ndarray], x: np.ndarray, draws: list[np.ndarray]) -> dict[str, np.ndarray]:
    """α of every resample and method: ``draws[j]`` (B, n_j) indexes size j's seed values of ``logl[m][j]``."""
    xc = x - x.mean()
    sxx = float(xc @ xc)
    out = {}
    for m, per_size in logl.items():
        y = np.stack([per_size[j][d].mean(1) for j, d in enumerate(draws)], axis=1)  # (B, k)
        out[m] = -((y - y.mean(1, keepdims=True)) @ xc) / sxx
    return out


def inflate(v: np.ndarray) -> np.ndarray:
    """One size's seed values spread about their mean by sqrt(n / (n − 1)): resampling n values with replacement
    gives their mean a variance (n − 1)/n of the sample variance's s²/n. Coverage of the 95 % interval of α measured
    on 300 synthetic studies (4 sizes, log-normal seed noise): 76 / 83 / 89 % with 2 / 3 / 5 seeds per size without
    this correction, 83 / 89 / 92 % with it (the rest is the percentile bootstrap's normal-like tails)."""
    n = len(v)
    return v if n < 2 else v.mean() + math.sqrt(n / (n - 1)) * (v - v.mean())


def _boot_alphas(per_seed: Mapping[str, list], x: np.ndarray, draws: list[np.ndarray], form: str,
                 fits: Mapping[str, dict]) -> dict:
    """α of every resample and method for ``form`` (power: closed form at once; offset: one fit per resample,
    started from the method's fit to all seeds)."""
    if form == "power":
        return _boot_slopes(per_seed, x, draws)
    from varup.base.utils import progress

    out = {}
    for m, per_size in per_seed.items():
        y = np.stack([per_size[j][d].mean(1) for j, d in enumerate(draws)], axis=1)
        out[m] = np.array([fit_offset_power_law(np.exp(x), np.exp(row), start=fits[m])["alpha"]
                           for row in progress(y, desc=f"bootstrap {m}")])
    return out


def _percentile(v: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(v, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def interval_kind(seeds: Mapping[Any, list[int]], form: str = "power") -> str:
    """'bootstrap' when a size has two seeds or more, else 'ols' (more sizes than the form has parameters) or
    'none'."""
    if max(len(v) for v in seeds.values()) >= 2:
        return "bootstrap"
    return "ols" if len(seeds) > FORMS[form][1] else "none"


def scaling_fit(losses: Losses, n_params: Mapping[Any, float], baseline: str, *, n_boot: int = 2000, seed: int = 0,
                confidence: float = 0.95, form: str = "power") -> dict:
    """Fit every method of ``losses[method][size][seed]`` (sizes: keys of ``n_params``) with ``form`` (power:
    L = a·N^−α; offset: L = c + a·N^−α) and compare each with ``baseline``: per method α, a (c), the interval of α,
    the OLS SE; per other method α − α_baseline with its interval. See the module docstring for the intervals."""
    if baseline not in losses:
        raise ValueError(f"baseline {baseline!r} is not among the methods {sorted(losses)}")
    sizes = sorted(n_params, key=lambda s: n_params[s])
    seeds = paired_seeds(losses, sizes)
    x = np.log(np.array([float(n_params[s]) for s in sizes]))
    means = _log_means(losses, sizes, seeds)
    kind, (fit, n_par) = interval_kind(seeds, form), FORMS[form]
    fits = {m: fit(np.exp(x), np.exp(means[m])) for m in losses}
    if kind == "bootstrap":
        rng = np.random.default_rng(seed)
        draws = [rng.integers(0, len(seeds[s]), size=(n_boot, len(seeds[s]))) for s in sizes]
        per_seed = {m: [inflate(np.log([losses[m][s][i] for i in seeds[s]])) for s in sizes] for m in losses}
        boot = _boot_alphas(per_seed, x, draws, form, fits)
    methods = {}
    for m, f in fits.items():
        lo, hi = (_percentile(boot[m], confidence) if kind == "bootstrap"
                  else _t_interval(f["alpha"], f["se_alpha"], len(sizes) - n_par, confidence))
        methods[m] = {**f, "ci_low": lo, "ci_high": hi,
                      "log_loss_means": means[m].tolist(), "loss_geomeans": np.exp(means[m]).tolist()}
    diffs = {}
    for m in (m for m in losses if m != baseline):
        d = methods[m]["alpha"] - methods[baseline]["alpha"]
        if kind == "bootstrap":
            lo, hi = _percentile(boot[m] - boot[baseline], confidence)
        elif form == "power":
            r = fit_power_law(np.exp(x), np.exp(means[m] - means[baseline]))  # −slope of the log ratio = Δα
            lo, hi = _t_interval(d, r["se_alpha"], len(sizes) - 2, confidence)
        else:  # no paired regression for two offset fits
            lo, hi = math.nan, math.nan
        diffs[m] = {"diff": d, "ci_low": lo, "ci_high": hi,
                    "excludes_zero": bool(math.isfinite(lo) and (lo > 0 or hi < 0))}
    return {"baseline": baseline, "form": form, "sizes": [str(s) for s in sizes],
            "n_params": [float(n_params[s]) for s in sizes], "seeds": {str(s): v for s, v in seeds.items()},
            "interval": kind, "n_boot": n_boot if kind == "bootstrap" else 0, "boot_seed": seed,
            "confidence": confidence, "methods": methods, "differences": diffs,
            "note": interval_note(kind, len(sizes), n_boot, confidence, form)}


def interval_note(kind: str, k: int, n_boot: int, confidence: float, form: str = "power") -> str:
    """What the intervals are, in one sentence for the table's caption."""
    c = int(round(confidence * 100))
    if form == "offset" and kind != "bootstrap":
        return (f"one seed per size: {c} % t-intervals of α from the standard error of the least-squares fit "
                f"({k - 3} degree{'s' if k > 4 else ''} of freedom), none for the difference" if kind == "ols" else
                "one seed per size and as many sizes as parameters: the fitted curve is exact and has no interval")
    if kind == "bootstrap":
        txt = (f"{c} % percentile intervals from {n_boot} bootstrap resamples of the training seeds per size, the "
               "same draw for every method (paired by seed)")
        if k == 2:
            txt += "; with two sizes the fitted line is exact, so the intervals are seed noise only"
        return txt + "; they leave out how far the sizes lie from a power law (see the OLS SE)"
    if kind == "ols":
        dof = f"{k - 2} degree{'s' if k > 3 else ''} of freedom"
        return (f"one seed per size: {c} % t-intervals from the OLS standard error of the slope ({dof}); the "
                "difference from the regression of the log loss ratio on log N")
    return "one seed per size and two sizes: the fitted line is exact and has no interval"


# ------------------------------------------------------------------------------------- the study's job
def collect(entries: Sequence[Mapping[str, Any]]) -> tuple[dict, dict, list[dict]]:
    """From the per-run ``heldout.json`` files: losses[method][depth][seed], n_params[depth] (non-embedding; one
    value per depth, checked across its runs) and the per-run records."""
    from varup.base.utils import read_json

    losses: dict[str, dict[int, dict[int, float]]] = {}
    n_params: dict[int, float] = {}
    runs = []
    for e in entries:
        h = read_json(e["heldout"])
        depth, n = int(e["depth"]), float(h["params"]["non_embedding"])
        if n_params.setdefault(depth, n) != n:
            raise ValueError(f"{e['heldout']}: d{depth} has {n:.0f} non-embedding parameters, another run of d{depth} "
                             f"{n_params[depth]:.0f}; the study's runs must share each depth's architecture")
        losses.setdefault(e["method"], {}).setdefault(depth, {})[int(e["seed"])] = float(h["mean_nll_per_token"])
        runs.append({"method": e["method"], "depth": depth,
                     "seed": int(e["seed"]), "run": e.get("run"), "loss": float(h["mean_nll_per_token"]),
                     "params_non_embedding": int(n), "params_total": int(h["params"]["total"]),
                     "n_rows": int(h["n"]), "split": h["split"], "class_mode": h["class_mode"]})
    return losses, n_params, runs


def run_scaling(entries: Sequence[Mapping[str, Any]], out_json, *, baseline: str, n_boot: int, seed: int,
                confidence: float, dataset: str | None = None, form: str = "power") -> dict:
    """Fit the study's runs (``entries``: method (the configured method's name, whatever the run's folder is
    called), depth, seed, run, heldout) and write ``out_json``."""
    import time

    from varup.base.utils import atomic_write_json, write_provenance

    t0 = time.time()
    losses, n_params, runs = collect(entries)
    res = scaling_fit(losses, n_params, baseline, n_boot=n_boot, seed=seed, confidence=confidence, form=form)
    res.update(kind="scaling", dataset=dataset, runs=runs,
               size_measure="non-embedding parameters (blocks and the AdaLN before the head; without the class, "
                            "token, position and level embeddings and the output head)",
               loss_measure=f"teacher-forced mean NLL per token (nats) on split {runs[0]['split']!r}, "
                            f"class conditioning {runs[0]['class_mode']!r}" if runs else "")
    atomic_write_json(out_json, res)
    write_provenance(out_json, config={"baseline": baseline, "n_boot": n_boot, "confidence": confidence, "form": form,
                                       "runs": [e["run"] for e in entries]}, seed=seed, started=t0)
    for m, d in res["differences"].items():
        log.info("scaling: α %s %.4f, α %s %.4f, Δα %+.4f [%+.4f, %+.4f] (%s)", m, res["methods"][m]["alpha"],
                 baseline, res["methods"][baseline]["alpha"], d["diff"], d["ci_low"], d["ci_high"], res["interval"])
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m varup.studies.scaling``: the rule ``scaling_fit``."""
    from varup.base.utils import remove_orphan_provenance, setup_logging

    ap = argparse.ArgumentParser(prog="python -m varup.studies.scaling", description="fit the scaling study")
    ap.add_argument("--entries", type=json.loads, required=True,
                    help="JSON list of {method, depth, seed, run, heldout}")
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--n-boot", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--confidence", type=float, required=True)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--form", choices=sorted(FORMS), default="power")
    ap.add_argument("--out", required=True)
    ap.add_argument("--log", default=None)
    a = ap.parse_args(argv)
    setup_logging(a.log)
    remove_orphan_provenance(a.out)
    run_scaling(a.entries, a.out, baseline=a.baseline, n_boot=a.n_boot, seed=a.seed, confidence=a.confidence,
                dataset=a.dataset, form=a.form)
    return 0


__all__ = ["fit_power_law", "fit_offset_power_law", "FORMS", "paired_seeds", "interval_kind", "scaling_fit", "interval_note", "collect",
           "run_scaling", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
