"""Quality–diversity frontiers (issue 25, item 3): compare two training methods by their frontiers, not by one
operating point each.

A model sampled over a grid of settings (temperature, top-p, CFG) gives a curve of (quality, diversity) points, both
oriented so that higher is better (pass −class error, or 1 − class error, for a lower-is-better score). A loss that
only flattens the predictions is matched by the baseline sampled at a higher temperature: its points lie on the
baseline's curve, further along it. Comparing single points cannot tell that apart from a real gain; comparing
frontiers can.

* :func:`pareto_front`: the non-dominated points of one curve (its upper frontier), by quality ascending.
* :func:`frontier`: diversity as a function of quality along that frontier: monotone piecewise-cubic (PCHIP)
  interpolation of the frontier points, defined over the quality range they span, together with a resolution: at each
  quality, |PCHIP − linear interpolation|, an estimate of how far the interpolation itself may be off between points.
* :func:`matched_gain`: diversity of A minus diversity of B at matched quality over a grid on a given quality range.
* :func:`compare_frontiers`: the paired comparison over training seeds (a seed fixes both methods' initialisation and
  data order): per seed the mean gain over the quality range that seed's two curves share (≈ the area between the
  curves over the range length; a seed whose curves share none is left out and named: there is no matched quality
  to compare at); over the seeds the mean gain with a two-sided Student-t interval (n − 1 degrees of freedom,
  :func:`varup.base.power.paired_t`); and, over the range every used seed shares (where there is one), per grid
  quality the t-interval of the gain, Bonferroni-corrected over the k settings of the sampling grid (the
  interpolated grid holds no more independent points than the curves were sampled at), so that many grid points do
  not make a crossing by chance. Per-seed ranges, not one range all seeds share: with more seeds the common range
  shrinks and vanishes (4 seeds of the claim study shared none), while each seed's pair still overlaps.

The verdict (``verdict``), in this order:

1. ``undetermined`` — fewer than two seeds (no interval) or no quality range shared by every seed's curves;
2. ``mixed`` — the pointwise gain is positive beyond its interval at some qualities and negative at others (the
   curves cross): both regions are reported (``regions_better``, ``regions_worse``);
3. ``moves the frontier`` — the mean gain's interval lies above the mean resolution (A's frontier is higher);
4. ``lowers the frontier`` — the mean gain's interval lies below minus the mean resolution;
5. ``moves along the frontier`` — the frontiers coincide within the interval, but the default operating points (each
   curve's ``default`` index: the setting the method is sampled at by default) differ in quality or diversity
   (paired t, Holm over the two): what a temperature change also gives;
6. ``no difference`` — neither the frontiers nor the default points differ beyond their intervals.

"Beyond its interval" means beyond the t-interval widened by the interpolation resolution, so two samplings of the
same curve at different places are not read as a gain. Pure: numpy and scipy.
In varup.base, the lowest layer, so that a study (the claim study) and the report (the claims ledger, which may
import only varup.config and varup.base: pyproject.toml import contracts) share one implementation.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from varup.base.power import adjust, paired_t

UNDETERMINED, MIXED, MOVES, LOWERS, ALONG, SAME = ("undetermined", "mixed", "moves the frontier",
                                                   "lowers the frontier", "moves along the frontier", "no difference")
VERDICTS = (MOVES, LOWERS, MIXED, ALONG, SAME, UNDETERMINED)


def pareto_front(quality: Sequence[float], diversity: Sequence[float]) -> np.ndarray:
    """Indices of the non-dominated points (no other point at least as good on both and better on one), ordered by
    quality ascending (so diversity descending); of exact duplicates one is kept."""
    q, v = np.asarray(quality, np.float64), np.asarray(diversity, np.float64)
    if q.shape != v.shape or q.ndim != 1 or len(q) == 0:
        raise ValueError(f"quality and diversity must be two equally long 1-d lists, got shapes {q.shape}, {v.shape}")
    if not (np.isfinite(q).all() and np.isfinite(v).all()):
        raise ValueError("quality and diversity must be finite numbers (a setting without a score: leave it out)")
    order = np.lexsort((-v, -q))  # quality descending, ties: the more diverse first
    keep, best = [], -math.inf
    for i in order:  # sweep from the highest quality down: a point survives if it is more diverse than all above
        if v[i] > best:
            keep.append(i)
            best = v[i]
    return np.array(keep[::-1], dtype=np.int64)


class Frontier:
    """Diversity at a given quality along one curve's upper frontier (see the module docstring)."""

    def __init__(self, quality: Sequence[float], diversity: Sequence[float]):
        from scipy.interpolate import PchipInterpolator

        idx = pareto_front(quality, diversity)
        self.q = np.asarray(quality, np.float64)[idx]
        self.v = np.asarray(diversity, np.float64)[idx]
        self.low, self.high = float(self.q[0]), float(self.q[-1])
        self._pchip = PchipInterpolator(self.q, self.v) if len(self.q) >= 2 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self._pchip is None:
            return np.full(x.shape, self.v[0])
        return self._pchip(x)

    def resolution(self, x: np.ndarray) -> np.ndarray:
        """|PCHIP − linear| at ``x``: how much the interpolation between frontier points can be trusted."""
        x = np.asarray(x, np.float64)
        if self._pchip is None:
            return np.zeros(x.shape)
        return np.abs(self._pchip(x) - np.interp(x, self.q, self.v))


