"""The mode-coverage table (toy datasets), from each run's ``mode_coverage.json``."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from varup.report.tablefmt import GROUP_KEYS, add_stat, grouped, key_cols

log = logging.getLogger("varup.data.modes")



MODE_COLUMNS = (("covered", "modes covered", lambda c: c["overall"]["covered"], 1),
                ("covered_share", "modes ≥ ½ true share", lambda c: c["overall"]["covered_share"], 1),
                ("expected_covered_true", "i.i.d. ceiling", lambda c: c["overall"]["expected_covered_true"], 1),
                ("kl_gen_true", "KL(gen‖true)", lambda c: c["overall"]["kl_gen_true"], 3),
                ("kl_true_gen", "KL(true‖gen)", lambda c: c["overall"]["kl_true_gen"], 3),
                ("class_covered", "modes/class covered", lambda c: c["per_class_mean"]["covered"], 2),
                ("class_kl_gen_true", "KL(gen‖true)/class", lambda c: c["per_class_mean"]["kl_gen_true"], 3),
                ("class_error", "class error", lambda c: c["class_error"], 3))


def _coverage_row(keycols: dict, covs: list[dict], n_modes: int) -> tuple[dict, dict]:
    """(CSV row, display row) of the coverage dicts of one group."""
    row = {**keycols, "seeds": len(covs), "n_modes": n_modes}
    d = {**keycols, "n": len(covs)}
    for key, title, get, digits in MODE_COLUMNS:
        add_stat(row, d, key, title, (get(c) for c in covs), digits)
    return row, d


def mode_coverage_table(records: Sequence[Mapping[str, Any]]):
    """(table, display): one row per (dataset, depth, method) of :func:`run_mode_coverage` records, mean ± std over
    the records (training seeds; :mod:`varup.report.tablefmt`: sample std, ddof = 1, one record -> no ±): modes covered
    (>= 1 sample, and >= min_share_ratio of the true share), the i.i.d. ceiling, KL both ways, per-class mean
    coverage and the class error; then per dataset a "real (val)" row (n = 1) from its first record's reference (the
    classifier on as many real images; its depth is that record's, not meaningful)."""
    import pandas as pd

    rows = [_coverage_row(key_cols(key), [r["coverage"] for r in rs], rs[0]["coverage"]["overall"]["n_modes"])
            for key, rs in grouped(records).items()]
    seen = set()
    for r in records:  # one reference row per dataset, from its first record
        if r.get("reference_real") and r.get("dataset") not in seen:
            seen.add(r.get("dataset"))
            ref = r["reference_real"]
            keycols = {k: r.get(k) for k in GROUP_KEYS if r.get(k) is not None}
            keycols["method"] = f"real ({ref['split']})"
            rows.append(_coverage_row(keycols, [ref], ref["overall"]["n_modes"]))
    return pd.DataFrame([r for r, _ in rows]), pd.DataFrame([d for _, d in rows])
