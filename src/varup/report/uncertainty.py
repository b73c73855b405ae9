"""The companion MC-Dropout study's tables (DropPath sweep, region σ, class entanglement) and figures (σ maps,
the sweep), made from the study's result files only."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from varup.report.tablefmt import GROUP_KEYS, add_stat, grouped, key_cols

log = logging.getLogger("varup.report")



# ------------------------------------------------------------------------------------------- tables
def _fid(entry: Mapping[str, Any], name: str) -> float | None:
    f = entry.get("fidelity") or {}
    return f.get(name) if isinstance(f, Mapping) else None


_FID_COLS = (("fid", "FID ↓", "fid", 2), ("kid", "KID ↓", "kid_mean", 4), ("is", "IS ↑", "isc_mean", 2))
# σ readings (uncertainty.sigma_reading): record key suffix, CSV key suffix, display label
READINGS = (("", "", "dropout"), ("_samples", "_samples", "samples"))
SIGMA_NOTE = ("σ (dropout): the T passes share one sampling noise, so only the DropPath masks vary (0 at rate 0); "
              "σ (samples): every pass also draws its own sampling noise, the sample-to-sample spread "
              "(uncertainty.sigma_reading). The study's σ (0.19–0.23: at rate 0.05 already 84 % of its value at 0.3) "
              "behaves like the samples reading, which is nearly flat in the rate; the dropout reading starts near 0 "
              "and grows with the rate (a reduced toy run: README, MC-Dropout).")


def readings_in(entries: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """The σ readings some entry carries (``mean_sigma``: dropout, ``mean_sigma_samples``: samples)."""
    return [r for r in READINGS if any(e.get(f"mean_sigma{r[0]}") is not None for e in entries)] or [READINGS[0]]


def _add_sigmas(row: dict, d: dict, es: Sequence[Mapping[str, Any]], readings, get=None, title: str = "σ") -> None:
    """σ columns per reading: CSV ``sigma`` / ``sigma_samples``, display "σ (dropout)" / "σ (samples)"."""
    for rk, ck, label in readings:
        values = (e.get(f"mean_sigma{rk}") for e in es) if get is None else (get(e, rk) for e in es)
        add_stat(row, d, f"sigma{ck}", f"{title} ({label})", values, 4)


def droppath_table(records: Sequence[Mapping[str, Any]]):
    """(table, display): one row per (dataset, depth, method, rate); mean σ and (where filled) FID / KID / IS, mean ±
    std over the records (training seeds; :mod:`varup.report.tablefmt`)."""
    import pandas as pd

    rows, disp = [], []
    readings = readings_in([e for r in records for e in r["rates"]])
    for key, rs in grouped(records).items():
        rates = sorted({e["rate"] for r in rs for e in r["rates"]})
        for rate in rates:
            es = [e for r in rs for e in r["rates"] if e["rate"] == rate]
            row = {**key_cols(key), "rate": rate, "seeds": len(es)}
            d = {**key_cols(key), "DropPath rate": f"{rate:g}", "n": len(es)}
            _add_sigmas(row, d, es, readings)
            for k, title, name, digits in _FID_COLS:
                add_stat(row, d, k, title, (_fid(e, name) for e in es), digits)
            rows.append(row)
            disp.append(d)
    return pd.DataFrame(rows), pd.DataFrame(disp)


def region_table(records: Sequence[Mapping[str, Any]]):
    """(table, display): one row per (dataset, depth, method): mean σ, σ inside / outside the object and outside
    minus inside, mean ± std over the records (training seeds; :mod:`varup.report.tablefmt`); datasets without masks show
    the reason."""
    import pandas as pd

    rows, disp = [], []
    readings = readings_in(records)
    for key, rs in grouped(records).items():
        row = {**key_cols(key), "seeds": len(rs)}
        d = {**key_cols(key), "n": len(rs)}
        _add_sigmas(row, d, rs, readings, title="σ all")
        avail = [r for r in rs if r.get("region", {}).get("available")]
        if avail:
            reg = [r["region"] for r in avail]
            for rk, ck, label in readings:
                _region_cols(row, d, reg, rk, ck, label)
            ious = [g.get("segmentation_check", {}).get("mean_iou") for g in reg]
            ious = [x for x in ious if x is not None]
            row["segmentation_mean_iou"] = float(np.mean(ious)) if ious else None
            d["segmentation IoU (real val)"] = f"{row['segmentation_mean_iou']:.3f}" if ious else "—"
        else:
            reason = next((r.get("region", {}).get("reason") for r in rs), None) or "no region σ"
            row["region_unavailable_reason"] = reason
            for *_, label in readings:
                d[f"σ object ({label})"] = d[f"σ background ({label})"] = f"absent: {reason}"
        rows.append(row)
        disp.append(d)
    return pd.DataFrame(rows), pd.DataFrame(disp)


def _region_cols(row: dict, d: dict, reg: Sequence[Mapping[str, Any]], rk: str, ck: str, label: str) -> None:
    """σ inside / outside the object and their difference under one σ reading."""
    ins, outs = [g.get(f"inside{rk}") for g in reg], [g.get(f"outside{rk}") for g in reg]
    add_stat(row, d, f"sigma_object{ck}", f"σ object ({label})", ins, 4)
    add_stat(row, d, f"sigma_background{ck}", f"σ background ({label})", outs, 4)
    diff = (None if i is None or o is None else o - i for i, o in zip(ins, outs))
    add_stat(row, d, f"sigma_bg_minus_object{ck}", f"σ background − object ({label})", diff, 4)


def entanglement_table(records: Sequence[Mapping[str, Any]]):
    """(table, display): one row per (dataset, depth, method, number of mixed classes); per record the mixes with
    that many classes are averaged first, then mean ± std over the records (training seeds; :mod:`varup.report.tablefmt`)."""
    import pandas as pd

    rows, disp = [], []
    readings = readings_in([e for r in records for e in r["mixes"]])
    for key, rs in grouped(records).items():
        for k in sorted({e["n_concepts"] for r in rs for e in r["mixes"]}):
            per = [[e for e in r["mixes"] if e["n_concepts"] == k] for r in rs]
            per = [es for es in per if es]

            def avg(es, get):
                v = [get(e) for e in es]
                v = [x for x in v if x is not None]
                return float(np.mean(v)) if v else None

            row = {**key_cols(key), "concepts": k, "mixes": sorted({tuple(e["mix"]) for es in per for e in es}),
                   "seeds": len(per)}
            d = {**key_cols(key), "concepts": k, "n": len(per)}
            _add_sigmas(row, d, per, readings, get=lambda es, rk: avg(es, lambda e: e.get(f"mean_sigma{rk}")))
            for col, title, name, digits in _FID_COLS:
                add_stat(row, d, col, title, (avg(es, lambda e, n=name: _fid(e, n)) for es in per), digits)
            row["mixes"] = ";".join("-".join(map(str, m)) for m in row["mixes"])
            rows.append(row)
            disp.append(d)
    return pd.DataFrame(rows), pd.DataFrame(disp)


# ------------------------------------------------------------------------------------------- figures
def _load_npz(src) -> dict:
    if isinstance(src, Mapping):
        return dict(src)
    with np.load(src) as z:
        return {k: z[k] for k in z.files}


def sigma_figure(npz_by_method: Mapping[str, Any], out_dir, name: str = "mc_dropout_sigma", *,
                 pairs: Sequence[tuple[int, int]] | None = None, max_pairs: int = 4,
                 class_names: Sequence[str] | None = None, vmax: float | None = None) -> float:
    """PNG + PDF: one row per (class, seed) pair; per method the mean image over the passes, the ordinary sample
    (DropPath off, same sampling seed) and the σ map (the segmented object outlined in cyan where there is one), on
    ONE colour scale shared by all methods (0 .. ``vmax``, default the largest σ shown), with a colourbar.
    ``npz_by_method``: method -> a :func:`run_mc_dropout` NPZ path (or its loaded dict). Pairs are matched by
    (class, seed); ``pairs`` picks (class, seed) pairs, default the first ``max_pairs`` shared by all methods.
    Returns the vmax used."""
    import matplotlib.pyplot as plt

    from varup.base.plotting import save_figure  # selects the Agg backend (files only) before any figure

    data = {m: _load_npz(p) for m, p in npz_by_method.items()}
    methods = list(data)
    keys = [list(zip(d["classes"].tolist(), d["seeds"].tolist())) for d in data.values()]
    shared = [k for k in keys[0] if all(k in ks for ks in keys[1:])]
    if pairs is None:
        pairs = shared[:max_pairs]
    pairs = [(int(c), int(s)) for c, s in pairs]
    missing = [p for p in pairs if p not in shared]
    if missing or not pairs:
        raise ValueError(f"(class, seed) pairs {missing or '[]'} are not in every method's file (shared: {shared})")
    idx = {m: {k: i for i, k in enumerate(ks)} for m, ks in zip(methods, keys)}
    if vmax is None:
        vmax = max(float(data[m]["sigma"][idx[m][k]].max()) for m in methods for k in pairs) or 1e-6
    cols = 3 * len(methods)
    fig, axes = plt.subplots(len(pairs), cols, figsize=(1.6 * cols + 0.8, 1.7 * len(pairs) + 0.5), squeeze=False)
    im = None
    for r, (c, s) in enumerate(pairs):
        for j, m in enumerate(methods):
            d, i = data[m], idx[m][(c, s)]
            panels = [(np.clip(d["mean"][i], 0, 1), "mean"), (np.clip(d["sample"][i], 0, 1), "sample"),
                      (d["sigma"][i], "σ")]
            for k, (img, title) in enumerate(panels):
                ax = axes[r][3 * j + k]
                if title == "σ":
                    im = ax.imshow(img, cmap="magma", vmin=0, vmax=vmax)
                    if "mask" in d and d["mask"][i].any() and not d["mask"][i].all():  # the segmented object
                        ax.contour(d["mask"][i].astype(float), levels=[0.5], colors="cyan", linewidths=0.6)
                else:
                    ax.imshow(img)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{m}: {title}", fontsize=8)
            if j == 0:
                cname = class_names[c] if class_names is not None else f"class {c}"
                axes[r][0].set_ylabel(f"{cname}\nseed {s}", fontsize=8)
    d0 = data[methods[0]]
    rate, T = float(np.asarray(d0["rate"])), int(np.asarray(d0["T"]))
    how = f", σ reading {d0['reading']}, masks {d0['droppath_masks']}" if "reading" in d0 else ""
    fig.suptitle(f"MC-Dropout (DropPath {rate:g}, T = {T}{how}): mean, sample and pixel-wise σ (shared scale)",
                 fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="σ")
    save_figure(fig, out_dir, name)
    return vmax


def sweep_figure(records: Sequence[Mapping[str, Any]], out_dir, name: str = "droppath_sweep") -> None:
    """PNG + PDF: σ (each reading: dropout solid, samples dashed), FID and KID vs DropPath rate per (dataset, depth,
    method), mean ± std over the records. Panels without any filled ``fidelity`` say so."""
    import matplotlib.pyplot as plt

    from varup.base.plotting import save_figure  # selects the Agg backend (files only) before any figure

    table, _ = droppath_table(records)
    panels = [("sigma", "mean σ"), ("fid", "FID ↓"), ("kid", "KID ↓")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    group_cols = [k for k in GROUP_KEYS if k in table.columns]
    for ax, (key, title) in zip(axes, panels):
        any_data = False
        cols = [(c, sfx) for c, sfx in ((key, ""), (f"{key}_samples", " (samples)")) if f"{c}_mean" in table]
        for gkey, g in table.groupby(group_cols, sort=False, dropna=False) if group_cols else [((), table)]:
            g = g.sort_values("rate")
            kv = dict(zip(group_cols, gkey if isinstance(gkey, tuple) else (gkey,)))
            label = " ".join(f"d{v}" if k == "depth" else str(v) for k, v in kv.items())
            for col, sfx in cols:
                m = g[f"{col}_mean"].astype(float)
                if m.isna().all():
                    continue
                any_data = True
                s = g[f"{col}_std"].astype(float).fillna(0)
                ax.errorbar(g["rate"], m, yerr=s, marker="o", capsize=3, label=label + sfx, ls="--" if sfx else "-")
        ax.set_xlabel("DropPath rate")
        ax.set_title(title, fontsize=10)
        if any_data:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("MC-Dropout: fidelity–confidence trade-off, baseline vs ours", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_dir, name)
