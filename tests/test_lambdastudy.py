"""The λ study's statistics: t-intervals, paired differences against the baseline, the verdict, the table."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from varup.base.utils import atomic_write_json
from varup.report.tables import lambda_study_table
from varup.studies.lambdastudy import summarise, t_interval


def test_t_interval_by_hand():
    m, lo, hi = t_interval([1.0, 2.0, 3.0], 0.95)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n)
    assert m == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    assert math.isnan(t_interval([5.0])[1])


def _runs(class_errors, modes):
    return {s: {"class_error": c, "modes_covered": m} for s, (c, m) in enumerate(zip(class_errors, modes))}


def test_paired_differences_and_verdict():
    per_run = {"baseline": _runs([0.10, 0.20, 0.30], [50, 55, 60]),
               # the same seed-to-seed swing, shifted: unpaired intervals overlap, the paired one excludes 0
               "good": _runs([0.08, 0.18, 0.27], [50, 55, 60]),
               "noisy": _runs([0.05, 0.30, 0.20], [50, 55, 60])}
    res = summarise(per_run, "baseline")
    good = next(p for p in res["points"] if p["point"] == "good")["metrics"]["class_error"]
    assert good["diff_mean"] == pytest.approx(-0.0233333, rel=1e-4) and good["diff_ci_high"] < 0 and good["better"]
    noisy = next(p for p in res["points"] if p["point"] == "noisy")["metrics"]["class_error"]
    assert noisy["diff_ci_low"] < 0 < noisy["diff_ci_high"] and not noisy["better"] and not noisy["worse"]
    assert "good on class error by -0.023" in res["verdict"] and "noisy" not in res["verdict"]
    with pytest.raises(ValueError, match="baseline"):
        summarise(per_run, "missing")


def test_no_winner_is_said_plainly_and_the_table_marks_rows(tmp_path):
    per_run = {"baseline": _runs([0.10, 0.20, 0.30], [50, 55, 60]), "other": _runs([0.12, 0.18, 0.31], [51, 54, 60])}
    res = summarise(per_run, "baseline")
    assert "no setting beats the baseline beyond noise" in res["verdict"]
    res.update(kind="lambda_study", losses={"other": {"lambda_2nd": 0.02, "reference": "semantic_k",
                                                      "l2nd_reduction": "image_sum", "lambda_se": 0.0,
                                                      "se_direction": "minimize"}},
               metrics=[{"key": "class_error", "title": "class error", "better": -1, "digits": 3}])
    atomic_write_json(tmp_path / "lambda_study" / "lambda_study.json", res)
    lambda_study_table({}, tmp_path, tmp_path)
    md = (tmp_path / "lambda_study.md").read_text()
    assert "no setting beats the baseline beyond noise" in md and "Δ vs baseline (paired)" in md
    assert "0.200 [" in md and "λ1 0.02 (semantic_k, image_sum)" in md
    df = pd.read_csv(tmp_path / "lambda_study.csv")
    assert df.loc[df["point"] == "other", "class_error_diff_mean"].iloc[0] == pytest.approx(0.0033333, rel=1e-4)
