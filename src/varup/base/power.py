"""Power of a paired design and multiple-comparison control (issue 25, item 4).

A study that trains every method with the same training seeds observes, per seed, the paired difference
d = method − baseline. The test is the two-sided one-sample t-test of mean(d) = 0 over the n pairs (n − 1 degrees of
freedom). For a true mean difference δ and a standard deviation σ of the paired differences the test statistic
follows a noncentral t with n − 1 degrees of freedom and noncentrality δ·√n / σ, so (exactly, not the normal
approximation)

    power(δ) = P(|T| > t_{1−α/2, n−1}),  T ~ t'(n − 1, δ√n/σ)

:func:`power` computes it, :func:`mde` inverts it for δ (the minimum detectable effect: the smallest |δ| found with
the given probability), :func:`n_needed` for n. σ is an input: from a pilot (the λ study's or the claims ledger's own
paired differences, :func:`paired_sd`) or given.

Multiple comparisons: :func:`holm` (Holm's step-down, controls the family-wise error rate under any dependence) and
:func:`benjamini_hochberg` (the step-up false-discovery-rate procedure, valid for independent or positively dependent
tests) give adjusted p-values; :func:`adjust` picks one by name. The claims ledger uses Holm by default
(``experiments.claims.correction``).

Pure: numpy and scipy.
In varup.base, the lowest layer, so that a study (the claim study) and the report (the claims ledger, which may
import only varup.config and varup.base: pyproject.toml import contracts) share one implementation.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

CORRECTIONS = ("holm", "bh", "none")


def _check(n: int, sd: float, alpha: float) -> None:
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got n = {n}")
    if not (sd > 0 and math.isfinite(sd)):
        raise ValueError(f"the std of the paired differences must be a positive number, got {sd}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def power(effect: float, n: int, sd: float, alpha: float = 0.05) -> float:
    """Probability that the two-sided paired t-test at level ``alpha`` over ``n`` pairs rejects when the paired
    differences have mean ``effect`` and standard deviation ``sd`` (noncentral t, exact)."""
    from scipy import stats

    _check(n, sd, alpha)
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = abs(effect) * math.sqrt(n) / sd  # the test is symmetric in the sign of the effect
    far = float(stats.nct.cdf(-crit, df, nc))  # the tail opposite the effect: negligible unless nc is small
    return float(stats.nct.sf(crit, df, nc)) + (far if math.isfinite(far) else 0.0)  # scipy's NaN there is ~0


def mde(n: int, sd: float, alpha: float = 0.05, target_power: float = 0.8) -> float:
    """The minimum detectable effect: the mean paired difference (> 0, in the metric's units) that the two-sided
    paired t-test over ``n`` pairs finds with probability ``target_power`` at level ``alpha``."""
    from scipy import optimize

    _check(n, sd, alpha)
    if not alpha < target_power < 1:
        raise ValueError(f"target power must lie in (alpha, 1), got {target_power}")
    hi = sd
    while power(hi, n, sd, alpha) < target_power:
        hi *= 2
    return float(optimize.brentq(lambda e: power(e, n, sd, alpha) - target_power, 0.0, hi, xtol=1e-10 * sd))


def n_needed(effect: float, sd: float, alpha: float = 0.05, target_power: float = 0.8, n_max: int = 100_000) -> int:
    """The fewest pairs with which the two-sided paired t-test finds a mean difference ``effect`` with probability
    at least ``target_power`` at level ``alpha``."""
    if effect == 0:
        raise ValueError("an effect of 0 is never detected with power above alpha: give a non-zero effect")
    lo, hi = 2, 2
    while power(effect, hi, sd, alpha) < target_power:
        lo, hi = hi, hi * 2
        if hi > n_max:
            raise ValueError(f"more than {n_max} pairs are needed for an effect of {effect} at sd {sd}")
    while lo < hi:  # power grows with n: the first n that reaches the target
        mid = (lo + hi) // 2
        if power(effect, mid, sd, alpha) >= target_power:
            hi = mid
        else:
            lo = mid + 1
    return hi


def paired_sd(differences: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1) of paired differences, the σ of a pilot."""
    d = np.asarray([v for v in differences if v is not None and math.isfinite(v)], np.float64)
    if len(d) < 2:
        raise ValueError(f"the std of paired differences needs at least 2 of them, got {len(d)}")
    return float(d.std(ddof=1))


def paired_t(differences: Sequence[float], confidence: float = 0.95) -> dict:
    """The two-sided one-sample t-test of mean(differences) = 0: n, mean, sd, the t-interval of the mean and p
    (None for n < 2 or zero spread with a zero mean; p = 0 for zero spread and a non-zero mean)."""
    from scipy import stats

    d = np.asarray([v for v in differences if v is not None and math.isfinite(v)], np.float64)
    n = len(d)
    out = {"n": n, "mean": float(d.mean()) if n else math.nan, "sd": math.nan, "ci_low": math.nan,
           "ci_high": math.nan, "p": None}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    out.update(sd=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    if sd > 0:
        out["p"] = float(2 * stats.t.sf(abs(out["mean"]) / (sd / math.sqrt(n)), n - 1))
    elif out["mean"] != 0:
        out["p"] = 0.0
    return out


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: sorted ascending, p_(i) · (m − i + 1) (i from 1), made non-decreasing,
    capped at 1; returned in the input order. Reject at level α where the adjusted p ≤ α."""
    a = np.asarray(p, np.float64)
    m = len(a)
    order = np.argsort(a, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate(a[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adj
    return out.tolist()


def benjamini_hochberg(p: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values (q-values): sorted ascending, p_(i) · m / i, made non-decreasing from the
    largest down (the running minimum), capped at 1; returned in the input order."""
    a = np.asarray(p, np.float64)
    m = len(a)
    order = np.argsort(a, kind="stable")
    scaled = a[order] * m / np.arange(1, m + 1)
    adj = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    out = np.empty(m)
    out[order] = adj
    return out.tolist()


def adjust(p: Sequence[float | None], method: str = "holm") -> list[float | None]:
    """Adjusted p-values by ``method`` (holm, bh or none) over the tests that have a p; None stays None."""
    if method not in CORRECTIONS:
        raise ValueError(f"multiple-comparison correction must be one of {CORRECTIONS}, got {method!r}")
    idx = [i for i, v in enumerate(p) if v is not None]
    vals = [float(p[i]) for i in idx]
    adj = holm(vals) if method == "holm" else benjamini_hochberg(vals) if method == "bh" else vals
    out: list[float | None] = [None] * len(p)
    for i, v in zip(idx, adj):
        out[i] = v
    return out


__all__ = ["CORRECTIONS", "power", "mde", "n_needed", "paired_sd", "paired_t", "holm", "benjamini_hochberg",
           "adjust"]
