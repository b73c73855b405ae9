"""varup.base.power: the paired t-test's power against a simulation, the MDE and n against textbook values, Holm
and Benjamini–Hochberg against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from varup.base.power import adjust, benjamini_hochberg, holm, mde, n_needed, paired_t, power


def _simulated_power(effect, n, sd, alpha, reps, seed):
    rng = np.random.default_rng(seed)
    d = rng.normal(effect, sd, size=(reps, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    return float(np.mean(np.abs(t) > stats.t.ppf(1 - alpha / 2, n - 1)))


@pytest.mark.parametrize("effect,n,sd,alpha", [(1.5, 6, 2.0, 0.05), (-0.7, 12, 1.0, 0.05), (2.0, 3, 1.5, 0.1),
                                               (0.0, 5, 1.0, 0.05)])
def test_power_matches_a_simulation_of_paired_t_tests(effect, n, sd, alpha):
    reps = 40_000
    sim = _simulated_power(effect, n, sd, alpha, reps, seed=7)
    exact = power(effect, n, sd, alpha)
    se = math.sqrt(exact * (1 - exact) / reps)
    assert abs(sim - exact) < 4 * se, (sim, exact, se)
    if effect == 0:
        assert exact == pytest.approx(alpha, abs=1e-9)  # no effect: the test's size


def test_mde_and_n_agree_with_textbook_values():
    # G*Power, one-sample (paired) t, two-tailed, alpha 0.05, power 0.8: d = 0.5 needs 34 pairs (power 0.8078),
    # d = 0.8 needs 15 (power 0.8213)
    assert n_needed(0.5, 1.0) == 34 and power(0.5, 34, 1.0) == pytest.approx(0.8078, abs=5e-4)
    assert n_needed(0.8, 1.0) == 15 and power(0.8, 15, 1.0) == pytest.approx(0.8213, abs=5e-4)
    assert power(0.5, 33, 1.0) < 0.8 < power(0.5, 34, 1.0)
    # large n: the normal approximation (z_0.975 + z_0.8) · sd / sqrt(n) = 2.8016 · sd / sqrt(n)
    assert mde(2000, 3.0) == pytest.approx(2.8016 * 3.0 / math.sqrt(2000), rel=2e-3)
    e = mde(3, 5.0)  # few pairs: far above the normal approximation (t with 2 degrees of freedom)
    assert power(e, 3, 5.0) == pytest.approx(0.8, abs=1e-6) and e > 2.8016 * 5.0 / math.sqrt(3) * 1.5
    assert mde(10, 2.0) == pytest.approx(2 * mde(10, 1.0), rel=1e-6)  # in the metric's units: scales with sd


def test_holm_and_bh_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> running max 0.06
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: sorted 0.005·4/1 = 0.02, 0.01·4/2 = 0.02, 0.03·4/3 = 0.04, 0.04·4/4 = 0.04 -> running min from the top
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert adjust([0.01, None, 0.04], "holm") == pytest.approx([0.02, None, 0.04])
    assert adjust([0.01, None, 0.04], "none") == [0.01, None, 0.04]
    with pytest.raises(ValueError, match="holm"):
        adjust([0.1], "bonferroni")


def test_paired_t_interval_and_p():
    d = [1.0, 2.0, 3.0, 4.0]
    r = paired_t(d)
    ref = stats.ttest_1samp(d, 0.0)
    assert r["p"] == pytest.approx(ref.pvalue) and r["mean"] == 2.5 and r["n"] == 4
    half = stats.t.ppf(0.975, 3) * np.std(d, ddof=1) / 2
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((2.5 - half, 2.5 + half))
    assert paired_t([1.0])["p"] is None and math.isnan(paired_t([1.0])["ci_low"])
