"""Every table, from the runs' ``metrics.json`` and ``train/summary.json``: CSV + Markdown + LaTeX + HTML each.

* ``table2`` — the paper's Table 2 layout: dataset x depth x method, FID / IS / KID / precision / recall / clean-FID,
  mean ± std over seeds (IS says "unavailable: <reason>" when only FID-only Inception weights could be had).
* ``table7`` — the paper's Table 7 (diversity): mean pairwise SSIM, SSIM diversity, precision, recall, F1, density,
  coverage.
* ``codebook_calibration`` — codebook utilisation (active codes and perplexity, real vs generated) and token
  calibration (ECE, NLL, accuracy) on held-out token maps.
* ``overhead`` — the paper's Table 5 layout from our own training logs: parameters, batch, peak memory, time per
  step / epoch, throughput, and the regulariser's overhead relative to the baseline.
* ``loss_references`` — what each reference of L_2nd asks of the model (``refs.json`` of every dataset): τ, s* and
  its effective support (median [q10, q90] over the codes; per scale for ``dataset``).
* ``lambda_study`` — target ``lambda_study`` only (``lambda_study.json``, :mod:`varup.studies.lambdastudy`): each loss
  setting's mean with a t-interval over the training seeds and its paired difference to the baseline, with the
  study's one-line verdict as the caption.
* ``uncertainty_droppath`` / ``_region`` / ``_entanglement`` — the MC-Dropout studies (rows from
  :mod:`varup.studies.uncertainty`), with the companion study's numbers beside ours as a reference (no Δ).
* ``claims`` — the claims ledger (:mod:`varup.report.claims`): each claim of the paper, this run's evidence, the
  paper's number and a verdict by explicit rules; the report shows it first.
* ``toy_metrics`` — toy datasets only: Fréchet distance, KID and precision/recall in the feature space of the toy
  mode classifier, beside the Inception ones, with a "real vs real (floor)" row per dataset.

Cells follow :mod:`varup.report.tablefmt`: mean ± std over the training seeds of a row (sample std, ddof = 1), a single
seed's value without ±, and a display column ``n``; each caption says what its ± is over. The paper's numbers are
printed beside ours wherever it reports them; a difference (Δ) to them only where our dataset is the paper's.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from varup.base.utils import atomic_write_text, read_json
from varup.config.plan import Run, main_runs, mode_runs, ood_runs, toy_runs, uncertainty_enabled, uncertainty_runs
from varup.config.textplan import FAMILY_NAMES
from varup.report.figure4 import figure4_data
from varup.report.modes import mode_coverage_table
from varup.report.tablefmt import MISSING, add_stat, fmt, html_table, latex_table, mean_std, spread_note
from varup.report.uncertainty import SIGMA_NOTE, droppath_table, entanglement_table, region_table

log = logging.getLogger("varup.report.tables")


def _groups(cfg: dict, runs_=None) -> dict[tuple[str, int, str], list[Run]]:
    out: dict[tuple[str, int, str], list[Run]] = {}
    for r in (main_runs(cfg) if runs_ is None else runs_):
        out.setdefault((r.dataset, r.depth, r.method), []).append(r)
    return out


def paper_results() -> dict:
    """The paper's reported numbers (src/varup/report/paper_results.json)."""
    return json.loads((Path(__file__).parent / "paper_results.json").read_text())


def _paper_key(cfg: dict, dataset: str) -> str | None:
    """Which of the paper's datasets a configured dataset reproduces (by kind)."""
    kind = cfg["datasets"][dataset]["kind"]
    return {"afhq": "afhq", "imagenet100": "imagenet100"}.get(kind)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if not _finite(a) or not _finite(b) else a - b


def _finite(v) -> bool:
    """A number (not None, not NaN): pandas turns a None among floats into NaN."""
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _load(results: Path, runs_: list[Run], name: str) -> list[dict]:
    return [read_json(results / r.path / name) for r in runs_]


def write_table(df: pd.DataFrame, out_dir: str | Path, name: str, caption: str, display: pd.DataFrame | None = None) -> None:
    """``name.csv`` (full precision, machine-readable), and the formatted ``display`` with its caption as ``name.md``,
    ``name.tex`` (booktabs, compiles with pdflatex) and ``name.html`` (a self-contained page, shown by the report)."""
    out = Path(out_dir)
    disp = df if display is None else display
    atomic_write_text(out / f"{name}.csv", df.to_csv(index=False))
    md = f"**{caption}**\n\n" + disp.to_markdown(index=False, disable_numparse=True) + "\n"  # keep the digits
    atomic_write_text(out / f"{name}.md", md)
    atomic_write_text(out / f"{name}.tex", latex_table(disp, caption, f"tab:{name}"))
    atomic_write_text(out / f"{name}.html", html_table(disp, caption, name))


def study_report_main(argv: list[str] | None, prog: str, what: str, study: str, make: Callable) -> int:
    """The command line of a study's report module (``python -m varup.report.<study> --study FILE --tables DIR
    --figures DIR``): ``make(study, tables, figures)`` with its log set up."""
    import argparse

    from varup.base.utils import setup_logging

    ap = argparse.ArgumentParser(prog=prog, description=what)
    ap.add_argument("--study", required=True, help=study)
    ap.add_argument("--tables", required=True, help="folder of the table files")
    ap.add_argument("--figures", required=True, help="folder of the figure files")
    ap.add_argument("--log", default=None)
    a = ap.parse_args(argv)
    setup_logging(a.log)
    make(a.study, a.tables, a.figures)
    return 0


