"""varup.base.frontier on synthetic curves: a dominating method moves the frontier; a temperature-shifted copy (the
same curve sampled further along) does not, though its default point is more diverse; crossing curves are mixed."""
from __future__ import annotations

import numpy as np
import pytest

import varup.base.frontier as fr
from varup.base.frontier import compare_frontiers, describe, frontier, pareto_front

ALONG, LOWERS, MIXED, MOVES, SAME, UNDETERMINED = fr.ALONG, fr.LOWERS, fr.MIXED, fr.MOVES, fr.SAME, fr.UNDETERMINED

SEEDS = [0, 1, 2, 3, 4]
THETA = np.linspace(0.2, 1.4, 8)  # the sampling grid (think temperatures): position along the quarter circle
DEFAULT = 3  # the grid point a method is sampled at by default


def _curves(seed_rng, radius=1.0, shift=0.0, tilt=0.0, noise=0.004):
    """Per seed: quality = r·cos θ, diversity = r·sin θ (+ tilt · (quality − 0.5)); r varies by seed (shared by both
    methods of a seed: ``seed_rng`` is seeded by the seed alone) and by method; each point has its own noise."""
    out = {}
    for s in SEEDS:
        shared = np.random.default_rng(100 + s).normal(0, 0.01)  # the seed's effect, the same for both methods
        r = radius + shared + seed_rng.normal(0, 0.005)
        th = THETA + shift
        q = r * np.cos(th) + seed_rng.normal(0, noise, len(th))
        v = r * np.sin(th) + tilt * (q - 0.5) + seed_rng.normal(0, noise, len(th))
        out[s] = {"quality": q.tolist(), "diversity": v.tolist(), "default": DEFAULT}
    return out


def test_pareto_front_drops_dominated_points():
    q = [0.1, 0.5, 0.4, 0.9, 0.9, 0.3]
    v = [0.9, 0.6, 0.5, 0.2, 0.1, 0.95]
    idx = pareto_front(q, v)
    assert [q[i] for i in idx] == [0.3, 0.5, 0.9] and [v[i] for i in idx] == [0.95, 0.6, 0.2]
    f = frontier(q, v)
    assert f(np.array([0.3, 0.5, 0.9])) == pytest.approx([0.95, 0.6, 0.2])
    with pytest.raises(ValueError, match="finite"):
        pareto_front([0.1, np.nan], [0.2, 0.3])


def test_a_dominating_method_moves_the_frontier():
    rng = np.random.default_rng(1)
    res = compare_frontiers(_curves(rng, radius=1.08), _curves(rng), confidence=0.95)
    assert res["verdict"] == MOVES, describe(res)
    assert res["mean_gain"]["ci_low"] > 0 and res["regions_better"] and not res["regions_worse"]
    lo, hi = res["quality_range"]
    assert 0.15 < lo < hi < 1.0
    back = compare_frontiers(_curves(rng), _curves(rng, radius=1.08))
    assert back["verdict"] == LOWERS, describe(back)


def test_a_temperature_shifted_copy_moves_along_the_frontier_not_it():
    rng = np.random.default_rng(2)
    flat, base = _curves(rng, shift=0.09), _curves(rng)  # "flatter" = the baseline sampled further along its curve
    res = compare_frontiers(flat, base)
    # a point comparison at the default setting sees more diversity (and less quality) ...
    assert res["defaults"]["diversity"]["differs"] and res["defaults"]["diversity"]["mean"] > 0.05
    assert res["defaults"]["quality"]["mean"] < 0
    # ... the frontiers coincide: no gain at matched quality
    assert res["verdict"] == ALONG, describe(res)
    assert res["mean_gain"]["ci_low"] <= res["mean_resolution"] and not res["regions_better"]
    assert abs(res["mean_gain"]["mean"]) < 0.01
    same = compare_frontiers(_curves(rng), _curves(rng))
    assert same["verdict"] == SAME, describe(same)


def test_crossing_curves_are_mixed_with_both_regions():
    rng = np.random.default_rng(3)
    res = compare_frontiers(_curves(rng, tilt=0.3), _curves(rng))  # higher where quality > 0.5, lower below
    assert res["verdict"] == MIXED, describe(res)
    assert res["regions_better"] and res["regions_worse"]
    assert min(a for a, _ in res["regions_better"]) > 0.5 and max(b for _, b in res["regions_worse"]) < 0.5
    assert "higher at" in describe(res) and "lower at" in describe(res)


def test_one_seed_or_disjoint_curves_are_undetermined():
    rng = np.random.default_rng(4)
    a, b = _curves(rng), _curves(rng)
    assert compare_frontiers({0: a[0]}, {0: b[0]})["verdict"] == UNDETERMINED
    far = {s: {"quality": [5.0, 6.0], "diversity": [1.0, 0.5], "default": 0} for s in SEEDS}
    res = compare_frontiers(far, b)
    assert res["verdict"] == UNDETERMINED and "no quality range" in res["why"]


def test_each_seed_is_compared_over_its_own_shared_range():
    """Seeds whose curves sit at different qualities share no common range, yet each seed's pair overlaps: the gain
    is measured per seed; a seed whose pair shares nothing is left out and named."""
    def arc(offset, lift):
        q = np.linspace(0.1, 0.5, 6) + offset
        return {"quality": q.tolist(), "diversity": (1.0 - q + lift).tolist(), "default": 2}

    a = {s: arc(0.3 * s, 0.1 + 0.01 * s) for s in range(4)}
    b = {s: arc(0.3 * s + 0.05, 0.0) for s in range(4)}
    res = compare_frontiers(a, b)
    assert not res["quality_range"][1] > res["quality_range"][0]  # no range all seeds share
    assert res["n"] == 4 and res["verdict"] == MOVES, describe(res)
    assert res["mean_gain"]["mean"] == pytest.approx(0.115, abs=1e-6) and res["regions_better"] == []
    assert "each seed's own shared range" in describe(res)
    b[3] = arc(5.0, 0.0)  # seed 3's baseline far away: no matched quality for that seed
    res = compare_frontiers(a, b)
    assert res["n"] == 3 and res["seeds_without_overlap"] == [3] and "seeds [3] left out" in describe(res)
