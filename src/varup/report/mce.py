"""ImageNet-C's corruption error: the arithmetic of Table 3's mCE, formed by the report from the runs' error tables.

For a model and a reference model (experiments.ood.corruptions.reference: the baseline of the same dataset, depth and
training seed by default), with E_c,s the error on corruption c at severity s (:mod:`varup.studies.corruptions`: the
teacher-forced token error), CE_c = sum_s E_c,s(model) / sum_s E_c,s(reference) and mCE = the mean of CE_c over the
corruptions, both in percent, so the reference's own mCE is 100 (Hendrycks & Dietterich 2019 use AlexNet as theirs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from varup.base.utils import read_json


def corruption_errors(path: Path, names: Sequence[str], severities: Sequence[int],
                      error: str = "token_error") -> tuple[np.ndarray, dict]:
    """(corruption x severity) errors (``error``: token_error or nll_per_token) of one run's corruptions.json, and the
    file's record. A missing (corruption, severity) raises ValueError naming it."""
    rec = read_json(path)
    got = {(s["corruption"], int(s["severity"])): s[error] for s in rec["sets"]}
    missing = [f"{n}/{v}" for n in names for v in severities if (n, v) not in got]
    if missing:
        raise ValueError(f"{path} has no {error} for {', '.join(missing[:4])} (experiments.ood.corruptions): "
                         f"re-run the corrupt_data, encode_corrupt and corruption_eval rules")
    return np.array([[got[(n, v)] for v in severities] for n in names]), rec


def mce(model_errors, reference_errors, corruptions: Sequence[str] | None = None) -> dict:
    """CE_c and mCE (percent) from two (C, S) arrays of errors (corruption x severity, same order).

    CE_c = 100 * sum_s model[c, s] / sum_s reference[c, s]; mCE = mean_c CE_c. Returns {"ce": [C floats], "mce"}.
    Raises ValueError for different shapes, non-finite or negative errors, or a corruption on which the reference
    makes no error at all (CE undefined), naming it when ``corruptions`` names the rows."""
    m = np.asarray(model_errors, np.float64)
    r = np.asarray(reference_errors, np.float64)
    if m.ndim != 2 or m.shape != r.shape or m.size == 0:
        raise ValueError(f"mce: model and reference errors must be non-empty (corruptions, severities) arrays of the "
                         f"same shape, got {m.shape} and {r.shape}")
    if not (np.isfinite(m).all() and np.isfinite(r).all()) or (m < 0).any() or (r < 0).any():
        raise ValueError("mce: errors must be finite and >= 0")
    den = r.sum(1)
    if (den <= 0).any():
        c = int(np.flatnonzero(den <= 0)[0])
        name = corruptions[c] if corruptions is not None else f"row {c}"
        raise ValueError(f"mce: the reference model makes no error on corruption {name} at any severity, so its "
                         f"corruption error is undefined")
    ce = 100.0 * m.sum(1) / den
    return {"ce": ce.tolist(), "mce": float(ce.mean())}