def _metric_table(cfg: dict, results: Path, columns: list[tuple[str, str, Callable[[dict], float | None], int]],
                  source: str = "metrics.json") -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, disp = [], []
    for (dataset, depth, method), rs in _groups(cfg).items():
        ms = _load(results, rs, source)
        row = {"dataset": dataset, "depth": depth, "method": method, "seeds": len(rs)}
        d = {"dataset": dataset, "depth": f"d{depth}", "method": method, "n": len(rs)}
        for key, title, get, digits in columns:
            add_stat(row, d, key, title, (get(x) for x in ms), digits)
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
    if any(v is not None for v in pf):  # a Δ only for rows on the paper's datasets
        disp["Δ FID"] = [f"{v:+.2f}" if v is not None else "—" for v in df["fid_minus_paper"]]
    disp["IS (paper)"] = [f"{v:.2f}" if v is not None else "—" for v in pi]
    first = _load(results, [next(iter(main_runs(cfg)))], "metrics.json")[0]
    reason = first["inception"].get("isc_unavailable_reason")
    is_note = ""
    if df["is_mean"].isna().all() and reason:
        disp["IS ↑"] = "unavailable"
        is_note = f" IS unavailable: {reason}."
    df["inception_source"] = first["inception"]["source"]
    caption = (f"Table 2 layout: generation quality per dataset, depth and method. {spread_note()}; KID is "
               "torch-fidelity's mean over its random subsets within each run (that std is in metrics.json), "
               f"then mean ± std over the seeds. The paper's values are shown, with Δ = ours − paper, only for rows on "
               f"its datasets (AFHQ, ImageNet-100). Inception weights: {first['inception']['source']}.{is_note}")
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
    on_paper = [_paper_key(cfg, d) is not None for d in df["dataset"]]
    df["paper_ours_json"] = json.dumps(paper)
    for key, *_ in cols:  # Δ only for 'ours' on one of the paper's datasets
        df[f"{key}_minus_paper"] = [_diff(m, paper.get(key)) if ok and meth == "ours" else None
                                    for m, ok, meth in zip(df[f"{key}_mean"], on_paper, df["method"])]
    write_table(df, out, "table7", "Table 7 layout: diversity metrics, one column per run group (n: its training "
                "seeds), beside the paper's values for its method (the paper does not say which dataset or depth). "
                "Δ = ours − paper only for runs on one of the paper's datasets (AFHQ, ImageNet-100); on any other "
                f"dataset the paper's column is a reference, not a target. {spread_note(of='column')}.",
                _table7_display(df, cols, paper))
    return df


def _table7_display(df: pd.DataFrame, cols: list, paper: dict) -> pd.DataFrame:
    """The paper's layout: one row per metric, the paper's value, our run groups as columns, and a Δ column beside
    each group that has a difference to the paper (``<key>_minus_paper``: 'ours' on a paper dataset)."""
    rows = []
    for key, title, _, digits in cols:
        r = {"metric": title.replace(" ↓", "").replace(" ↑", ""), "paper (ours)": paper.get(key)}
        for _, row in df.iterrows():
            name = f"{row['dataset']} d{row['depth']} {row['method']}"
            r[f"{name} (n = {row['seeds']})"] = fmt(row[f"{key}_mean"], row[f"{key}_std"], digits)
            if any(_finite(row[f"{k}_minus_paper"]) for k, *_ in cols):
                d = row[f"{key}_minus_paper"]
                r[f"Δ {name} − paper"] = f"{d:+.3f}" if _finite(d) else "—"
        rows.append(r)
    return pd.DataFrame(rows)


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
        ece = mean_std(m["calibration"]["ece"] for m in ms)
        nll = mean_std(m["calibration"]["nll"] for m in ms)
        acc = mean_std(m["calibration"]["accuracy"] for m in ms)
        rows.append({"dataset": dataset, "depth": depth, "method": method, "seeds": len(rs),
                     "active_codes_generated": json.dumps([round(float(x), 1) for x in act_gen]),
                     "active_codes_real": json.dumps([int(x) for x in act_real]),
                     "perplexity_generated": json.dumps([round(float(x), 2) for x in ppl_gen]),
                     "perplexity_real": json.dumps([round(float(x), 2) for x in ppl_real]),
                     "active_total_generated": float(np.mean([m["codebook"]["generated"]["overall"]["active_codes"] for m in ms])),
                     "active_total_real": ms[0]["codebook"]["real"]["overall"]["active_codes"],
                     "ece_mean": ece[0], "ece_std": ece[1], "nll_mean": nll[0], "nll_std": nll[1],
                     "token_acc_mean": acc[0], "token_acc_std": acc[1]})
        disp.append({"dataset": dataset, "depth": f"d{depth}", "method": method, "n": len(rs),
                     "active codes gen / real (all scales)": f"{rows[-1]['active_total_generated']:.0f} / {rows[-1]['active_total_real']}",
                     "perplexity gen / real (last scale)": f"{ppl_gen[-1]:.1f} / {ppl_real[-1]:.1f}",
                     "ECE ↓": fmt(ece[0], ece[1], 4), "NLL ↓": fmt(nll[0], nll[1], 3), "token acc": fmt(acc[0], acc[1], 3)})
    df = pd.DataFrame(rows)
    write_table(df, out, "codebook_calibration",
                "Codebook utilisation (distinct codes used and perplexity; generated samples vs as many held-out real images) "
                f"and token calibration on held-out token maps. {spread_note()}; codes and perplexity of generated "
                "samples are means over the seeds, the real images' are one set.", pd.DataFrame(disp))
    return df


