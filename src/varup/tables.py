"""Every table, from the runs' ``metrics.json`` and ``train/summary.json``: CSV + Markdown + LaTeX each.

* ``table2`` — the paper's Table 2 layout: dataset x depth x method, FID / IS / KID / precision / recall / clean-FID,
  mean ± std over seeds (IS says "unavailable: <reason>" when only FID-only Inception weights could be had).
* ``table7`` — the paper's Table 7 (diversity): mean pairwise SSIM, SSIM diversity, precision, recall, F1, density,
  coverage.
* ``codebook_calibration`` — codebook utilisation (active codes and perplexity, real vs generated) and token
  calibration (ECE, NLL, accuracy) on held-out token maps.
* ``overhead`` — the paper's Table 5 layout from our own training logs: parameters, batch, peak memory, time per
  step / epoch, throughput, and the regulariser's overhead relative to the baseline.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from varup.config import Run, runs
from varup.utils import atomic_write_text, read_json

log = logging.getLogger("varup.tables")


def _mean_std(xs: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    v = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None, 0
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0), len(v)


def _fmt(m: float | None, s: float | None, digits: int) -> str:
    if m is None:
        return "—"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


def _groups(cfg: dict) -> dict[tuple[str, int, str], list[Run]]:
    out: dict[tuple[str, int, str], list[Run]] = {}
    for r in runs(cfg):
        out.setdefault((r.dataset, r.depth, r.method), []).append(r)
    return out


def _load(results: Path, runs_: list[Run], name: str) -> list[dict]:
    return [read_json(results / r.path / name) for r in runs_]


def write_table(df: pd.DataFrame, out_dir: str | Path, name: str, caption: str, display: pd.DataFrame | None = None) -> None:
    """``name.csv`` (full precision, machine-readable), ``name.md`` and ``name.tex`` (formatted ``display``)."""
    out = Path(out_dir)
    disp = df if display is None else display
    atomic_write_text(out / f"{name}.csv", df.to_csv(index=False))
    md = f"**{caption}**\n\n" + disp.to_markdown(index=False) + "\n"
    atomic_write_text(out / f"{name}.md", md)
    tex = disp.to_latex(index=False, caption=caption, label=f"tab:{name}", escape=True)
    atomic_write_text(out / f"{name}.tex", tex)


def _metric_table(cfg: dict, results: Path, columns: list[tuple[str, str, Callable[[dict], float | None], int]],
                  source: str = "metrics.json") -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, disp = [], []
    for (dataset, depth, method), rs in _groups(cfg).items():
        ms = _load(results, rs, source)
        row = {"dataset": dataset, "depth": depth, "method": method, "seeds": len(rs)}
        d = {"dataset": dataset, "depth": f"d{depth}", "method": method, "seeds": len(rs)}
        for key, title, get, digits in columns:
            m, s, n = _mean_std(get(x) for x in ms)
            row[f"{key}_mean"], row[f"{key}_std"] = m, s
            d[title] = _fmt(m, s, digits)
        rows.append(row)
        disp.append(d)
    return pd.DataFrame(rows), pd.DataFrame(disp)


def table2(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    cols = [
        ("fid", "FID ↓", lambda m: m["fidelity"]["fid"], 2),
        ("is", "IS ↑", lambda m: m["fidelity"].get("isc_mean"), 2),
        ("kid", "KID ↓", lambda m: m["fidelity"]["kid_mean"], 4),
        ("precision", "Precision ↑", lambda m: m["fidelity"]["precision"], 3),
        ("recall", "Recall ↑", lambda m: m["fidelity"]["recall"], 3),
        ("clean_fid", "clean-FID ↓", lambda m: m.get("clean_fid", {}).get("value"), 2),
    ]
    df, disp = _metric_table(cfg, results, cols)
    first = _load(results, [next(iter(runs(cfg)))], "metrics.json")[0]
    reason = first["inception"].get("isc_unavailable_reason")
    if df["is_mean"].isna().all() and reason:
        disp["IS ↑"] = f"IS unavailable: {reason}"
    df["inception_source"] = first["inception"]["source"]
    caption = ("Table 2 layout: generation quality per dataset, depth and method (mean ± std over seeds). "
               f"Inception weights: {first['inception']['source']}.")
    write_table(df, out, "table2", caption, disp)
    return df


def table7(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    f = lambda k: (lambda m: m["fidelity"].get(k))  # noqa: E731
    cols = [
        ("mean_pairwise_ssim", "Mean pairwise SSIM ↓", lambda m: m["ssim"]["mean"], 3),
        ("ssim_diversity", "SSIM diversity ↑", lambda m: m["ssim"]["ssim_diversity"], 3),
        ("precision", "Precision", f("precision"), 3),
        ("recall", "Recall", f("recall"), 3),
        ("f1", "F1", f("f_score"), 3),
        ("density", "Density", f("prdc_density"), 3),
        ("coverage", "Coverage", f("prdc_coverage"), 3),
    ]
    df, disp = _metric_table(cfg, results, cols)
    write_table(df, out, "table7", "Table 7 layout: diversity metrics (mean ± std over seeds).", disp)
    return df


def codebook_calibration(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    def per_scale(m, which, key):
        return [s[key] for s in m["codebook"][which]["per_scale"]]

    rows, disp = [], []
    for (dataset, depth, method), rs in _groups(cfg).items():
        ms = _load(results, rs, "metrics.json")
        act_gen = np.mean([per_scale(m, "generated", "active_codes") for m in ms], axis=0)
        act_real = per_scale(ms[0], "real", "active_codes")
        ppl_gen = np.mean([per_scale(m, "generated", "perplexity") for m in ms], axis=0)
        ppl_real = per_scale(ms[0], "real", "perplexity")
        ece = _mean_std(m["calibration"]["ece"] for m in ms)
        nll = _mean_std(m["calibration"]["nll"] for m in ms)
        acc = _mean_std(m["calibration"]["accuracy"] for m in ms)
        rows.append({"dataset": dataset, "depth": depth, "method": method, "seeds": len(rs),
                     "active_codes_generated": json.dumps([round(float(x), 1) for x in act_gen]),
                     "active_codes_real": json.dumps([int(x) for x in act_real]),
                     "perplexity_generated": json.dumps([round(float(x), 2) for x in ppl_gen]),
                     "perplexity_real": json.dumps([round(float(x), 2) for x in ppl_real]),
                     "active_total_generated": float(np.mean([m["codebook"]["generated"]["overall"]["active_codes"] for m in ms])),
                     "active_total_real": ms[0]["codebook"]["real"]["overall"]["active_codes"],
                     "ece_mean": ece[0], "ece_std": ece[1], "nll_mean": nll[0], "nll_std": nll[1],
                     "token_acc_mean": acc[0], "token_acc_std": acc[1]})
        disp.append({"dataset": dataset, "depth": f"d{depth}", "method": method,
                     "active codes gen / real (all scales)": f"{rows[-1]['active_total_generated']:.0f} / {rows[-1]['active_total_real']}",
                     "perplexity gen / real (last scale)": f"{ppl_gen[-1]:.1f} / {ppl_real[-1]:.1f}",
                     "ECE ↓": _fmt(ece[0], ece[1], 4), "NLL ↓": _fmt(nll[0], nll[1], 3), "token acc": _fmt(acc[0], acc[1], 3)})
    df = pd.DataFrame(rows)
    write_table(df, out, "codebook_calibration",
                "Codebook utilisation (distinct codes used and perplexity; generated samples vs as many held-out real images) "
                "and token calibration on held-out token maps (mean ± std over seeds).", pd.DataFrame(disp))
    return df


def overhead(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    rows, disp = [], []
    base_step: dict[tuple[str, int], float] = {}
    groups = _groups(cfg)
    for (dataset, depth, method), rs in groups.items():
        ss = _load(results, rs, "train/summary.json")
        step = _mean_std(s["s_per_step"] for s in ss)[0]
        if method == "baseline":
            base_step[(dataset, depth)] = step
    for (dataset, depth, method), rs in groups.items():
        ss = _load(results, rs, "train/summary.json")
        step = _mean_std(s["s_per_step"] for s in ss)
        mem = _mean_std(s["peak_mem_mb_per_device"] for s in ss)
        epoch = _mean_std(s["epoch_s"] for s in ss)
        ips = _mean_std(s["imgs_per_s"] for s in ss)
        b = base_step.get((dataset, depth))
        ratio = step[0] / b if b and step[0] else None
        rows.append({"dataset": dataset, "depth": depth, "method": method, "params_m": ss[0]["params_m"],
                     "global_batch": ss[0]["global_batch"], "device": ss[0]["device"], "precision": ss[0]["precision"],
                     "peak_mem_mb": mem[0], "s_per_step": step[0], "s_per_step_std": step[1], "epoch_s": epoch[0],
                     "time_200_epochs_h": epoch[0] * 200 / 3600 if epoch[0] else None, "imgs_per_s": ips[0],
                     "step_time_vs_baseline": ratio})
        disp.append({"dataset": dataset, "depth": f"d{depth}", "method": method, "params (M)": f"{ss[0]['params_m']:.2f}",
                     "batch": ss[0]["global_batch"], "device": ss[0]["device"], "peak memory (MB)": f"{mem[0]:.0f}",
                     "s / step": _fmt(step[0], step[1], 4), "time / 200 ep. (h)": f"{epoch[0] * 200 / 3600:.3f}",
                     "step time vs baseline": f"{ratio:.3f}" if ratio else "—"})
    df = pd.DataFrame(rows)
    write_table(df, out, "overhead", "Table 5 layout: training cost measured by the training jobs themselves "
                "(peak memory is the process peak RSS on CPU, allocated GPU memory on CUDA).", pd.DataFrame(disp))
    return df


def make_tables(cfg: dict, results: str | Path, out: str | Path) -> None:
    results, out = Path(results), Path(out)
    for fn in (table2, table7, codebook_calibration, overhead):
        df = fn(cfg, results, out)
        log.info("%s: %d rows", fn.__name__, len(df))
