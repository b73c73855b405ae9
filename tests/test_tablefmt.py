"""Honest table cells: one value is printed without ±, with n = 1 shown; two or more give mean ± sample std
(ddof = 1); every table module formats through varup.tablefmt."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from varup.tablefmt import DDOF, Stat, add_stat, fmt, fmt_stat, mean_std, spread_note


def test_one_value_has_no_plus_minus_and_n_is_one():
    s = mean_std([0.25])
    assert s == Stat(0.25, None, 1)
    assert fmt(s.mean, s.std, 4) == "0.2500" and "±" not in fmt_stat(s, 4, n_row=1)
    row, disp = {}, {"n": 1}
    add_stat(row, disp, "fid", "FID", [12.5], 2)
    assert disp["FID"] == "12.50" and row["fid_mean"] == 12.5 and row["fid_std"] is None


def test_two_values_give_mean_and_sample_std():
    assert DDOF == 1
    s = mean_std([1.0, 2.0])
    assert s.n == 2 and s.mean == 1.5 and s.std == pytest.approx(math.sqrt(0.5))  # ddof = 1, not 0.5 (ddof = 0)
    assert s.std == pytest.approx(np.std([1.0, 2.0], ddof=1))
    assert fmt_stat(s, 3, n_row=2) == "1.500 ± 0.707"
    assert "ddof = 1" in spread_note() and "without ±" in spread_note()


def test_missing_values_are_skipped_and_named():
    s = mean_std([1.0, None, float("nan"), 3.0])
    assert s.n == 2 and s.mean == 2.0
    assert fmt_stat(s, 1, n_row=3) == "2.0 ± 1.4 (n = 2)"  # fewer values than the row's n: the cell says so
    assert fmt_stat(mean_std([None]), 2, n_row=3) == "—" and fmt(float("nan"), None, 2) == "—"
    assert fmt_stat(mean_std([4.0, None]), 1, n_row=2) == "4.0 (n = 1)"


def test_uncertainty_tables_print_one_seed_without_plus_minus():
    from varup.uncertainty import droppath_table, region_table

    def sweep(seed, fid):
        return {"dataset": "shapes", "depth": 2, "method": "ours", "seed": seed,
                "rates": [{"rate": 0.1, "mean_sigma": 0.01 * (seed + 1), "fidelity": {"fid": fid, "kid_mean": 0.1}}]}

    df, disp = droppath_table([sweep(0, 10.0)])
    assert disp.loc[0, "n"] == 1 and not disp.astype(str).apply(lambda c: c.str.contains("±")).any().any()
    assert disp.loc[0, "FID ↓"] == "10.00" and pd.isna(df.loc[0, "fid_std"])
    df, disp = droppath_table([sweep(0, 10.0), sweep(1, 14.0)])
    assert disp.loc[0, "n"] == 2 and disp.loc[0, "FID ↓"] == f"12.00 ± {np.std([10, 14], ddof=1):.2f}"
    assert df.loc[0, "sigma_std"] == pytest.approx(np.std([0.01, 0.02], ddof=1))
    rec = {"dataset": "shapes", "depth": 2, "method": "ours", "mean_sigma": 0.2, "region": {"available": False}}
    _, disp = region_table([rec])
    assert disp.loc[0, "σ (all)"] == "0.2000" and disp.loc[0, "n"] == 1


# ------------------------------------------------------------------------------------------ tables.py
CFG = {"datasets": {"shapes": {"kind": "toy"}}, "model": {"depths": [2]}, "methods": {"baseline": {}, "ours": {}}}


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _fidelity(fid):
    return {"fid": fid, "isc_mean": None, "kid_mean": fid / 1000, "precision": 0.5, "recall": 0.25}


def _results(tmp_path, seeds):
    """metrics.json and toy_metrics.json of every run (FID 100 + 10 * seed, toy-FD 5 + seed) and the floor."""
    res = tmp_path / "results"
    for method in CFG["methods"]:
        for s in seeds:
            run = res / "shapes" / "d2" / method / f"seed{s}"
            _write(run / "metrics.json", {"fidelity": _fidelity(100.0 + 10 * s), "clean_fid": {"value": 1.0},
                                          "inception": {"source": "test", "isc_unavailable_reason": "none"}})
            _write(run / "toy_metrics.json", {"toy": {"fd": 5.0 + s, "kid_mean": 0.1, "precision": 0.9,
                                                      "recall": 0.8}})
    toy = {"fd": 1.5, "kid_mean": 0.01, "precision": 0.95, "recall": 0.97, "kid_subsets": 100, "kid_subset_size": 96,
           "prc_neighborhood": 3}
    _write(res / "shapes" / "toy_metrics_floor.json", {
        "toy": toy, "inception": _fidelity(40.0), "floor_set": {"split": "train", "n": 96},
        "reference": {"split": "val", "n": 256},
        "feature_space": {"dim": 128, "classifier_val_accuracy": {"mode": 0.99}}})
    return res


@pytest.mark.parametrize("seeds", [[0], [0, 1]])
def test_table2_and_toy_metrics_say_n_and_only_show_a_std_for_two_seeds(tmp_path, seeds):
    from varup.tables import FLOOR_METHOD, table2, toy_metrics_table

    cfg = {**CFG, "seeds": seeds}
    res, out = _results(tmp_path, seeds), tmp_path / "tables"
    t2 = table2(cfg, res, out)
    md = (out / "table2.md").read_text()
    assert "ddof = 1" in md and "over the n training seeds" in md
    header = next(line for line in md.splitlines() if line.startswith("| dataset"))
    assert [c.strip() for c in header.split("|")][4] == "n" and (t2["seeds"] == len(seeds)).all()
    assert all(f"| {len(seeds)}   |" in line for line in md.splitlines() if line.startswith("| shapes"))
    if len(seeds) == 1:
        assert "±" not in md.split("\n\n", 1)[1] and t2["fid_std"].isna().all()
    else:
        assert f"105.00 ± {np.std([100, 110], ddof=1):.2f}" in md
        assert t2["fid_std"].tolist() == pytest.approx([np.std([100, 110], ddof=1)] * 2)

    tm = toy_metrics_table(cfg, res, out)
    assert tm["method"].tolist() == ["baseline", "ours", FLOOR_METHOD] and tm["n"].tolist() == [len(seeds)] * 2 + [1]
    floor = tm[tm["method"] == FLOOR_METHOD].iloc[0]
    assert floor["toy_fd_mean"] == 1.5 and pd.isna(floor["toy_fd_std"]) and floor["fid_mean"] == 40.0
    md = (out / "toy_metrics.md").read_text()
    floor_line = next(line for line in md.splitlines() if FLOOR_METHOD in line)
    assert "±" not in floor_line and "1.500" in floor_line and "40.00" in floor_line
    assert "penultimate layer (128-d" in md and "96 train images vs 256 val images" in md and "n = 1" in md
    assert ("±" in md.split("\n\n", 1)[1]) == (len(seeds) == 2)
    assert {f"toy_metrics.{e}" for e in ("csv", "md", "tex")} <= {p.name for p in out.iterdir()}
