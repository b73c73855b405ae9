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

from varup.config import (Run, cfg_sweep, grid_points, main_runs, mode_runs, ood_runs, uncertainty_enabled,
                          uncertainty_runs)
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


def _groups(cfg: dict, runs_=None) -> dict[tuple[str, int, str], list[Run]]:
    out: dict[tuple[str, int, str], list[Run]] = {}
    for r in (main_runs(cfg) if runs_ is None else runs_):
        out.setdefault((r.dataset, r.depth, r.method), []).append(r)
    return out


def paper_results() -> dict:
    """The paper's reported numbers (src/varup/data/paper_results.json)."""
    return json.loads((Path(__file__).parent / "data" / "paper_results.json").read_text())


def _paper_key(cfg: dict, dataset: str) -> str | None:
    """Which of the paper's datasets a configured dataset reproduces (by kind)."""
    kind = cfg["datasets"][dataset]["kind"]
    return {"afhq": "afhq", "imagenet100": "imagenet100"}.get(kind)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


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
    paper = {(r["depth"], r["method"]): r for r in paper_results()["table2"]}
    pf, pi = [], []
    for _, row in df.iterrows():
        key = _paper_key(cfg, row["dataset"])
        p = paper.get((row["depth"], row["method"])) if key else None
        pf.append(p[f"{key}_fid"] if p else None)
        pi.append(p[f"{key}_is"] if p else None)
    df["paper_fid"], df["paper_is"] = pf, pi
    df["fid_minus_paper"] = [_diff(a, b) for a, b in zip(df["fid_mean"], pf)]
    disp["FID (paper)"] = [f"{v:.2f}" if v is not None else "—" for v in pf]
    disp["Δ FID"] = [f"{v:+.2f}" if v is not None else "—" for v in df["fid_minus_paper"]]
    disp["IS (paper)"] = [f"{v:.2f}" if v is not None else "—" for v in pi]
    first = _load(results, [next(iter(main_runs(cfg)))], "metrics.json")[0]
    reason = first["inception"].get("isc_unavailable_reason")
    is_note = ""
    if df["is_mean"].isna().all() and reason:
        disp["IS ↑"] = "unavailable"
        is_note = f" IS unavailable: {reason}."
    df["inception_source"] = first["inception"]["source"]
    caption = ("Table 2 layout: generation quality per dataset, depth and method (mean ± std over seeds). "
               f"Inception weights: {first['inception']['source']}.{is_note}")
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
    paper = paper_results()["table7"]
    # the paper's layout: one row per metric, our runs as columns, the paper's value and our 'ours' difference
    rows = []
    for key, title, _, digits in cols:
        r = {"metric": title.replace(" ↓", "").replace(" ↑", ""), "paper (ours)": paper.get(key)}
        for _, row in df.iterrows():
            name = f"{row['dataset']} d{row['depth']} {row['method']}"
            r[name] = _fmt(row[f"{key}_mean"], row[f"{key}_std"], digits)
            if row["method"] == "ours":
                d = _diff(row[f"{key}_mean"], paper.get(key))
                r[f"Δ {name} − paper"] = f"{d:+.3f}" if d is not None else "—"
        rows.append(r)
    df["paper_ours_json"] = json.dumps(paper)
    write_table(df, out, "table7", "Table 7 layout: diversity metrics (mean ± std over seeds), beside the paper's "
                "values for its method (the paper does not say which dataset or depth).", pd.DataFrame(rows))
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
    p5 = {r["method"]: r for r in paper_results()["table5"]}
    for r, d in zip(rows, disp):
        p = p5.get(r["method"]) if _paper_key(cfg, r["dataset"]) == "imagenet100" and r["depth"] == 16 else None
        r["paper_hours_per_200_epochs"] = p["hours_per_200_epochs"] if p else None
        r["paper_memory_per_gpu_gb"] = p["memory_per_gpu_gb"] if p else None
        d["paper: h / 200 ep., memory / GPU"] = (f"{p['hours_per_200_epochs']} h, {p['memory_per_gpu_gb']} GB "
                                                 f"({p['hardware']})" if p else "—")
    df = pd.DataFrame(rows)
    write_table(df, out, "overhead", "Table 5 layout: training cost measured by the training jobs themselves "
                "(peak memory is the process peak RSS on CPU, allocated GPU memory on CUDA).", pd.DataFrame(disp))
    return df


