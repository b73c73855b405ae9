"""Honest table cells: one value is printed without ±, with n = 1 shown; two or more give mean ± sample std
(ddof = 1); every table module formats through varup.report.tablefmt."""
from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from varup.report.tablefmt import (
    DDOF,
    Stat,
    add_stat,
    fmt,
    fmt_stat,
    html_table,
    latex_escape,
    latex_table,
    mean_std,
    spread_note,
)


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
    from varup.report.uncertainty import droppath_table, region_table

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
    assert disp.loc[0, "σ all (dropout)"] == "0.2000" and disp.loc[0, "n"] == 1


# ------------------------------------------------------------------------------------------ tables.py
# the shape of varup.config.reporting.report_config (what the tables rule passes)
CFG = {"datasets": {"shapes": {"kind": "toy"}}, "model": {"depths": [2]}, "methods": {"baseline": {}, "ours": {}},
       "experiments": {}, "metrics": {"toy_features": {"enabled": True}}, "uncertainty": {"enabled": False}}


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _fidelity(fid):
    return {"fid": fid, "isc_mean": None, "kid_mean": fid / 1000, "precision": 0.5, "recall": 0.25, "f_score": 0.33,
            "prdc_density": 0.9, "prdc_coverage": 0.4}


def _results(tmp_path, seeds, dataset="shapes", depth=2):
    """metrics.json and toy_metrics.json of every run (FID 100 + 10 * seed, toy-FD 5 + seed) and the floor."""
    res = tmp_path / "results"
    for method in CFG["methods"]:
        for s in seeds:
            run = res / dataset / f"d{depth}" / method / f"seed{s}"
            _write(run / "metrics.json", {"fidelity": _fidelity(100.0 + 10 * s), "clean_fid": {"value": 1.0},
                                          "ssim": {"mean": 0.3 + 0.01 * s, "ssim_diversity": 0.7 - 0.01 * s},
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
    from varup.report.tables import FLOOR_METHOD, table2, toy_metrics_table

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


# ------------------------------------------------------------------------------------------ LaTeX and HTML
def test_latex_escape_specials_and_unicode():
    assert latex_escape(r"a_b 5% & #1 $x$ {y} ~ ^ \ <|>") == (r"a\_b 5\% \& \#1 \$x\$ \{y\} \textasciitilde{} "
                                                              r"\textasciicircum{} \textbackslash{} "
                                                              r"\textless{}\textbar{}\textgreater{}")
    assert latex_escape("Δ FID") == r"$\Delta$ FID" and latex_escape("0.50 ± 0.10") == r"0.50 $\pm$ 0.10"
    assert latex_escape("n ≥ 2, k ≤ 3") == r"n $\geq$ 2, k $\leq$ 3"
    assert latex_escape("σ (all)") == r"$\sigma$ (all)" and latex_escape("λ1 0.002") == r"$\lambda$1 0.002"
    assert latex_escape("FID ↓ IS ↑") == r"FID $\downarrow$ IS $\uparrow$"
    assert latex_escape("+0.1 ▲ −0.2 ▼") == r"+0.1 $\triangle$ $-$0.2 $\nabla$"
    assert latex_escape("λ1 × λ2, ∞") == r"$\lambda$1 $\times$ $\lambda$2, $\infty$"
    assert latex_escape("a — b – c") == "a --- b -- c" and latex_escape("Δ−σ") == r"$\Delta - \sigma$"
    assert latex_escape("‖∇ CE‖") == r"$\| \nabla$ CE$\|$" and latex_escape("V·Var") == r"V$\cdot$Var"
    assert latex_escape("τ, Ω, Α, ς, ά") == r"$\tau$, $\Omega$, A, $\varsigma$, $\alpha$"
    assert latex_escape("café, Ångström, ﬁne") == r"caf\'{e}, \AA{}ngstr\"{o}m, fine"
    assert latex_escape("中") == "[U+4E2D]" and latex_escape(None) == "None" and latex_escape(0.5) == "0.5"


def test_latex_escape_leaves_no_non_ascii_character():
    """Whatever a cell holds, the .tex is ASCII: pdflatex never meets a character it has no definition for."""
    chars = [chr(c) for c in range(0x20, 0x3000) if not 0xD800 <= c <= 0xDFFF]
    assert all(latex_escape(c).isascii() for c in chars)


NASTY = pd.DataFrame({"metric_name": ["Δ FID ↓", "σ_obj ≥ 0.1 & 50% #1", "λ1 × λ2 ~ ^ \\ {x}", "café — ▲ ▼ ∞ ‖∇‖"],
                      "value ±": ["1.00 ± 0.10", "−0.5 (n = 1)", None, float("nan")]})


def test_latex_table_is_a_booktabs_table_with_escaped_caption():
    tex = latex_table(NASTY, "Caption with s* = V·Var, 95 % CI & Δ", "tab:nasty_one")
    lines = tex.splitlines()
    assert lines[:5] == [r"\begin{table}", r"\centering",
                         r"\caption{Caption with s* = V$\cdot$Var, 95 \% CI \& $\Delta$}",
                         r"\label{tab:nasty_one}", r"\sbox0{\begin{tabular}{ll}"]
    assert lines[5:8] == [r"\toprule", r"metric\_name & value $\pm$ \\", r"\midrule"]
    assert lines[8] == r"$\Delta$ FID $\downarrow$ & 1.00 $\pm$ 0.10 \\"
    assert lines[10] == (r"$\lambda$1 $\times$ $\lambda$2 \textasciitilde{} \textasciicircum{} \textbackslash{} "
                         r"\{x\} & --- \\")
    assert lines[12:15] == [r"\bottomrule", r"\end{tabular}}%", r"\ifdim\wd0>\linewidth\ifdefined\resizebox"
                            r"\resizebox{\linewidth}{!}{\usebox0}\else\usebox0\fi\else\usebox0\fi"]
    assert lines[-1] == r"\end{table}" and tex.isascii()


def test_html_table_is_a_self_contained_page_with_the_caption():
    page = html_table(NASTY, "Δ vs paper <b>not bold</b>", "nasty")
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page and "<script" not in page
    assert "<caption>Δ vs paper &lt;b&gt;not bold&lt;/b&gt;</caption>" in page and "<title>nasty</title>" in page
    assert "<th>metric_name</th><th>value ±</th>" in page
    assert "<td>σ_obj ≥ 0.1 &amp; 50% #1</td>" in page and page.count("<tr>") == 5
    assert "<td>λ1 × λ2 ~ ^ \\ {x}</td><td>—</td>" in page  # None and NaN cells say "—"


def _uncertainty_results(res, dataset, depth, seeds):
    for method in CFG["methods"]:
        for s in seeds:
            u = res / dataset / f"d{depth}" / method / f"seed{s}" / "uncertainty"
            key = {"dataset": dataset, "depth": depth, "method": method, "seed": s}
            fid = {"fid": 50.0 + s, "kid_mean": 0.05, "isc_mean": None}
            _write(u / "sweep_scored.json", {**key, "rates": [{"rate": r, "mean_sigma": 0.1 + r, "fidelity": fid}
                                                             for r in (0.05, 0.1, 0.25)]})
            _write(u / "mc_dropout.json", {**key, "mean_sigma": 0.2, "region": {"available": True, "inside": 0.18,
                                                                               "outside": 0.21}})
            _write(u / "entanglement_scored.json", {**key, "mixes": [
                {"n_concepts": k, "mix": list(range(k)), "mean_sigma": 0.2 + k / 100, "fidelity": fid}
                for k in (1, 2, 4)]})


def _all_tables(tmp_path, dataset, kind, depth=2, seeds=(0, 1)):
    """table2, table7, the three uncertainty tables (and toy_metrics on the toy) written by varup.report.tables from
    synthetic run files; returns the tables directory."""
    from varup.report.tables import table2, table7, toy_metrics_table, uncertainty_tables

    cfg = {**CFG, "datasets": {dataset: {"kind": kind}}, "model": {"depths": [depth]}, "seeds": list(seeds),
           "uncertainty": {"enabled": True, "run_seeds": list(seeds)}}
    res, out = _results(tmp_path, list(seeds), dataset, depth), tmp_path / "tables"
    _uncertainty_results(res, dataset, depth, seeds)
    table2(cfg, res, out)
    table7(cfg, res, out)
    if kind == "toy":
        toy_metrics_table(cfg, res, out)
    else:
        uncertainty_tables(cfg, res, out)  # (the toy would also want mode coverage files)
    return out


def test_delta_vs_paper_only_on_the_papers_datasets(tmp_path):
    toy = _all_tables(tmp_path / "toy", "shapes", "toy")
    md2, md7 = (toy / "table2.md").read_text(), (toy / "table7.md").read_text()
    assert "Δ" not in md2.split("\n\n", 1)[1] and "FID (paper)" in md2  # the paper's column stays, as a reference
    header7 = next(ln for ln in md7.splitlines() if ln.startswith("| metric"))
    assert "paper (ours)" in header7 and "Δ" not in header7 and "| 0.32 " in md7
    assert pd.read_csv(toy / "table7.csv")["f1_minus_paper"].isna().all()

    afhq = _all_tables(tmp_path / "afhq", "afhq", "afhq", depth=16)
    t2 = pd.read_csv(afhq / "table2.csv")
    assert t2["paper_fid"].tolist() == [54.59, 46.97] and t2["fid_minus_paper"].tolist() == pytest.approx(
        [105 - 54.59, 105 - 46.97])
    assert "| +50.41 " in (afhq / "table2.md").read_text()
    md7 = (afhq / "table7.md").read_text()
    header7 = [c.strip() for c in next(ln for ln in md7.splitlines() if ln.startswith("| metric")).split("|")]
    assert "Δ afhq d16 ours − paper" in header7 and "Δ afhq d16 baseline − paper" not in header7
    f1 = next(ln for ln in md7.splitlines() if ln.startswith("| F1"))
    assert "| -0.170 " in f1  # 0.33 - 0.50
    t7 = pd.read_csv(afhq / "table7.csv").set_index("method")
    assert t7.loc["ours", "coverage_minus_paper"] == pytest.approx(0.4 - 0.45)
    assert math.isnan(t7.loc["baseline", "coverage_minus_paper"])


def test_uncertainty_tables_print_the_companion_study_beside_ours(tmp_path):
    out = _all_tables(tmp_path, "afhq", "afhq", depth=16, seeds=(0,))
    dp = pd.read_csv(out / "uncertainty_droppath.csv")
    by_rate = dp[dp["method"] == "ours"].set_index("rate")
    assert by_rate.loc[0.05, "study_fid"] == 18.54 and by_rate.loc[0.1, "study_sigma"] == 0.2107
    assert math.isnan(by_rate.loc[0.25, "study_fid"])  # the study has no rate 0.25
    md = (out / "uncertainty_droppath.md").read_text()
    row = next(ln for ln in md.splitlines() if "| ours " in ln and "| 0.1 " in ln)
    assert "| 0.2107 " in row and "| 18.98 " in row and "| 73.11 ± 1.31 " in row and "| 4.384 " in row
    assert "companion MC-Dropout study" in md and "without a difference" in md and "Δ" not in md
    ent = pd.read_csv(out / "uncertainty_entanglement.csv").set_index(["method", "concepts"])
    assert ent.loc[("ours", 2), "study_fid"] == 35.96 and math.isnan(ent.loc[("ours", 4), "study_sigma"])
    html = (out / "uncertainty_entanglement.html").read_text()
    assert "<th>σ (study)</th>" in html and "<td>31.53 ± 0.52</td>" in html
    reg = pd.read_csv(out / "uncertainty_region.csv")
    assert (reg["study_sigma_object"] == 0.1975).all() and (reg["study_sigma_background"] == 0.1993).all()
    md = (out / "uncertainty_region.md").read_text()
    assert "| 0.1975 " in md and "| 0.0018 " in md and "| 0.0300 " in md  # the study's and our background − object


def _pdflatex(tex_dir, names, doc_name, packages):
    doc = tex_dir / f"{doc_name}.tex"
    doc.write_text("\\documentclass{article}\n" + "".join(f"\\usepackage{{{p}}}\n" for p in packages)
                   + "\\begin{document}\n" + "".join(f"\\input{{{n}}}\n\\clearpage\n" for n in names)
                   + "\\end{document}\n")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tex_dir,
                       capture_output=True, text=True, timeout=120)
    return r.returncode, (tex_dir / f"{doc_name}.log").read_text(errors="replace")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not on PATH (apt-get install "
                    "texlive-latex-base texlive-latex-recommended)")
def test_every_written_table_compiles_with_pdflatex_and_booktabs(tmp_path):
    """table2, table7, toy_metrics, the three uncertainty tables, the λ study and a table of nasty cells, all
    through varup.report.tables.write_table, in one minimal article with booktabs."""
    from varup.base.utils import atomic_write_json
    from varup.report.tables import lambda_study_table, write_table
    from varup.studies.lambdastudy import summarise

    toy, afhq = _all_tables(tmp_path / "toy", "shapes", "toy"), _all_tables(tmp_path / "afhq", "afhq", "afhq", 16)
    per_run = {m: {s: {"class_error": 0.1 + 0.01 * s + d, "modes_covered": 50 + s} for s in range(3)}
               for m, d in (("baseline", 0.0), ("sum_k8", -0.05))}
    st = summarise(per_run, "baseline")
    st.update(kind="lambda_study", losses={"sum_k8": {"lambda_2nd": 0.02, "reference": "semantic_k",
                                                      "l2nd_reduction": "image_sum", "lambda_se": 0.0,
                                                      "se_direction": "minimize"}},
              metrics=[{"key": "class_error", "title": "class error ↓", "better": -1, "digits": 3}])
    atomic_write_json(afhq.parent / "results" / "lambda_study" / "lambda_study.json", st)
    lambda_study_table({}, afhq.parent / "results", afhq)
    write_table(NASTY, afhq, "nasty", "Nasty: 100 % of s* ≥ 0, τ = 0.5 & k_8 {#}", NASTY)
    for d in (toy, afhq):
        for t in d.glob("*.tex"):
            shutil.copy(t, tmp_path / f"{d.parent.name}_{t.name}")
    names = sorted(p.stem for p in tmp_path.glob("*_*.tex"))
    assert {"toy_table2", "toy_table7", "toy_toy_metrics", "afhq_uncertainty_droppath", "afhq_uncertainty_region",
            "afhq_uncertainty_entanglement", "afhq_lambda_study", "afhq_nasty"} <= set(names)
    for doc, packages in (("minimal", ["booktabs"]), ("scaled", ["booktabs", "graphicx"])):
        rc, log = _pdflatex(tmp_path, names, doc, packages)
        assert rc == 0, log[-3000:]
        assert "Missing character" not in log and (tmp_path / f"{doc}.pdf").stat().st_size > 1000
        overfull = log.count("Overfull \\hbox")
        assert overfull > 0 if doc == "minimal" else overfull == 0  # wide tables fit where graphicx is loaded
