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


def droppath_table(records: Sequence[Mapping[str, Any]]):
    """(table, display): one row per (dataset, depth, method, rate); mean σ and (where filled) FID / KID / IS, mean ±
    std over the records (training seeds; :mod:`varup.report.tablefmt`)."""
    import pandas as pd

    rows, disp = [], []
    for key, rs in grouped(records).items():
        rates = sorted({e["rate"] for r in rs for e in r["rates"]})
        for rate in rates:
            es = [e for r in rs for e in r["rates"] if e["rate"] == rate]
            row = {**key_cols(key), "rate": rate, "seeds": len(es)}
            d = {**key_cols(key), "DropPath rate": f"{rate:g}", "n": len(es)}
            add_stat(row, d, "sigma", "σ", (e["mean_sigma"] for e in es), 4)
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
    for key, rs in grouped(records).items():
        row = {**key_cols(key), "seeds": len(rs)}
        d = {**key_cols(key), "n": len(rs)}
        add_stat(row, d, "sigma", "σ (all)", (r["mean_sigma"] for r in rs), 4)
        avail = [r for r in rs if r.get("region", {}).get("available")]
        if avail:
            reg = [r["region"] for r in avail]
            add_stat(row, d, "sigma_object", "σ object", (g["inside"] for g in reg), 4)
            add_stat(row, d, "sigma_background", "σ background", (g["outside"] for g in reg), 4)
            diff = (None if g["inside"] is None or g["outside"] is None else g["outside"] - g["inside"] for g in reg)
            add_stat(row, d, "sigma_bg_minus_object", "σ background − object", diff, 4)
            ious = [g.get("segmentation_check", {}).get("mean_iou") for g in reg]
            ious = [x for x in ious if x is not None]
            row["segmentation_mean_iou"] = float(np.mean(ious)) if ious else None
            d["segmentation IoU (real val)"] = f"{row['segmentation_mean_iou']:.3f}" if ious else "—"
        else:
            reason = next((r.get("region", {}).get("reason") for r in rs), None) or "no region σ"
            row["region_unavailable_reason"] = reason
            d["σ object"] = d["σ background"] = f"absent: {reason}"
        rows.append(row)
        disp.append(d)
    return pd.DataFrame(rows), pd.DataFrame(disp)


def entanglement_table(records: Sequence[Mapping[str, Any]]):
    """(table, display): one row per (dataset, depth, method, number of mixed classes); per record the mixes with
    that many classes are averaged first, then mean ± std over the records (training seeds; :mod:`varup.report.tablefmt`)."""
    import pandas as pd

    rows, disp = [], []
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
            add_stat(row, d, "sigma", "σ", (avg(es, lambda e: e["mean_sigma"]) for es in per), 4)
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
    rate = float(np.asarray(data[methods[0]]["rate"]))
    T = int(np.asarray(data[methods[0]]["T"]))
    fig.suptitle(f"MC-Dropout (DropPath {rate:g}, T = {T}): mean, sample and pixel-wise σ (shared scale)", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="σ")
    save_figure(fig, out_dir, name)
    return vmax


def sweep_figure(records: Sequence[Mapping[str, Any]], out_dir, name: str = "droppath_sweep") -> None:
    """PNG + PDF: σ, FID and KID vs DropPath rate per (dataset, depth, method), mean ± std over the records.
    Panels without any filled ``fidelity`` say so."""
    import matplotlib.pyplot as plt

    from varup.base.plotting import save_figure  # selects the Agg backend (files only) before any figure

    table, _ = droppath_table(records)
    panels = [("sigma", "mean σ"), ("fid", "FID ↓"), ("kid", "KID ↓")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    group_cols = [k for k in GROUP_KEYS if k in table.columns]
    for ax, (key, title) in zip(axes, panels):
        any_data = False
        for gkey, g in table.groupby(group_cols, sort=False, dropna=False) if group_cols else [((), table)]:
            g = g.sort_values("rate")
            m = g[f"{key}_mean"].astype(float)
            if m.isna().all():
                continue
            any_data = True
            s = g[f"{key}_std"].astype(float).fillna(0)
            kv = dict(zip(group_cols, gkey if isinstance(gkey, tuple) else (gkey,)))
            label = " ".join(f"d{v}" if k == "depth" else str(v) for k, v in kv.items())
            ax.errorbar(g["rate"], m, yerr=s, marker="o", capsize=3, label=label)
        ax.set_xlabel("DropPath rate")
        ax.set_title(title, fontsize=10)
        if any_data:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("MC-Dropout: fidelity–confidence trade-off, baseline vs ours", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_dir, name)