def table3(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    """Token-likelihood NLL and OOD AUROC (in-distribution val images vs the OOD set), beside the paper."""
    paper = {r["method"]: r for r in paper_results()["table3"]}
    rows, disp = [], []
    for (dataset, depth, method), rs in _groups(cfg, ood_runs(cfg)).items():
        ms = _load(results, rs, "ood.json")
        auc = _mean_std(100 * m["auroc"] for m in ms)
        nll_tok = _mean_std(m["id"]["mean_nll_per_token"] for m in ms)
        nll_img = _mean_std(m["id"]["mean_nll_total"] for m in ms)
        ood_tok = _mean_std(m["ood"]["mean_nll_per_token"] for m in ms)
        p = paper.get(method) if _paper_key(cfg, dataset) == "imagenet100" else None  # the paper's Table 3: ImageNet
        rows.append({"dataset": dataset, "depth": depth, "method": method, "seeds": len(rs),
                     "auroc_percent_mean": auc[0], "auroc_percent_std": auc[1], "id_nll_per_token_mean": nll_tok[0],
                     "id_nll_per_image_mean": nll_img[0], "ood_nll_per_token_mean": ood_tok[0],
                     "class_mode": ms[0].get("class_mode"), "paper_nll": p["nll"] if p else None,
                     "paper_auroc_percent": p["auroc_percent"] if p else None,
                     "auroc_minus_paper": _diff(auc[0], p["auroc_percent"] if p else None)})
        disp.append({"dataset": dataset, "depth": f"d{depth}", "method": method,
                     "NLL / token (ID) ↓": _fmt(nll_tok[0], nll_tok[1], 3), "NLL / image (ID) ↓": _fmt(nll_img[0], nll_img[1], 1),
                     "NLL / token (OOD)": _fmt(ood_tok[0], None, 3), "AUROC % ↑": _fmt(auc[0], auc[1], 1),
                     "NLL (paper)": p["nll"] if p else "—", "AUROC % (paper)": p["auroc_percent"] if p else "—",
                     "Δ AUROC": f"{rows[-1]['auroc_minus_paper']:+.1f}" if rows[-1]["auroc_minus_paper"] is not None else "—"})
    df = pd.DataFrame(rows)
    write_table(df, out, "table3", "Table 3 layout: OOD detection from token likelihoods (score = NLL; AUROC of OOD "
                "vs in-distribution held-out images) and the in-distribution NLL in nats. The paper does not define its "
                "NLL unit; mCE (ImageNet-C) is not reproduced.", pd.DataFrame(disp))
    return df


def figure4_data(cfg: dict, results: Path) -> pd.DataFrame:
    """Figure 4's numbers: FID over the lambda grid and over the CFG sweep (read, not written)."""
    f4 = cfg["experiments"]["figure4"]
    seeds = f4.get("seeds", [cfg["seeds"][0]])
    rows = []
    for (a, b), method in grid_points(cfg).items():
        ms = [read_json(results / Run(f4["dataset"], int(f4["depth"]), method, s).path / "metrics.json") for s in seeds]
        fid = _mean_std(m["fidelity"]["fid"] for m in ms)
        rows.append({"study": "lambda", "lambda_2nd": a, "lambda_se": b, "method": method, "cfg": None,
                     "fid_mean": fid[0], "fid_std": fid[1], "kid_mean": _mean_std(m["fidelity"]["kid_mean"] for m in ms)[0]})
    sweep: dict[tuple[str, float], list] = {}
    for r, c in cfg_sweep(cfg):
        sweep.setdefault((r.method, c), []).append(read_json(results / r.path / "cfg_sweep" / f"cfg{c:g}" / "metrics.json"))
    for (method, c), ms in sweep.items():
        fid = _mean_std(m["fidelity"]["fid"] for m in ms)
        rows.append({"study": "cfg", "lambda_2nd": None, "lambda_se": None, "method": method, "cfg": c,
                     "fid_mean": fid[0], "fid_std": fid[1], "kid_mean": _mean_std(m["fidelity"]["kid_mean"] for m in ms)[0]})
    return pd.DataFrame(rows)


def figure4_table(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    f4 = cfg["experiments"]["figure4"]
    df = figure4_data(cfg, results)
    disp = df.copy()
    for k in ("fid_mean", "fid_std", "kid_mean"):
        disp[k] = disp[k].map(lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}")
    write_table(df, out, "figure4", f"Figure 4's numbers ({f4['dataset']} d{f4['depth']}): FID over the "
                "lambda_2nd x lambda_se grid and over the CFG sweep.", disp)
    return df


UNCERTAINTY_TABLES = {
    "uncertainty_droppath": ("droppath_table", "uncertainty/sweep_scored.json",
                             "MC-Dropout: generation quality and pixel-wise σ (std over T stochastic passes of the decoded "
                             "image in [0,1]) against the DropPath rate kept active at inference, baseline vs ours."),
    "uncertainty_region": ("region_table", "uncertainty/mc_dropout.json",
                           "MC-Dropout σ inside vs outside the object (toy: the object segmented in the mean image, "
                           "checked against the exact masks; real datasets: absent, with the reason)."),
    "uncertainty_entanglement": ("entanglement_table", "uncertainty/entanglement_scored.json",
                                 "Class entanglement: conditioning on an equal-weight mix of 1, 2 or 3 class "
                                 "embeddings; FID/KID against the real images of the mixed classes, and σ."),
}


def uncertainty_tables(cfg: dict, results: Path, out: Path) -> None:
    from varup import uncertainty as U

    runs_ = uncertainty_runs(cfg)
    for name, (fn, path, caption) in UNCERTAINTY_TABLES.items():
        df, disp = getattr(U, fn)([read_json(results / r.path / path) for r in runs_])
        write_table(df, out, name, caption, disp)
    if mode_runs(cfg):
        df, disp = U.mode_coverage_table([read_json(results / r.path / "mode_coverage.json") for r in mode_runs(cfg)])
        write_table(df, out, "mode_coverage", "Mode coverage (beyond the paper): the toy generator knows every image's "
                    "mode; a classifier trained on the toy images labels the samples. Modes covered, KL between the "
                    "generated and the true mode histograms, per-class coverage, class error; mean ± std over seeds.",
                    disp)


def make_tables(cfg: dict, results: str | Path, out: str | Path) -> None:
    results, out = Path(results), Path(out)
    if uncertainty_enabled(cfg):
        uncertainty_tables(cfg, results, out)
    fns = [table2, table7, codebook_calibration, overhead]
    if cfg.get("experiments", {}).get("ood"):
        fns.append(table3)
    if cfg.get("experiments", {}).get("figure4"):
        fns.append(figure4_table)
    for fn in fns:
        df = fn(cfg, results, out)
        log.info("%s: %d rows", fn.__name__, len(df))
