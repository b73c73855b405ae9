"""What a user opens: sample grids name their classes; training curves overlay the methods per quantity, label
every axis, and align seeds by step (a longer log is not cut, a gap stays a gap)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import varup.report.figures as F

CFG = {"datasets": {"shapes": {"kind": "toy"}}, "model": {"depths": [2]}, "methods": {"baseline": {}, "ours": {}},
       "seeds": [0, 1]}
NAMES = ["circle", "square", "triangle", "cross"]


def _record(step, method):
    ce = 5.0 / (1 + step / 100) + (0.1 if method == "ours" else 0.0)
    return {"step": step, "ce": ce, "l2nd": 0.01, "lse": 2.0, "gshare_2nd": 0.0 if method == "baseline" else 1e-3,
            "gshare_se": 0.0 if method == "baseline" else 1e-2, "pred_dispersion": 0.4, "ref_dispersion": 0.05,
            "per_scale": {"ce": [ce / 3, ce, ce * 1.2]}}


def _steps(method, seed):
    if method == "ours" and seed == 1:
        return range(25, 1001, 25)  # a shorter log (e.g. a run still training)
    if method == "baseline" and seed == 1:
        return [t for t in range(25, 1401, 25) if not 500 < t < 800]  # a gap in one seed
    return range(25, 1401, 25)


@pytest.fixture
def results(tmp_path):
    res = tmp_path / "results"
    meta = res / "shapes" / "tokens" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"class_names": NAMES}))
    for method in CFG["methods"]:
        for s in CFG["seeds"]:
            run = res / "shapes" / "d2" / method / f"seed{s}"
            (run / "train").mkdir(parents=True)
            lines = [json.dumps(_record(t, method)) for t in _steps(method, s)]
            (run / "train" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
            labels = np.repeat(np.arange(4), 3)
            np.savez(run / "qualitative.npz", images=np.zeros((12, 8, 8, 3), np.uint8), labels=labels,
                     params=json.dumps({"n_per_class": 3, "cfg": 3.0}))
    return res


@pytest.fixture
def captured(monkeypatch):
    figs = []
    monkeypatch.setattr(F, "save_figure", lambda fig, out, name: figs.append(fig))
    return figs


def test_sample_grid_rows_carry_the_class_names(results, tmp_path, captured):
    F.samples_figure(CFG, results, tmp_path)
    axes = [ax for ax in captured[0].axes if ax.images]
    assert len(axes) == 2
    for ax in axes:
        assert [t.get_text() for t in ax.get_yticklabels()] == NAMES
        assert ax.get_yticks().tolist() == [2 + r * 10 + 4 for r in range(4)]  # row centres of the 8 px grid
    assert F.class_names(results, "missing") is None


def test_seeds_are_aligned_by_step_without_truncation_and_gaps_stay_gaps():
    logs = [{t: {"v": 1.0} for t in (25, 50, 75, 100)}, {t: {"v": 3.0} for t in (25, 50, 75, 100, 125, 150)}]
    steps, vals = F.aligned(logs, lambda r: r["v"])
    assert steps.tolist() == [25, 50, 75, 100, 125, 150] and vals.shape == (2, 6)
    assert np.isnan(vals[0, 4:]).all() and (vals[1] == 3.0).all()
    logs = [{t: {"v": float(t)} for t in (25, 50, 75, 200, 225)}]  # steps 100 .. 175 never logged
    steps, vals = F.aligned(logs, lambda r: r["v"])
    assert len(steps) == 6 and 75 < steps[3] < 200 and np.isnan(vals[0, 3]) and vals[0, 4] == 200


def test_training_curves_overlay_methods_with_labelled_axes(results, tmp_path, captured):
    F.training_curves_figure(CFG, results, tmp_path)
    fig = captured[0]
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == len(F.CURVES)
    for ax in panels:
        assert ax.get_xlabel() == "training step" and ax.get_ylabel()
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(lb.startswith("ours (n = 2)") for lb in labels), labels
    ce = next(ax for ax in panels if "cross-entropy $L_{CE}$" in ax.get_title())
    assert {t.get_text() for t in ce.get_legend().get_texts()} == {"baseline (n = 2)", "ours (n = 2)"}
    colours = {ln.get_label(): ln.get_color() for ln in ce.lines if not ln.get_label().startswith("_")}
    assert colours["baseline (n = 2)"] != colours["ours (n = 2)"]
    thin = [ln for ln in ce.lines if ln.get_label().startswith("_")]  # one per seed and method
    assert len(thin) == 4
    def last_step(ln):
        return np.nanmax(np.where(np.isfinite(ln.get_ydata()), ln.get_xdata(), np.nan))

    assert sorted(last_step(ln) for ln in thin) == [1000, 1400, 1400, 1400]  # the short seed is not cut, nor others
    gap_seed = [ln for ln in thin if last_step(ln) == 1400 and np.isnan(ln.get_ydata()).any()]
    assert len(gap_seed) == 1
    x, y = gap_seed[0].get_xdata(), gap_seed[0].get_ydata()
    assert np.isnan(y[(x > 500) & (x < 800)]).all() and np.isfinite(y[(x <= 500) | (x >= 800)]).all()
    mean_ours = next(ln for ln in ce.lines if ln.get_label() == "ours (n = 2)")
    assert np.nanmax(mean_ours.get_xdata()[np.isfinite(mean_ours.get_ydata())]) == 1400
    strength = next(ax for ax in panels if "regulariser strength" in ax.get_title())
    assert strength.get_yscale() == "log" and all("baseline" not in ln.get_label() for ln in strength.lines)
