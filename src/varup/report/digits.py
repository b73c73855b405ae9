"""The digits rehearsal's table (target ``digits``; config/digits.yaml): per (dataset, depth, method) the digit
classifier's class error on the samples and the Inception FID / KID / precision / recall against the held-out digits,
mean ± std over the training seeds; then per dataset the real-vs-real floor row and a chance row.

Reads only result files: each run's ``digit_scores.json`` (:func:`varup.metrics.digits.run_digit_scores`) and
``metrics.json`` (rule evaluate), and per dataset ``digits_floor.json`` and ``digit_classifier.json``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from varup.base.utils import read_json
from varup.config.plan import Run, main_runs
from varup.report.tablefmt import add_stat, spread_note
from varup.report.tables import write_table

TABLE = "digits"
FLOOR_METHOD = "real vs real (floor)"
CHANCE_METHOD = "chance (uniform guess)"


def _get(section: str, key: str):
    return lambda rec: (rec.get(section) or {}).get(key)


COLUMNS = [("class_error", "class error ↓", _get("digits", "class_error"), 3),
           ("fid", "FID ↓", _get("fidelity", "fid"), 2),
           ("kid", "KID ↓", _get("fidelity", "kid_mean"), 4),
           ("precision", "precision ↑", _get("fidelity", "precision"), 3),
           ("recall", "recall ↑", _get("fidelity", "recall"), 3)]


def digits_runs(cfg: dict) -> list[Run]:
    """The runs of the datasets of kind ``digits``."""
    return [r for r in main_runs(cfg) if cfg["datasets"][r.dataset]["kind"] == "digits"]


def _row(dataset: str, depth, method: str, recs: list[dict]) -> tuple[dict, dict]:
    row = {"dataset": dataset, "depth": depth, "method": method, "n": len(recs)}
    disp = {"dataset": dataset, "depth": f"d{depth}" if depth is not None else "—", "method": method, "n": len(recs)}
    for key, title, get, digits in COLUMNS:
        add_stat(row, disp, key, title, (get(r) for r in recs), digits)
    return row, disp


def _caption(floors: dict[str, dict], classifiers: dict[str, dict], n_samples: dict[str, int]) -> str:
    parts = []
    for d, f in floors.items():
        c = classifiers[d]
        parts.append(f"{d}: the classifier's held-out accuracy {c['val_accuracy']:.3f} on {c['n_val']} val digits "
                     f"(trained on {c['n_train']} train digits); {n_samples.get(d, 0)} samples per run; floor "
                     f"{f['floor_set']['n']} {f['floor_set']['split']} digits vs the {f['reference']['n']} "
                     f"{f['reference']['split']} digits of the reference")
    return ("The digits rehearsal (scikit-learn's handwritten digits through the folder dataset path): class error = "
            "share of a run's samples that a digit classifier (logistic regression on the 8 x 8 block means, "
            "trained on the real training split only) reads as another digit than the one the sample was "
            "conditioned on (chance 0.9 with 10 classes); FID, KID, precision and recall = Inception metrics against "
            "the held-out digits (rule evaluate, as in Table 2). The floor row: FID/KID/precision/recall of a "
            "class-balanced real set of the sample size from the train split, disjoint from the reference, scored "
            "the same way (what a generator of the true distribution gets at this sample size); its class error is "
            "the classifier's error on the real held-out reference digits. " + "; ".join(parts)
            + f". {spread_note()}.")


def digits_table(cfg: dict, results: str | Path, out: str | Path) -> pd.DataFrame:
    """Write ``tables/digits.{csv,md,tex,html}`` (module docstring) and return the CSV's frame."""
    results = Path(results)
    groups: dict[tuple[str, int, str], list[Run]] = {}
    for r in digits_runs(cfg):
        groups.setdefault((r.dataset, r.depth, r.method), []).append(r)
    if not groups:
        raise ValueError("no dataset of kind 'digits' in the config: the digits table has no rows "
                         "(use config/digits.yaml)")
    rows, n_samples = [], {}
    for (dataset, depth, method), rs in groups.items():
        recs = [{"digits": read_json(results / r.path / "digit_scores.json"),
                 "fidelity": read_json(results / r.path / "metrics.json")["fidelity"]} for r in rs]
        n_samples[dataset] = recs[0]["digits"]["n"]
        rows.append(_row(dataset, depth, method, recs))
    datasets = list(dict.fromkeys(d for d, _, _ in groups))
    floors = {d: read_json(results / d / "digits_floor.json") for d in datasets}
    classifiers = {d: read_json(results / d / "digit_classifier.json") for d in datasets}
    for d, f in floors.items():
        rows.append(_row(d, None, FLOOR_METHOD, [{"digits": f["heldout"], "fidelity": f["inception"]}]))
        rows.append(_row(d, None, CHANCE_METHOD, [{"digits": {"class_error": f["heldout"]["chance"]}}]))
    df = pd.DataFrame([r for r, _ in rows])
    df["classifier_val_accuracy"] = [classifiers[r["dataset"]]["val_accuracy"] for r, _ in rows]
    write_table(df, out, TABLE, _caption(floors, classifiers, n_samples), pd.DataFrame([d for _, d in rows]))
    return df


__all__ = ["TABLE", "FLOOR_METHOD", "CHANCE_METHOD", "COLUMNS", "digits_runs", "digits_table"]
