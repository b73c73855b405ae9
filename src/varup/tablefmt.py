"""Table cells shared by every table module (tables.py, uncertainty.py, modes.py): mean ± std of a group's values,
and the grouping of run records by (dataset, depth, method).

The convention, the same in every table:

* a cell aggregates the n values of its group (the training seeds of a run group, unless the caption says otherwise);
* n >= 2: ``"mean ± std"``, std the SAMPLE standard deviation (``ddof = 1``, :data:`DDOF`);
* n = 1: the value alone, std None (an empty CSV cell) -- never "± 0", which would claim a measured spread;
* n = 0 (no value): ``"—"``.

The display tables carry a column ``n`` (values per row) and, when one cell has fewer values than its row (missing
entries), that cell says ``(n = k)``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np

DDOF = 1
GROUP_KEYS = ("dataset", "depth", "method")
MISSING = "—"


class Stat(NamedTuple):
    """Mean, sample std (None unless n >= 2) and number of the finite values of a group."""
    mean: float | None
    std: float | None
    n: int


def mean_std(values: Iterable[Any]) -> Stat:
    """:class:`Stat` of ``values``, skipping None and NaN; std with ``ddof = 1``, None for fewer than 2 values."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return Stat(None, None, 0)
    return Stat(float(np.mean(v)), float(np.std(v, ddof=DDOF)) if len(v) > 1 else None, len(v))


def fmt(mean: float | None, std: float | None, digits: int) -> str:
    """``"m ± s"``; ``"m"`` when ``std`` is None (a single value); ``"—"`` when ``mean`` is None."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return MISSING
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_stat(stat: Stat, digits: int, n_row: int | None = None) -> str:
    """:func:`fmt` of a :class:`Stat`, followed by ``(n = k)`` when its k values are not the row's ``n_row``."""
    text = fmt(stat.mean, stat.std, digits)
    if n_row is not None and stat.n not in (0, n_row):
        text += f" (n = {stat.n})"
    return text


def add_stat(row: dict, disp: dict, key: str, title: str, values: Iterable[Any], digits: int) -> Stat:
    """Aggregate ``values`` into ``row[key_mean]``, ``row[key_std]`` (the CSV) and ``disp[title]`` (the display);
    the display cell names its own n when it differs from ``disp['n']`` (set by the caller)."""
    s = mean_std(values)
    row[f"{key}_mean"], row[f"{key}_std"] = s.mean, s.std
    disp[title] = fmt_stat(s, digits, disp.get("n"))
    return s


def spread_note(over: str = "training seeds", of: str = "row") -> str:
    """The caption sentence that says what a table's ± is (``of``: "row", or "column" for transposed layouts)."""
    return (f"Cells: mean ± std over the n {over} of each {of} (sample std, ddof = 1); where n = 1 the single value "
            "is shown without ±")


def group_key(rec: Mapping[str, Any]) -> tuple:
    return tuple(rec.get(k) for k in GROUP_KEYS)


def grouped(records: Iterable[Mapping[str, Any]]) -> dict[tuple, list[Mapping[str, Any]]]:
    """Records by their (dataset, depth, method), in first-seen order."""
    out: dict[tuple, list] = {}
    for r in records:
        out.setdefault(group_key(r), []).append(r)
    return out


def key_cols(key: tuple) -> dict:
    """The non-None (dataset, depth, method) of a group key, as columns."""
    return {k: v for k, v in zip(GROUP_KEYS, key) if v is not None}


__all__ = ["DDOF", "GROUP_KEYS", "MISSING", "Stat", "mean_std", "fmt", "fmt_stat", "add_stat", "spread_note",
           "group_key", "grouped", "key_cols"]