def overhead(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    rows, disp = [], []
    base_step: dict[tuple[str, int], float] = {}
    groups = _groups(cfg)
    for (dataset, depth, method), rs in groups.items():
        ss = _load(results, rs, "train/summary.json")
        step = mean_std(s["s_per_step"] for s in ss)[0]
        if method == "baseline":
            base_step[(dataset, depth)] = step
    for (dataset, depth, method), rs in groups.items():
        ss = _load(results, rs, "train/summary.json")
        step = mean_std(s["s_per_step"] for s in ss)
        mem = mean_std(s["peak_mem_mb_per_device"] for s in ss)
        epoch = mean_std(s["epoch_s"] for s in ss)
        ips = mean_std(s["imgs_per_s"] for s in ss)
        b = base_step.get((dataset, depth))
        ratio = step[0] / b if b and step[0] else None
        rows.append({"dataset": dataset, "depth": depth, "method": method, "params_m": ss[0]["params_m"],
                     "global_batch": ss[0]["global_batch"], "device": ss[0]["device"], "precision": ss[0]["precision"],
                     "peak_mem_mb": mem[0], "s_per_step": step[0], "s_per_step_std": step[1], "epoch_s": epoch[0],
                     "time_200_epochs_h": epoch[0] * 200 / 3600 if epoch[0] else None, "imgs_per_s": ips[0],
                     "step_time_vs_baseline": ratio})
        disp.append({"dataset": dataset, "depth": f"d{depth}", "method": method, "n": len(rs),
                     "params (M)": f"{ss[0]['params_m']:.2f}",
                     "batch": ss[0]["global_batch"], "device": ss[0]["device"], "peak memory (MB)": f"{mem[0]:.0f}",
                     "s / step": fmt(step[0], step[1], 4), "time / 200 ep. (h)": f"{epoch[0] * 200 / 3600:.3f}",
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
                "(peak memory is the process peak RSS on CPU, allocated GPU memory on CUDA). s / step: mean ± std over "
                "the n training runs (seeds) of each row (sample std, ddof = 1; no ± where n = 1); memory, epoch "
                "time and the ratio to the baseline are means over them.", pd.DataFrame(disp))
    return df


def _mce_cells(cfg: dict, results: Path, dataset: str, depth: int, rs: list[Run]) -> dict:
    """mCE (percent, mean and std over the training seeds) of a run group against the reference method's run of the
    same dataset, depth and seed, the mean token error and NLL over the corrupted sets and the clean set's error."""
    from varup.report.mce import corruption_errors, mce

    c = cfg["experiments"]["ood"].get("corruptions") or {}
    if not c.get("enabled"):
        return {}
    names, sev = c["names"], c["severities"]
    ref = {r.seed: r for r in ood_runs(cfg) if (r.dataset, r.depth, r.method) == (dataset, depth, c["reference"])}
    out: dict[str, list] = {"mce": [], "err": [], "nll": [], "clean": []}
    for r in rs:
        if r.seed not in ref:
            raise ValueError(f"experiments.ood.corruptions.reference {c['reference']!r} has no run of {dataset} "
                             f"d{depth} seed {r.seed} to pair with {r.path}")
        e, rec = corruption_errors(results / r.path / "corruptions.json", names, sev, c["error"])
        e_ref, _ = corruption_errors(results / ref[r.seed].path / "corruptions.json", names, sev, c["error"])
        out["mce"].append(mce(e, e_ref, names)["mce"])
        out["err"].append(float(np.mean([s["token_error"] for s in rec["sets"] if s["corruption"] in names])))
        out["nll"].append(float(np.mean([s["nll_per_token"] for s in rec["sets"] if s["corruption"] in names])))
        out["clean"].append(rec["clean"]["token_error"] if rec.get("clean") else None)
    return {k: mean_std(v) for k, v in out.items()} | {"reference": c["reference"], "error": c["error"]}


def table3(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    """Token-likelihood NLL and OOD AUROC (in-distribution val images vs the OOD set), and the mCE on ImageNet-C
    corruptions of the held-out images against the reference method, beside the paper."""
    paper = {r["method"]: r for r in paper_results()["table3"]}
    rows, disp = [], []
    for (dataset, depth, method), rs in _groups(cfg, ood_runs(cfg)).items():
        ms = _load(results, rs, "ood.json")
        cm = _mce_cells(cfg, results, dataset, depth, rs)
        auc = mean_std(100 * m["auroc"] for m in ms)
        nll_tok = mean_std(m["id"]["mean_nll_per_token"] for m in ms)
        nll_img = mean_std(m["id"]["mean_nll_total"] for m in ms)
        ood_tok = mean_std(m["ood"]["mean_nll_per_token"] for m in ms)
        p = paper.get(method) if _paper_key(cfg, dataset) == "imagenet100" else None  # the paper's Table 3: ImageNet
        rows.append({"dataset": dataset, "depth": depth, "method": method, "seeds": len(rs),
                     "auroc_percent_mean": auc[0], "auroc_percent_std": auc[1], "id_nll_per_token_mean": nll_tok[0],
                     "id_nll_per_image_mean": nll_img[0], "ood_nll_per_token_mean": ood_tok[0],
                     "class_mode": ms[0].get("class_mode"), "paper_nll": p["nll"] if p else None,
                     "paper_auroc_percent": p["auroc_percent"] if p else None,
                     "auroc_minus_paper": _diff(auc[0], p["auroc_percent"] if p else None)})
        p_mce = (paper.get(method) or {}).get("mce")  # the paper's ImageNet-C mCE, beside every dataset's rows
        if cm:
            rows[-1].update({"mce_percent_mean": cm["mce"].mean, "mce_percent_std": cm["mce"].std,
                             "mce_reference": cm["reference"], "mce_error": cm["error"], "corrupt_token_error_mean": cm["err"].mean,
                             "corrupt_nll_per_token_mean": cm["nll"].mean, "clean_token_error_mean": cm["clean"].mean,
                             "paper_mce": p_mce})
        disp.append({"dataset": dataset, "depth": f"d{depth}", "method": method, "n": len(rs),
                     "NLL / token (ID) ↓": fmt(nll_tok[0], nll_tok[1], 3), "NLL / image (ID) ↓": fmt(nll_img[0], nll_img[1], 1),
                     "NLL / token (OOD)": fmt(ood_tok[0], None, 3), "AUROC % ↑": fmt(auc[0], auc[1], 1),
                     "NLL (paper)": p["nll"] if p else "—", "AUROC % (paper)": p["auroc_percent"] if p else "—",
                     "Δ AUROC": f"{rows[-1]['auroc_minus_paper']:+.1f}" if rows[-1]["auroc_minus_paper"] is not None else "—"})
        if cm:
            disp[-1].update({"mCE % ↓": (f"{cm['mce'].mean:.1f} (reference)" if method == cm["reference"]
                                         else fmt(cm["mce"].mean, cm["mce"].std, 1)),
                             "Token error (corrupt / clean)": f"{fmt(cm['err'].mean, None, 3)} / "
                                                              f"{fmt(cm['clean'].mean, None, 3)}",
                             "mCE (paper, ImageNet-C)": p_mce if p_mce is not None else "—"})
    df, disp = pd.DataFrame(rows), pd.DataFrame(disp)
    if df.empty or df["paper_auroc_percent"].isna().all():  # a Δ only for rows on the paper's dataset
        disp = disp.drop(columns="Δ AUROC", errors="ignore")
    write_table(df, out, "table3", "Table 3 layout: OOD detection from token likelihoods (score = NLL; AUROC of OOD "
                "vs in-distribution held-out images) and the in-distribution NLL in nats. The paper's values (its "
                "ImageNet experiment), with Δ AUROC = ours − paper, are shown only for ImageNet-100 rows. The paper "
                f"does not define its NLL unit. {mce_note(cfg)} {spread_note()}; the OOD NLL and the token errors "
                "are their means.", disp)
    return df


def mce_note(cfg: dict) -> str:
    """Table 3's caption on the mCE columns (experiments.ood.corruptions)."""
    c = cfg["experiments"]["ood"].get("corruptions") or {}
    if not c.get("enabled"):
        return "mCE is not computed (experiments.ood.corruptions.enabled: false)."
    error = {"token_error": "the teacher-forced token error (1 - top-1 accuracy of the next-scale token predictions)",
             "nll_per_token": "the teacher-forced mean token NLL"}[c["error"]]
    return (f"mCE: ImageNet-C corruptions (imagecorruptions; {len(c['names'])} corruptions x severities "
            f"{', '.join(map(str, c['severities']))}) of the held-out images, tokenized by the dataset's tokenizer; "
            f"error = {error}; CE_c = sum over severities of the run's error / the reference's (the "
            f"{c['reference']} run of the same depth and seed, whose mCE is 100 by construction), mCE = mean over the "
            "corruptions, in percent, then mean ± std over the seeds; token errors are the mean over the corrupted "
            "sets and the clean set. The paper does not name its reference (its baseline has 68.0), so its mCE "
            "values (ImageNet-C, its ImageNet models) are printed beside every dataset's rows, not differenced.")


def figure4_table(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    f4 = cfg["experiments"]["figure4"]
    df = figure4_data(cfg, results)
    disp = df.copy()
    for k in ("fid_mean", "fid_std", "kid_mean"):
        disp[k] = disp[k].map(lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}")
    write_table(df, out, "figure4", f"Figure 4's numbers ({f4['dataset']} d{f4['depth']}): FID over the "
                "lambda_2nd x lambda_se grid and over the CFG sweep; fid_mean, fid_std (sample std, ddof = 1) and "
                "kid_mean over the n training seeds of each point (fid_std — where n = 1).", disp)
    return df


STUDY_NOTE = ("Columns marked (study): the companion MC-Dropout study's values "
              "(shared/papers/mc-dropout-var-study.md), a reference printed without a difference: it sampled single "
              "ImageNet class prompts with its own model and sample count, a setting no configured dataset "
              "reproduces; its IS ± is its own.")
UNCERTAINTY_TABLES = {  # name: (table function, run file, caption, the study's rows, the column they match)
    "uncertainty_droppath": (droppath_table, "uncertainty/sweep_scored.json",
                             "MC-Dropout: generation quality and pixel-wise σ (std over T stochastic passes of the decoded "
                             "image in [0,1]) against the DropPath rate kept active at inference, baseline vs ours. "
                             f"{spread_note()}. {SIGMA_NOTE} {STUDY_NOTE}", "mc_dropout_droppath_sweep", "rate"),
    "uncertainty_region": (region_table, "uncertainty/mc_dropout.json",
                           "MC-Dropout σ inside vs outside the object (toy: the object segmented in the mean image, "
                           "checked against the exact masks; real datasets: absent, with the reason). "
                           f"{spread_note()}. {SIGMA_NOTE} {STUDY_NOTE}", "mc_dropout_region_sigma", None),
    "uncertainty_entanglement": (entanglement_table, "uncertainty/entanglement_scored.json",
                                 "Class entanglement: conditioning on an equal-weight mix of 1, 2 or 3 class "
                                 "embeddings; FID/KID against the real images of the mixed classes, and σ (each "
                                 "run's mixes of the same size averaged first). "
                                 f"{spread_note()}. {SIGMA_NOTE} {STUDY_NOTE}", "mc_dropout_entanglement",
                                 "concepts"),
}


def _study_cells(e: dict | None) -> tuple[dict, dict]:
    """(CSV columns, display cells) of one row of the companion study (FID, IS ± its std, CMMD, σ); "—" where the
    study has no row for ours."""
    e = e or {}
    csv = {f"study_{k}": e.get(k) for k in ("fid", "is", "is_std", "cmmd", "sigma")}
    disp = {"σ (study)": fmt(e.get("sigma"), None, 4), "FID (study)": fmt(e.get("fid"), None, 2),
            "IS (study)": fmt(e.get("is"), e.get("is_std"), 2), "CMMD (study)": fmt(e.get("cmmd"), None, 3)}
    return csv, disp


def _region_study_cells(r: dict) -> tuple[dict, dict]:
    csv = {"study_sigma_object": r["object"], "study_sigma_background": r["background"]}
    disp = {"σ object (study)": fmt(r["object"], None, 4), "σ background (study)": fmt(r["background"], None, 4),
            "σ background − object (study)": fmt(r["background"] - r["object"], None, 4)}
    return csv, disp


def _same(a, b) -> bool:
    """Equal study keys: numbers within float tolerance, anything else by equality (None matches nothing)."""
    if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
        return False
    if isinstance(a, (int, float)) and isinstance(b, (int, float, np.integer, np.floating)):
        return math.isclose(float(a), float(b))
    return a == b


def with_study(df: pd.DataFrame, disp: pd.DataFrame, study_key: str, match: str | None):
    """The companion study's numbers beside each row of an uncertainty table: by DropPath rate or number of mixed
    classes (``match``), or, for the region table, the study's one object / background pair on every row."""
    study = paper_results()[study_key]
    cells = []
    for _, row in df.iterrows():
        if match is None:
            cells.append(_region_study_cells(study))
        else:
            e = next((e for e in study if _same(e.get(match), row[match])), None)
            cells.append(_study_cells(e))
    if not cells:
        return df, disp
    df = pd.concat([df, pd.DataFrame([c for c, _ in cells], index=df.index)], axis=1)
    disp = pd.concat([disp, pd.DataFrame([d for _, d in cells], index=disp.index)], axis=1)
    return df, disp


def uncertainty_tables(cfg: dict, results: Path, out: Path) -> None:
    runs_ = uncertainty_runs(cfg)
    for name, (fn, path, caption, study_key, match) in UNCERTAINTY_TABLES.items():
        table = fn([read_json(results / r.path / path) for r in runs_])
        df, disp = with_study(*table, study_key, match)
        write_table(df, out, name, caption, disp)
    if mode_runs(cfg):
        df, disp = mode_coverage_table([read_json(results / r.path / "mode_coverage.json") for r in mode_runs(cfg)])
        write_table(df, out, "mode_coverage", "Mode coverage (beyond the paper): the toy generator knows every image's "
                    "mode; a classifier trained on the toy images labels the samples. Modes covered, KL between the "
                    "generated and the true mode histograms, per-class coverage, class error. "
                    f"{spread_note()}; the real row is one set of held-out images (n = 1).", disp)


def _field(section: str, key: str) -> Callable[[dict], float | None]:
    return lambda rec: (rec.get(section) or {}).get(key)


TOY_COLUMNS = [("toy_fd", "toy-FD ↓", _field("toy", "fd"), 3),
               ("toy_kid", "toy-KID ↓", _field("toy", "kid_mean"), 3),
               ("toy_precision", "toy-precision ↑", _field("toy", "precision"), 3),
               ("toy_recall", "toy-recall ↑", _field("toy", "recall"), 3),
               ("fid", "Inception FID ↓", _field("fidelity", "fid"), 2),
               ("kid", "Inception KID ↓", _field("fidelity", "kid_mean"), 4),
               ("precision", "Inception precision ↑", _field("fidelity", "precision"), 3),
               ("recall", "Inception recall ↑", _field("fidelity", "recall"), 3)]
FLOOR_METHOD = "real vs real (floor)"
CEILING_METHOD = "tokenizer reconstructions (ceiling)"


def _toy_row(keys: dict, depth, recs: list[dict]) -> tuple[dict, dict]:
    row = {**keys, "depth": depth, "n": len(recs)}
    d = {"dataset": keys["dataset"], "depth": f"d{depth}" if depth is not None else "—", "method": keys["method"],
         "n": len(recs)}
    for key, title, get, digits in TOY_COLUMNS:
        add_stat(row, d, key, title, (get(r) for r in recs), digits)
    return row, d


def _toy_caption(floors: dict[str, dict]) -> str:
    f = next(iter(floors.values()))
    fs, t = f["feature_space"], f["toy"]
    acc = (fs.get("classifier_val_accuracy") or {}).get("mode")
    sets = "; ".join(f"{d}: {x['floor_set']['n']} {x['floor_set']['split']} images vs {x['reference']['n']} "
                     f"{x['reference']['split']} images" for d, x in floors.items())
    seen = (" The classifier is trained on the train split, so the floor's train images were seen in its training."
            if any(x["floor_set"]["split"] == "train" for x in floors.values()) else "")
    return ("Toy metrics (beyond the paper) in the feature space of a network trained on the toy data: the mode "
            f"classifier's penultimate layer ({fs['dim']}-d, the global mean and max of its last conv block; trained "
            "on the toy train split to predict shape, colour, size and background"
            + (f", held-out mode accuracy {acc:.3f}" if acc is not None else "") + "), registered with "
            "torch-fidelity as its feature extractor: toy-FD (Fréchet distance), toy-KID (mean over "
            f"{t['kid_subsets']} subsets of {t['kid_subset_size']}), toy-precision/recall ({t['prc_neighborhood']} "
            "neighbours). Each run's samples are scored against the class-balanced real reference set that the "
            "Inception columns (as in Table 2) use. The floor row scores instead a class-balanced real set of the "
            f"sample size, disjoint from the reference ({sets}): what a generator of the true distribution gets at "
            f"this sample size; one set, n = 1.{seen}"
            + (" The ceiling row scores the tokenizer's reconstructions of that floor set (encode, decode) the same "
               "way: what a generator that reproduced the token maps of real images exactly would get, the limit the "
               "tokenizer sets for every run above it (toy features only)."
               if any(x.get("reconstruction") for x in floors.values()) else "")
            + f" {spread_note()}.")


def toy_metrics_table(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    """Per (dataset, depth, method): toy-feature FD / KID / precision / recall and the Inception ones, mean ± std
    over the training seeds; then per dataset the real-vs-real floor row and the tokenizer's ceiling row."""
    rows = []
    for (dataset, depth, method), rs in _groups(cfg, toy_runs(cfg)).items():
        recs = [{"toy": t["toy"], "fidelity": m["fidelity"]} for t, m in
                zip(_load(results, rs, "toy_metrics.json"), _load(results, rs, "metrics.json"))]
        rows.append(_toy_row({"dataset": dataset, "method": method}, depth, recs))
    datasets = dict.fromkeys(r.dataset for r in toy_runs(cfg))
    floors = {d: read_json(results / d / "toy_metrics_floor.json") for d in datasets}
    for d, f in floors.items():
        floor = {"toy": f["toy"], "fidelity": f["inception"]}
        rows.append(_toy_row({"dataset": d, "method": FLOOR_METHOD}, None, [floor]))
        if f.get("reconstruction"):
            rows.append(_toy_row({"dataset": d, "method": CEILING_METHOD}, None, [{"toy": f["reconstruction"]["toy"]}]))
    df = pd.DataFrame([r for r, _ in rows])
    write_table(df, out, "toy_metrics", _toy_caption(floors), pd.DataFrame([d for _, d in rows]))
    return df


def _q(st: dict, digits: int) -> str:
    return f"{st['median']:.{digits}g} [{st['q10']:.{digits}g}, {st['q90']:.{digits}g}]"


def loss_references_table(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    """One row per (dataset, reference) from ``<dataset>/refs.json`` (written by the references rule)."""
    rows, disp = [], []
    for dataset in cfg["datasets"]:
        st = read_json(results / dataset / "refs.json")
        V = st["vocab_size"]
        for name in ("semantic", "semantic_k"):
            if name not in st:
                continue
            r = st[name]
            rows.append({"dataset": dataset, "reference": name, "vocab_size": V, "tau": r["tau"],
                         **{f"s_star_{k}": v for k, v in r["s_star"].items()},
                         **{f"support_{k}": v for k, v in r["effective_support"].items()},
                         "entropy_median": r["entropy"]["median"]})
            disp.append({"dataset": dataset, "reference": name + (f" (k = {r['support_k']:g})" if "support_k" in r else ""),
                         "τ": f"{r['tau']:.4g}", "s* median [q10, q90]": _q(r["s_star"], 3),
                         "effective support (codes)": _q(r["effective_support"], 3) + f" of {V}",
                         "entropy (nats)": f"{r['entropy']['median']:.3f}"})
        if "dataset" in st:
            d = st["dataset"]
            rows.append({"dataset": dataset, "reference": "dataset", "vocab_size": V,
                         "s_star_per_scale": json.dumps(d["s_star_per_scale"]),
                         "support_per_scale": json.dumps(d["effective_support_per_scale"])})
            disp.append({"dataset": dataset, "reference": "dataset (per scale)", "τ": "—",
                         "s* median [q10, q90]": ", ".join(f"{x:.3g}" for x in d["s_star_per_scale"]),
                         "effective support (codes)": ", ".join(f"{x:.0f}" for x in d["effective_support_per_scale"]),
                         "entropy (nats)": ", ".join(f"{x:.2f}" for x in d["entropy_per_scale"])})
        rows.append({"dataset": dataset, "reference": "uniform", "vocab_size": V, "s_star_median": 0.0,
                     "support_median": float(V)})
        disp.append({"dataset": dataset, "reference": "uniform", "τ": "—", "s* median [q10, q90]": "0",
                     "effective support (codes)": f"{V} of {V}", "entropy (nats)": f"{math.log(V):.3f}"})
    df = pd.DataFrame(rows)
    write_table(df, out, "loss_references", "References of the second-order term: s* = V·Var of the reference "
                "distribution (0 uniform, ≈1 one-hot) and its effective support 1/(s* + 1/V), the number of equally "
                "likely codes with the same Σq²; median [10 %, 90 % quantiles] over the codebook's codes. A model "
                "trained with CE alone has a mean predictive s near the training logs' pred_dispersion.",
                pd.DataFrame(disp))
    return df


def _ci_cell(row: dict, digits: int, prefix: str = "") -> str:
    m, lo, hi = row.get(prefix + "mean"), row.get(prefix + "ci_low"), row.get(prefix + "ci_high")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "—"
    sign = "+" if prefix else ""
    if lo is None or math.isnan(lo):
        return f"{m:{sign}.{digits}f}"
    return f"{m:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def lambda_study_table(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    """The λ study (``lambda_study/lambda_study.json``): per point, each metric's mean [CI] and, below it, the
    paired difference to the baseline [CI]; marked ▲ / ▼ where the interval excludes 0 (better / worse)."""
    st = read_json(results / "lambda_study" / "lambda_study.json")
    metrics = st["metrics"]
    rows, disp = [], []
    for p in st["points"]:
        loss = st["losses"].get(p["point"], {})
        setting = (f"λ1 {loss.get('lambda_2nd', 0):g} ({loss.get('reference')}, {loss.get('l2nd_reduction')}), "
                   f"λ2 {loss.get('lambda_se', 0):g} ({loss.get('se_direction')})") if loss else ""
        d = {"point": p["point"], "setting": setting, "n": len(p["seeds"])}
        dd = {"point": "", "setting": f"Δ vs {st['baseline']} (paired)", "n": ""}
        r = {"point": p["point"], "seeds": json.dumps(p["seeds"]), **{f"loss_{k}": v for k, v in loss.items()}}
        for m in metrics:
            row = p["metrics"][m["key"]]
            d[m["title"]] = _ci_cell(row, m["digits"])
            mark = " ▲" if row.get("better") else (" ▼" if row.get("worse") else "")
            dd[m["title"]] = (_ci_cell(row, m["digits"], "diff_") + mark) if "diff_mean" in row else "—"
            r.update({f"{m['key']}_{k}": row.get(k) for k in ("mean", "ci_low", "ci_high", "diff_mean",
                                                               "diff_ci_low", "diff_ci_high", "better", "worse")})
        rows.append(r)
        disp += [d] + ([dd] if p["point"] != st["baseline"] else [])
    df = pd.DataFrame(rows)
    conf = int(round(st["confidence"] * 100))
    write_table(df, out, "lambda_study", f"λ study on the toy: mean [{conf} % t-interval] over the training seeds; "
                f"Δ rows: paired difference to {st['baseline']} at the same seeds (same initialisation and data "
                f"order), ▲ better / ▼ worse beyond noise. The last four columns are readings of the last log step "
                f"(pred. dispersion s = V·Var of p; gradient shares at the final weights), not scores. Verdict: "
                f"{st['verdict']}", pd.DataFrame(disp))
    return df


def _prompt_score(e: Mapping[str, Any], key: str):
    return (e.get("scores") or {}).get(key)


def cmmd_title(records: Sequence[Mapping[str, Any]]) -> str:
    """"CMMD ↓" for CLIP features, "toy-CMMD ↓" for the toy mode classifier's (never to be mistaken for CLIP's)."""
    kinds = {_prompt_score(e, "cmmd_kind") for r in records for e in r["sets"] if e.get("scores")}
    return "toy-CMMD ↓" if "toy" in kinds else "CMMD ↓"


PROMPT_COLS = (("fid", "FID ↓", "fid", 2), ("kid", "KID ↓", "kid", 4), ("is", "IS ↑", "isc", 2),
               ("cmmd", None, "cmmd", 3), ("sigma", "σ (dropout)", None, 4),
               ("sigma_samples", "σ (samples)", "mean_sigma_samples", 4), ("sigma_object", "σ object", "region.inside", 4),
               ("sigma_background", "σ background", "region.outside", 4),
               ("in_prompt", "in-prompt ↑", "in_prompt", 3), ("modes_covered", "modes covered", "modes_covered", 1))


def _prompt_value(e: Mapping[str, Any], name: str | None):
    """A prompt set's mean σ (``None``), its region σ (``region.inside`` / ``.outside``: object vs background of the
    MC mean image, absent without a mask) or a score."""
    if name is None:
        return e.get("mean_sigma")
    if name.startswith("mean_sigma"):  # another σ reading (uncertainty.sigma_reading)
        return e.get(name)
    if name.startswith("region."):
        return (e.get("region") or {}).get(name.split(".", 1)[1])
    return _prompt_score(e, name)


def _prompt_row_key(study: str, e: Mapping[str, Any]):
    return e["rate"] if study == "droppath" else e["prompt"]


def _prompt_row(key: tuple, study: str, ref: Mapping[str, Any], ok: list, toy: bool, ctitle: str) -> tuple[dict, dict]:
    """(CSV row, display row) of one prompt set over the seeds ``ok`` that could take it."""
    family, dataset, depth, method = key
    allowed = _prompt_score(ok[0], "modes_allowed") if ok else None
    row = {"family": family, "dataset": dataset, "depth": depth, "method": method, "prompt": ref["prompt"],
           "rate": ref.get("rate"), "concepts": ref.get("concepts"), "level": ref.get("level"), "seeds": len(ok),
           "modes_allowed": allowed}
    d = {"generator": FAMILY_NAMES[family], "dataset": dataset, "depth": f"d{depth}", "method": method}
    if study == "droppath":
        d["DropPath rate"] = f"{ref['rate']:g}"
    elif study == "entanglement":
        d["concepts"] = ref["concepts"]
    d.update({"prompt": ref["prompt"], "n": len(ok)})
    if toy:
        d["modes allowed"] = MISSING if allowed is None else str(allowed)
    for col, title, name, digits in PROMPT_COLS:
        add_stat(row, d, col, title or ctitle, [_prompt_value(e, name) for e in ok], digits)
    return row, d


def prompt_table(records: Sequence[Mapping[str, Any]], study: str):
    """(table, display) of one prompt study: a row per (generator family, dataset, depth, method, rate or prompt),
    each cell the mean ± std over the runs' training seeds (:mod:`varup.report.tablefmt`); a set a family cannot take
    (the class-conditional VAR and a prompt naming more than classes) is a row of "—"."""
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r["family"], r["dataset"], r["depth"], r["method"]), []).append(r)
    toy = any(_prompt_score(e, "modes_allowed") is not None for r in records for e in r["sets"])
    ctitle = cmmd_title(records)
    rows = []
    for key, rs in groups.items():
        for ref in (e for e in rs[0]["sets"] if e["study"] == study):
            same = [e for r in rs for e in r["sets"]
                    if e["study"] == study and _prompt_row_key(study, e) == _prompt_row_key(study, ref)]
            rows.append(_prompt_row(key, study, ref, [e for e in same if e["applicable"]], toy, ctitle))
    return pd.DataFrame([r for r, _ in rows]), pd.DataFrame([d for _, d in rows])


PROMPT_TABLES = {  # name: (study, caption, the companion study's rows, the column they match)
    "prompt_droppath": ("droppath", "Prompt study, DropPath sweep: one prompt sampled with DropPath kept active at "
                        "inference, for the class-conditional VAR (the prompt's class) and the text-conditioned "
                        "VAR-CLIP (its embedding), baseline vs ours", "mc_dropout_droppath_sweep", "rate"),
    "prompt_entanglement": ("entanglement", "Prompt study, semantic entanglement: 'A', 'A or B', 'A or B or C' "
                            "prompts (VAR: the equal mix of the named classes' embeddings)", "mc_dropout_entanglement",
                            "concepts"),
    "prompt_descriptiveness": ("descriptiveness", "Prompt study, descriptiveness: captions that fix ever more of the "
                               "image (toy: each fixes a known set of modes; the class-conditional VAR takes only "
                               "the class prompt); the study's Simple row is printed beside the least, its Complex "
                               "row beside the most descriptive prompt", "mc_dropout_descriptiveness", "prompt_type"),
}
PROMPT_NOTE = ("FID/KID (Inception) against the real train images the prompt describes (toy: the images of the modes "
               "it allows; n_real per set in the CSV); IS only with the genuine Inception weights (— with the "
               "FID-only fallback); {cmmd}; σ: mean pixel-wise std over T MC-Dropout passes; σ object / "
               "background: mean σ inside / outside the object of the set's MC mean image (toy: segmented; else "
               "masks from text.prompts.mask_dir; — without); "
               "in-prompt: share of samples the toy mode classifier puts in a mode the prompt allows, modes covered: "
               "how many of those modes the samples hit. ")


def prompt_tables(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    """The prompt study's three tables (:func:`varup.studies.prompts.prompt_table`), the companion study's rows beside."""
    from varup.config.textplan import study_runs

    records = [read_json(results / r.path / "prompts" / "scores.json") for r in study_runs(cfg)]
    toy = cmmd_title(records).startswith("toy")
    cmmd = ("toy-CMMD: the CMMD estimator (Gaussian kernel, σ = 10, ×1000) on the toy mode classifier's features, "
            "NOT CLIP-CMMD" if toy else "CMMD: Gaussian-kernel MMD (σ = 10, ×1000) of CLIP ViT-L/14@336 embeddings")
    frames = []
    for name, (study, caption, study_key, match) in PROMPT_TABLES.items():
        df, disp = prompt_table(records, study)
        if study == "descriptiveness" and len(df):
            last = df["level"].max()
            df["prompt_type"] = [("simple" if lv == 0 else "complex" if lv == last else None) for lv in df["level"]]
        df, disp = with_study(df, disp, study_key, match)
        write_table(df, out, name, f"{caption}. {PROMPT_NOTE.format(cmmd=cmmd)}{spread_note()}. {SIGMA_NOTE} "
                    f"{STUDY_NOTE}", disp)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


LM_ROW_NAMES = {"zero_shot": "Zero-shot", "baseline": "SFT Finetuned (CE)", "ours": "Our Method"}


def _lm_row(method: str, recs: list[dict], paper: dict, toy: bool) -> tuple[dict, dict]:
    row = {"method": method, "seeds": len(recs)}
    d = {"method": LM_ROW_NAMES.get(method, method), "n": len(recs)}
    add_stat(row, d, "mauve", "MAUVE ↑", (r.get("mauve") for r in recs), 4)
    add_stat(row, d, "self_bleu", "Self-BLEU ↓", (r.get("self_bleu") for r in recs), 4)
    if toy:
        for key, title in (("valid", "valid"), ("coverage", "modes covered"), ("tv", "TV to true modes ↓")):
            add_stat(row, d, key, title, (r.get("modes", {}).get(key) for r in recs), 3)
    p = paper.get(method, {})
    row["paper_mauve"], row["paper_self_bleu"] = p.get("mauve"), p.get("self_bleu")
    d["paper MAUVE"], d["paper Self-BLEU"] = fmt(p.get("mauve"), None, 4), fmt(p.get("self_bleu"), None, 4)
    return row, d


def lm_table(cfg: dict, results: Path, out: Path) -> pd.DataFrame:
    """Table 6: the zero-shot base, SFT with CE and with the objective; mean ± std over seeds, the paper beside, a
    row for the human responses' own Self-BLEU, and (toy) the modes of the generations."""
    from varup.config.lmplan import is_toy, lm_runs

    toy = is_toy(cfg)
    paper = {e["method"]: e for e in paper_results().get("table6", [])}
    by_method: dict[str, list[dict]] = {}
    for r in lm_runs(cfg):
        by_method.setdefault(r.method, []).append(read_json(results / r.path / "scores.json"))
    rows, disp = zip(*(_lm_row(m, recs, paper, toy) for m, recs in by_method.items()))
    recs = [x for v in by_method.values() for x in v]
    human = {"method": "human responses", "n": 1, "MAUVE ↑": MISSING,
             "Self-BLEU ↓": fmt(recs[0].get("human_self_bleu"), None, 4)}
    if toy and "human_modes" in recs[0]:
        hm = recs[0]["human_modes"]
        human.update({"valid": fmt(hm["valid"], None, 3), "modes covered": fmt(hm["coverage"], None, 3),
                      "TV to true modes ↓": fmt(hm["tv"], None, 3)})
    label = recs[0].get("mauve_features", "MAUVE")
    over = recs[0].get("config", {}).get("self_bleu_over", "all")
    caption = (f"Table 6: text generation. {label}: p = the human responses of the held-out prompts, q = the "
               f"generations ({recs[0]['n']} per set); Self-BLEU (sacrebleu BLEU-4, over "
               f"{'each prompt' + chr(39) + 's samples' if over == 'prompt' else 'all generations'}); mean ± std over "
               f"seeds (n). Paper: Qwen 1.5 on dolly-15k.")
    if toy:
        caption += (" Toy grammar: valid = responses that are one of their instruction's modes; modes covered = "
                    "share of each instruction's modes produced; TV = total variation to the true mode distribution "
                    "(the human row: as many draws from the true modes, the sampling floor). The toy's responses "
                    "are short sentences from a few modes, so any set repeats itself: Self-BLEU is near 1 for every "
                    "row, the human responses included, and tells the rows apart only on long free text.")
    df = pd.DataFrame(list(rows))
    write_table(df, out, "table6", caption, pd.DataFrame([*disp, human]).fillna(MISSING))
    return df


TABLE_FUNCTIONS = {"lambda_study": lambda_study_table, "prompts": prompt_tables, "lm": lm_table}


def make_tables(cfg: dict, results: str | Path, out: str | Path, only: str | None = None) -> None:
    results, out = Path(results), Path(out)
    if only is not None:
        if only not in TABLE_FUNCTIONS:
            raise ValueError(f"--only must be one of {sorted(TABLE_FUNCTIONS)}, got {only!r}")
        df = TABLE_FUNCTIONS[only](cfg, results, out)
        log.info("%s: %d rows", only, len(df))
        return
    if uncertainty_enabled(cfg):
        uncertainty_tables(cfg, results, out)
    fns = [table2, table7, codebook_calibration, overhead, loss_references_table]
    if cfg["experiments"].get("ood"):
        fns.append(table3)
    if cfg["experiments"].get("figure4"):
        fns.append(figure4_table)
    if toy_runs(cfg):
        fns.append(toy_metrics_table)
    for fn in fns:
        df = fn(cfg, results, out)
        log.info("%s: %d rows", fn.__name__, len(df))
    from varup.report.claims import claims_table  # the claims ledger: reads the runs, and studies outside `all`

    log.info("claims: %d rows", len(claims_table(cfg, results, out)))