def frontier(quality: Sequence[float], diversity: Sequence[float]) -> Frontier:
    return Frontier(quality, diversity)


def matched_gain(a: Frontier, b: Frontier, grid: np.ndarray) -> dict[str, np.ndarray]:
    """Diversity of ``a`` minus ``b`` at the qualities ``grid`` (inside both frontiers' ranges) and the summed
    interpolation resolution of the two there."""
    if grid.min() < max(a.low, b.low) - 1e-12 or grid.max() > min(a.high, b.high) + 1e-12:
        raise ValueError(f"quality grid [{grid.min():g}, {grid.max():g}] leaves the range both frontiers cover "
                         f"([{max(a.low, b.low):g}, {min(a.high, b.high):g}])")
    return {"gain": a(grid) - b(grid), "resolution": a.resolution(grid) + b.resolution(grid)}


def _regions(grid: np.ndarray, mask: np.ndarray) -> list[list[float]]:
    """Contiguous quality ranges of the grid where ``mask`` holds, as [first, last] quality."""
    out, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        if start is not None and (not m or i == len(mask) - 1):
            end = i if m else i - 1
            out.append([float(grid[start]), float(grid[end])])
            start = None
    return out


def _curve(c: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(c["quality"], np.float64), np.asarray(c["diversity"], np.float64)


def _default_shift(a: Mapping[int, Mapping], b: Mapping[int, Mapping], seeds: list[int], confidence: float) -> dict:
    """Paired difference (A − B) of the default operating points' quality and diversity, each with its t-interval
    and p; ``differs`` where the Holm-adjusted p of the two is below 1 − confidence; {} without defaults."""
    if any(a[s].get("default") is None or b[s].get("default") is None for s in seeds):
        return {}
    out = {}
    for k in ("quality", "diversity"):
        d = [float(np.asarray(a[s][k])[a[s]["default"]]) - float(np.asarray(b[s][k])[b[s]["default"]]) for s in seeds]
        out[k] = paired_t(d, confidence)
    for k, q in zip(out, adjust([out[k]["p"] for k in out], "holm")):
        out[k].update(p_holm=q, differs=bool(q is not None and q < 1 - confidence))
    return out


def _seed_gains(fa: Mapping[int, Frontier], fb: Mapping[int, Frontier], seeds: list[int],
                n_grid: int) -> dict[int, dict]:
    """Per seed, over the quality range its own two frontiers share: the mean gain (A − B) and the mean
    interpolation resolution; ``gain`` None where the two share no range."""
    out = {}
    for s in seeds:
        lo, hi = max(fa[s].low, fb[s].low), min(fa[s].high, fb[s].high)
        out[s] = {"range": [lo, hi], "gain": None, "resolution": None}
        if hi > lo:
            p = matched_gain(fa[s], fb[s], np.linspace(lo, hi, n_grid))
            out[s].update(gain=float(p["gain"].mean()), resolution=float(p["resolution"].mean()))
    return out


def _band(fa: Mapping[int, Frontier], fb: Mapping[int, Frontier], seeds: list[int], lo: float, hi: float,
          k: int, confidence: float, n_grid: int) -> dict[str, Any]:
    """The pointwise gain profile over the quality range every seed shares, with its t-band (Bonferroni over the
    ``k`` settings the curves were sampled at), and the regions where A is higher / lower beyond band and
    resolution; no profile (and no regions) where the seeds share no range."""
    from scipy import stats

    if not hi > lo:
        return {"regions_better": [], "regions_worse": [], "band": "none: the seeds' shared ranges do not overlap"}
    grid = np.linspace(lo, hi, n_grid)
    per = [matched_gain(fa[s], fb[s], grid) for s in seeds]
    gains = np.stack([p["gain"] for p in per])
    res = np.mean([p["resolution"] for p in per], axis=0)
    level = 1 - (1 - confidence) / k
    half = stats.t.ppf(0.5 + level / 2, len(seeds) - 1) * gains.std(axis=0, ddof=1) / math.sqrt(len(seeds))
    g = gains.mean(axis=0)
    return {"grid": grid.tolist(), "gain_profile": g.tolist(), "gain_half_width": half.tolist(), "band_level": level,
            "resolution": res.tolist(), "regions_better": _regions(grid, g - half > res),
            "regions_worse": _regions(grid, g + half < -res)}


def compare_frontiers(curves_a: Mapping[int, Mapping[str, Any]], curves_b: Mapping[int, Mapping[str, Any]], *,
                      confidence: float = 0.95, n_grid: int = 101) -> dict[str, Any]:
    """A against B, paired by seed: ``curves_x[seed]`` = {"quality": [...], "diversity": [...], "default": index or
    None}. Returns each seed's shared quality range and mean gain over it, their mean with its t-interval (seeds
    whose two curves share no range are left out and named), the pointwise gain profile over the range every used
    seed shares, the regions where A is higher / lower beyond it, the default points' paired shift, and the verdict
    (module docstring)."""
    seeds = sorted(set(curves_a) & set(curves_b))
    fa = {s: frontier(*_curve(curves_a[s])) for s in seeds}
    fb = {s: frontier(*_curve(curves_b[s])) for s in seeds}
    per = _seed_gains(fa, fb, seeds, n_grid)
    used = [s for s in seeds if per[s]["gain"] is not None]
    lo = max([per[s]["range"][0] for s in used], default=math.nan)
    hi = min([per[s]["range"][1] for s in used], default=math.nan)
    out: dict[str, Any] = {"seeds": used, "n": len(used), "confidence": confidence, "interval": "paired t",
                           "quality_range": [lo, hi], "seed_ranges": {str(s): per[s]["range"] for s in seeds},
                           "seeds_without_overlap": [s for s in seeds if s not in used],
                           "defaults": _default_shift(curves_a, curves_b, seeds, confidence)}
    if len(used) < 2:
        why = "fewer than two paired seeds" if len(seeds) < 2 else "the curves share no quality range"
        return {**out, "verdict": UNDETERMINED, "why": why, "regions_better": [], "regions_worse": []}
    k = max(len(_curve(c)[0]) for c in (*curves_a.values(), *curves_b.values()))  # the grid's settings
    out.update(_band(fa, fb, used, lo, hi, k, confidence, n_grid))
    gains = [per[s]["gain"] for s in used]
    margin = float(np.mean([per[s]["resolution"] for s in used]))
    out.update(mean_resolution=margin, per_seed_mean_gain=gains, mean_gain=paired_t(gains, confidence))
    out["verdict"] = _verdict(out["mean_gain"], out["regions_better"], out["regions_worse"], margin, out["defaults"])
    return out


def _verdict(mean: Mapping, better: list, worse: list, margin: float, defaults: Mapping) -> str:
    if better and worse:
        return MIXED
    if mean["ci_low"] > margin:
        return MOVES
    if mean["ci_high"] < -margin:
        return LOWERS
    if any(d["differs"] for d in defaults.values()):
        return ALONG
    return SAME


def describe(res: Mapping[str, Any], quality: str = "quality", diversity: str = "diversity") -> str:
    """One plain sentence of a :func:`compare_frontiers` result."""
    v = res["verdict"]
    if v == UNDETERMINED:
        return f"undetermined: {res['why']}"
    m = res["mean_gain"]
    c = int(round(res["confidence"] * 100))
    lo, hi = res["quality_range"]
    where = f"over [{lo:.3g}, {hi:.3g}]" if hi > lo else "over each seed's own shared range (no range shared by all)"
    txt = (f"{v}: {diversity} at matched {quality} {where} differs by {m['mean']:+.3g} [{m['ci_low']:+.3g}, "
           f"{m['ci_high']:+.3g}] ({c} % paired t, n = {m['n']})")
    if res.get("seeds_without_overlap"):
        txt += f"; seeds {res['seeds_without_overlap']} left out (their curves share no quality range)"
    regions = lambda rs: ", ".join(f"[{a:.3g}, {b:.3g}]" for a, b in rs)  # noqa: E731
    if res["regions_better"]:
        txt += f"; higher at {quality} {regions(res['regions_better'])}"
    if res["regions_worse"]:
        txt += f"; lower at {quality} {regions(res['regions_worse'])}"
    return txt


__all__ = ["VERDICTS", "UNDETERMINED", "MIXED", "MOVES", "LOWERS", "ALONG", "SAME", "pareto_front", "Frontier",
           "frontier", "matched_gain", "compare_frontiers", "describe"]
