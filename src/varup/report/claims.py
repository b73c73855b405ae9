"""The claims ledger (issue 25, item 5): one row per claim of the paper, the evidence this run produced for it, the
paper's number, and a verdict. The table ``claims``, built by the `tables` rule and shown first in the report.

Evidence is read from the result files that exist: the runs of `all` (metrics.json, train/summary.json, ood.json,
corruptions.json, mode_coverage.json) and, when present, the studies of targets outside `all`
(:data:`varup.config.claimsplan.OPTIONAL_SOURCES`: the λ study, the scaling study, the LM arm, the claim study).
Nothing is configured per dataset: on the toy the ledger fills from the toy runs, on the paper config from the real
ones.

Verdict rules (``VERDICT_NOTE``, printed under the table), with α = 1 − experiments.claims.confidence:

* a **difference claim** (a metric better with the objective than with cross-entropy): per (dataset, depth), the
  paired differences method − baseline over the training seeds both have (a seed fixes initialisation and data
  order), their mean with a two-sided Student-t interval and p (:func:`varup.base.power.paired_t`); the p-values
  of all difference claims of the ledger adjusted together (experiments.claims.correction: Holm by default, or
  Benjamini–Hochberg). **supported**: the interval excludes 0 on the paper's side and the adjusted p ≤ α; **not
  supported**: otherwise (the interval holds 0, lies on the other side, or the adjustment takes it above α);
  **not testable at this scale**: fewer than two paired seeds, or the metric cannot be computed here (the reason
  named). Each row also states the minimum detectable effect (power 0.8, level α, the observed spread of the
  differences), so a "not supported" can be read against what the design could see;
* **zero training overhead**: the per-seed ratio of seconds per step (method / baseline); **supported** when its
  t-interval lies within 1 ± experiments.claims.overhead_tolerance, otherwise **not supported** (an equivalence
  question, outside the adjusted family; wall times, so it varies between runs);
* **the scaling exponent**: α_method − α_baseline from the scaling study; **supported** when its interval lies above
  0 (a steeper power law: the same loss at fewer parameters), **not testable** without an interval;
* **λ ranges** (Fig. 4): on AFHQ (the paper's dataset) from the Figure 4 grid: **supported** when the lowest-FID
  point has 0.001 ≤ λ1 ≤ 0.003 and λ2 > 0; elsewhere **not testable at this scale** (a λ's effect depends on the
  loss scale of the model and codebook; the λ study's own verdict is quoted);
* **the frontier** (claim study): **supported** when the objective moves the quality–diversity frontier
  (:mod:`varup.base.frontier`), its mean-gain p in the adjusted family;
* **not run**: the result does not exist; the row names the target (or config key) that produces it.

The claim study's file (``claim_study/claim_study.json``, its rules are outside this module) is read by this
contract: ``{"frontier": <varup.base.frontier.compare_frontiers result>, "quality": name, "diversity": name}``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from varup.base.power import adjust, mde, paired_t
from varup.base.utils import read_json
from varup.config.claimsplan import TARGETS, present
from varup.config.plan import main_runs, mode_runs, ood_runs
from varup.report.mce import corruption_errors, mce

SUPPORTED, NOT_SUPPORTED, NOT_TESTABLE, NOT_RUN = ("supported", "not supported", "not testable at this scale",
                                                   "not run")
VERDICTS = (SUPPORTED, NOT_SUPPORTED, NOT_TESTABLE, NOT_RUN)
PAPER_DATASETS = {"afhq": "AFHQ", "imagenet100": "ImageNet-100"}


def _paper_pairs(paper: dict, key: str, fmt: str = "{:.2f}") -> str:
    """Table 2's baseline → ours per dataset and depth, e.g. 'AFHQ d16 54.59 → 46.97'."""
    rows = {(r["depth"], r["method"]): r for r in paper["table2"]}
    out = []
    for ds, name in PAPER_DATASETS.items():
        for d in (16, 20):
            out.append(f"{name} d{d} {fmt.format(rows[(d, 'baseline')][f'{ds}_{key}'])} → "
                       f"{fmt.format(rows[(d, 'ours')][f'{ds}_{key}'])}")
    return "; ".join(out)


def _t3(paper: dict, key: str) -> str:
    t3 = {r["method"]: r for r in paper["table3"]}
    return f"ImageNet {t3['baseline'][key]} → {t3['ours'][key]}"


def _t6(paper: dict, key: str) -> str:
    t6 = {r["method"]: r for r in paper["table6"]}
    return f"Qwen 1.5, dolly-15k: SFT {t6['baseline'][key]} → ours {t6['ours'][key]}"


# id: (claim, where in the paper, the paper's number, direction +1 higher / −1 lower is the paper's side, metric)
DIFFERENCE_CLAIMS: dict[str, tuple[str, str, Callable[[dict], str], int, str]] = {
    "fid": ("FID improves", "Table 2", lambda p: _paper_pairs(p, "fid"), -1, "FID"),
    "is": ("IS improves", "Table 2", lambda p: _paper_pairs(p, "is"), +1, "IS"),
    "diversity": ("more diverse samples", "Table 7", lambda p: f"ours only: SSIM diversity "
                  f"{p['table7']['ssim_diversity']}, recall {p['table7']['recall']}", +1, "SSIM diversity"),
    "mode_collapse": ("mitigates mode collapse", "Table 7, Fig. 5", lambda p: f"ours only: coverage "
                      f"{p['table7']['coverage']}; Fig. 5 qualitative", +1, "modes covered"),
    "ood_auroc": ("OOD detection improves (AUROC)", "Table 3", lambda p: _t3(p, "auroc_percent") + " %", +1,
                  "AUROC %"),
    "nll": ("likelihood improves (NLL)", "Table 3", lambda p: _t3(p, "nll"), -1, "NLL / token (nats)"),
    "mce": ("robustness to corruptions improves (mCE)", "Table 3", lambda p: _t3(p, "mce") + " (text: better)", -1,
            "mCE % (reference: baseline = 100)"),
    "mauve": ("MAUVE improves", "Table 6", lambda p: _t6(p, "mauve"), +1, "MAUVE"),
    "self_bleu": ("Self-BLEU falls (text diversity)", "Table 6", lambda p: _t6(p, "self_bleu"), -1, "Self-BLEU"),
}
# the claims that are not a paired difference of one metric (their own rules: the module docstring)
OTHER_CLAIMS: dict[str, tuple[str, str, Callable[[dict], str], int, str]] = {
    "frontier": ("more diverse without losing quality (the quality–diversity frontier)", "abstract, Sec. 4",
                 lambda p: "not measured (point comparisons only)", +1, "diversity gain at matched quality"),
    "overhead": ("zero training overhead", "Table 5", lambda p: "ImageNet-100 d16: {h} h / 200 epochs, {m} GB per GPU, "
                 "both methods".format(h=p["table5"][0]["hours_per_200_epochs"], m=p["table5"][0]["memory_per_gpu_gb"]),
                 0, "s / step, method / baseline"),
    "lambda_ranges": ("moderate λ1 (0.001 ≤ λ1 ≤ 0.003) gives the lowest FID; λ2 > 0 reduces it", "Fig. 4",
                      lambda p: "AFHQ: lowest FID at 0.001 ≤ λ1 ≤ 0.003, with λ2 > 0", 0, "FID over the λ grid"),
    "scaling": ("the objective shifts the scaling exponent (steeper)", "Sec. 4.2", lambda p: "no number given", +1,
                "α_method − α_baseline"),
}
ALL_CLAIMS = {**DIFFERENCE_CLAIMS, **OTHER_CLAIMS}
ORDER = ("fid", "is", "diversity", "mode_collapse", "frontier", "overhead", "ood_auroc", "nll", "mce", "mauve",
         "self_bleu", "lambda_ranges", "scaling")


def settings(cfg: dict) -> dict:
    c = cfg["experiments"]["claims"]
    return {**c, "alpha": 1 - c["confidence"]}


def _group_pairs(cfg: dict, runs, read: Callable[[Any], float | None]) -> dict[str, list[tuple[int, Any, Any]]]:
    """Per 'dataset dN': (seed, method's value, baseline's value) for the seeds both methods have."""
    s = settings(cfg)
    by: dict[tuple, dict[str, dict[int, Any]]] = {}
    for r in runs:
        if r.method in (s["method"], s["baseline"]):
            by.setdefault((r.dataset, r.depth), {}).setdefault(r.method, {})[r.seed] = read(r)
    out = {}
    for (ds, depth), m in by.items():
        a, b = m.get(s["method"], {}), m.get(s["baseline"], {})
        out[f"{ds} d{depth}"] = [(seed, a[seed], b[seed]) for seed in sorted(set(a) & set(b))]
    return out


def base_row(cid: str, setting: str, paper: dict) -> dict:
    """A difference claim's row with no evidence yet (verdict: not testable, until something is read)."""
    claim, where, paper_value, direction, metric = ALL_CLAIMS[cid]
    return {"claim_id": cid, "claim": claim, "paper_source": where, "paper_value": paper_value(paper),
            "setting": setting, "metric": metric, "direction": {1: "higher", -1: "lower"}.get(direction, ""), "n": 0,
            "method_mean": None, "baseline_mean": None, "diff_mean": None, "ci_low": None, "ci_high": None,
            "p": None, "mde": None, "verdict": NOT_TESTABLE, "why": ""}


def difference_row(cid: str, setting: str, pairs: list[tuple[int, Any, Any]], cfg: dict, paper: dict,
                   why_missing: str | None = None) -> dict:
    """One difference claim's row before the adjustment: the paired test of method − baseline over ``pairs``."""
    s = settings(cfg)
    row = {**base_row(cid, setting, paper), "n": len(pairs)}
    direction, metric = DIFFERENCE_CLAIMS[cid][3], DIFFERENCE_CLAIMS[cid][4]
    vals = [(a, b) for _, a, b in pairs if _num(a) and _num(b)]
    if why_missing or len(vals) < len(pairs) or not pairs:
        row["why"] = why_missing or f"{metric} is not available for every run"
        return row
    t = paired_t([a - b for a, b in vals], s["confidence"])
    row.update(method_mean=sum(a for a, _ in vals) / len(vals), baseline_mean=sum(b for _, b in vals) / len(vals),
               diff_mean=t["mean"], ci_low=_clean(t["ci_low"]), ci_high=_clean(t["ci_high"]), p=t["p"])
    if len(vals) < 2:
        row["why"] = "one paired seed: no interval (configure at least two seeds)"
        return row
    if not t["sd"] > 0:  # paired_t's p = 0 (t's limit) would call e.g. two seeds one whole mode apart beyond noise
        row.update(ci_low=None, ci_high=None, p=None)
        row["why"] = (f"the {len(vals)} paired differences are all {t['mean']:+.3g}: no spread, so no t-interval "
                      "(a t-test gives p = 0 for any such pair); configure more seeds")
        return row
    row["mde"] = mde(len(vals), t["sd"], s["alpha"])
    row["verdict"] = None  # decided after the adjustment (decide)
    row["_direction"] = direction
    return row


def decide(rows: list[dict], cfg: dict) -> list[dict]:
    """Adjust the p-values of the rows that are tested (verdict None, or a p in the family) and set their verdicts."""
    s = settings(cfg)
    family = [r for r in rows if (r.get("_direction") is not None or r.get("_family")) and r["p"] is not None]
    for r, q in zip(family, adjust([r["p"] for r in family], s["correction"])):
        r["p_adjusted"] = q
    k = len(family)
    for r in rows:
        direction = r.pop("_direction", None)
        r.setdefault("p_adjusted", None)
        if r.pop("_family", False) and r["verdict"] == SUPPORTED and (r["p_adjusted"] or 1.0) > s["alpha"]:
            r["verdict"] = NOT_SUPPORTED
            r["why"] += f"; {s['correction']}-adjusted p over {k} tests {r['p_adjusted']:.3g} > {s['alpha']:g}"
        if r["verdict"] is not None:
            continue
        side = (r["ci_low"] > 0) if direction > 0 else (r["ci_high"] < 0)
        other = (r["ci_high"] < 0) if direction > 0 else (r["ci_low"] > 0)
        padj = r["p_adjusted"] if r["p_adjusted"] is not None else 1.0
        if side and padj <= s["alpha"]:
            r["verdict"], r["why"] = SUPPORTED, (f"interval excludes 0 on the paper's side; {s['correction']}-adjusted "
                                                 f"p over {k} tests ≤ {s['alpha']:g}")
        elif side:
            r["verdict"], r["why"] = NOT_SUPPORTED, (f"interval excludes 0 on the paper's side, but the "
                                                     f"{s['correction']}-adjusted p over {k} tests is {padj:.3g} "
                                                     f"> {s['alpha']:g}")
        else:
            r["verdict"] = NOT_SUPPORTED
            r["why"] = ("beyond noise in the opposite direction" if other else "the interval holds 0") + (
                f" (an effect of {r['mde']:.3g} would be found with probability 0.8)" if r.get("mde") else "")
    return rows


def _num(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _clean(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def not_run(cid: str, setting: str, paper: dict, target: str) -> dict:
    return {**base_row(cid, setting, paper), "verdict": NOT_RUN, "why": f"no result: run {target}"}


# ------------------------------------------------------------------------------------------ readers of the runs
def _metric(results: Path, name: str, get: Callable[[dict], Any]) -> Callable:
    return lambda r: get(read_json(results / r.path / name))


def _mode_cov(results: Path) -> Callable:
    return lambda r: read_json(results / r.path / "mode_coverage.json")["coverage"]["overall"]["covered"]


def _corruption_mce(cfg: dict, results: Path, runs) -> dict[str, list[tuple[int, Any, Any]]]:
    """Per group: (seed, the method's mCE against the baseline of the same seed, 100): CE_c = Σ_s error(method) /
    Σ_s error(baseline) over the configured corruptions and severities, mCE = 100 · mean_c CE_c, the error being
    experiments.ood.corruptions.error (as Table 3, whose reference may be another method: here always the baseline)."""
    c = cfg["experiments"]["ood"]["corruptions"]

    def errors(r):
        try:
            return corruption_errors(results / r.path / "corruptions.json", c["names"], c["severities"], c["error"])[0]
        except ValueError:  # a (corruption, severity) missing: no evidence from this pair
            return None

    def mce_or_none(a, b):
        try:
            return mce(a, b)["mce"] if a is not None and b is not None else None
        except ValueError:  # non-finite errors, or a corruption the baseline never gets wrong: CE undefined
            return None

    return {g: [(seed, mce_or_none(a, b), 100.0) for seed, a, b in pairs]
            for g, pairs in _group_pairs(cfg, runs, errors).items()}


def _lm_pairs(cfg: dict, results: Path, key: str) -> dict[str, list[tuple[int, Any, Any]]]:
    s = settings(cfg)
    by: dict[str, dict[int, Any]] = {}
    for f in present(str(results), "lm"):
        method, seed = Path(f).parent.parent.name, int(Path(f).parent.name.removeprefix("seed"))
        by.setdefault(method, {})[seed] = read_json(f).get(key)
    a, b = by.get(s["method"], {}), by.get(s["baseline"], {})
    return {"LM arm": [(seed, a[seed], b[seed]) for seed in sorted(set(a) & set(b))]}


def run_evidence(cfg: dict, results: Path, paper: dict) -> list[dict]:
    """The difference claims read from the runs of `all` and the LM arm (rows before the adjustment)."""
    runs, rows = main_runs(cfg), []
    isc = _metric(results, "metrics.json", lambda m: m["fidelity"].get("isc_mean"))
    readers = {"fid": _metric(results, "metrics.json", lambda m: m["fidelity"]["fid"]), "is": isc,
               "diversity": _metric(results, "metrics.json", lambda m: m["ssim"]["ssim_diversity"])}
    for cid, read in readers.items():
        for g, pairs in _group_pairs(cfg, runs, read).items():
            why = None
            if cid == "is" and pairs and not all(_num(a) and _num(b) for _, a, b in pairs):
                why = "IS unavailable: " + str(read_json(results / runs[0].path / "metrics.json")["inception"].get(
                    "isc_unavailable_reason") or "no Inception logits")
            rows.append(difference_row(cid, g, pairs, cfg, paper, why))
    rows += _mode_collapse_rows(cfg, results, paper)
    rows += _ood_rows(cfg, results, paper)
    for cid in ("mauve", "self_bleu"):
        pairs = _lm_pairs(cfg, results, cid)["LM arm"]
        rows.append(difference_row(cid, "LM arm", pairs, cfg, paper) if pairs
                    else not_run(cid, "LM arm", paper, f"`{TARGETS['lm']}` (config lm)"))
    return rows


def _mode_collapse_rows(cfg: dict, results: Path, paper: dict) -> list[dict]:
    """Toy datasets: modes covered by the samples (mode_coverage.json); elsewhere Table 7's PRDC coverage."""
    rows, toy = [], {r.path for r in mode_runs(cfg)}
    for g, pairs in _group_pairs(cfg, [r for r in main_runs(cfg) if r.path in toy], _mode_cov(results)).items():
        rows.append(difference_row("mode_collapse", g, pairs, cfg, paper))
    other = [r for r in main_runs(cfg) if r.path not in toy]
    cov = _metric(results, "metrics.json", lambda m: m["fidelity"].get("prdc_coverage"))
    for g, pairs in _group_pairs(cfg, other, cov).items():
        row = difference_row("mode_collapse", g, pairs, cfg, paper)
        rows.append({**row, "metric": "PRDC coverage"})
    return rows


def _ood_rows(cfg: dict, results: Path, paper: dict) -> list[dict]:
    o = cfg["experiments"].get("ood")
    if not o:
        return [not_run(c, "—", paper, "`all` with experiments.ood set") for c in ("ood_auroc", "nll", "mce")]
    runs, rows = ood_runs(cfg), []
    auroc = _metric(results, "ood.json", lambda m: 100 * m["auroc"])
    nll = _metric(results, "ood.json", lambda m: m["id"]["mean_nll_per_token"])
    for cid, read in (("ood_auroc", auroc), ("nll", nll)):
        rows += [difference_row(cid, g, p, cfg, paper) for g, p in _group_pairs(cfg, runs, read).items()]
    c = o.get("corruptions") or {}
    if not c.get("enabled") or not all((results / r.path / "corruptions.json").is_file() for r in runs):
        return rows + [not_run("mce", o["dataset"], paper, "`all` with experiments.ood.corruptions.enabled")]
    return rows + [difference_row("mce", g, p, cfg, paper) for g, p in _corruption_mce(cfg, results, runs).items()]


# ------------------------------------------------------------------------------------- the claims with own rules
def overhead_rows(cfg: dict, results: Path, paper: dict) -> list[dict]:
    """Per group: the per-seed ratio of seconds per step (method / baseline) and its t-interval against 1 ± tol."""
    s, rows = settings(cfg), []
    step = _metric(results, "train/summary.json", lambda m: (m["s_per_step"], m["peak_mem_mb_per_device"]))
    tol = s["overhead_tolerance"]
    for g, pairs in _group_pairs(cfg, main_runs(cfg), step).items():
        row = {**base_row("overhead", g, paper), "n": len(pairs)}
        ratios = [a[0] / b[0] for _, a, b in pairs if a[0] and b[0]]
        mem = [a[1] / b[1] for _, a, b in pairs if a[1] and b[1]]
        t = paired_t(ratios, s["confidence"])
        row.update(method_mean=t["mean"], baseline_mean=1.0, diff_mean=t["mean"] - 1 if ratios else None,
                   ci_low=_clean(t["ci_low"]), ci_high=_clean(t["ci_high"]))
        extra = f"; peak memory ratio {sum(mem) / len(mem):.3f}" if mem else ""
        if len(ratios) < 2:
            row["why"] = "fewer than two paired seeds: no interval" + extra
        elif 1 - tol <= t["ci_low"] and t["ci_high"] <= 1 + tol:
            row.update(verdict=SUPPORTED, why=f"step-time ratio interval within 1 ± {tol:g}{extra}")
        else:
            row.update(verdict=NOT_SUPPORTED, why=f"step-time ratio interval [{t['ci_low']:.3f}, {t['ci_high']:.3f}] "
                       f"reaches beyond 1 ± {tol:g} (wall times of this machine; the regulariser's share of a step "
                       f"shrinks as the model grows){extra}")
        rows.append(row)
    return rows


def scaling_row(results: Path, paper: dict, cfg: dict) -> dict:
    files = present(str(results), "scaling")
    if not files:
        return not_run("scaling", "—", paper, f"`{TARGETS['scaling']}` (experiments.scaling)")
    st, method = read_json(files[0]), settings(cfg)["method"]
    d = st.get("differences", {}).get(method)
    row = {**base_row("scaling", f"{st.get('dataset')} d{', d'.join(st.get('sizes', []))}", paper),
           "n": min((len(v) for v in st.get("seeds", {}).values()), default=0)}
    if d is None:
        return {**row, "why": f"{files[0]} has no exponent difference for {method!r}"}
    row.update(diff_mean=d["diff"], ci_low=_clean(d["ci_low"]), ci_high=_clean(d["ci_high"]),
               method_mean=st["methods"][method]["alpha"], baseline_mean=st["methods"][st["baseline"]]["alpha"])
    if row["ci_low"] is None or not math.isfinite(row["ci_low"]):
        return {**row, "why": f"no interval ({st.get('note', st.get('interval'))})"}
    ok = row["ci_low"] > 0
    return {**row, "verdict": SUPPORTED if ok else NOT_SUPPORTED,
            "why": (f"Δα interval {'lies above' if ok else 'does not lie above'} 0 ({st.get('interval')} interval; "
                    f"not in the adjusted family: no p)")}


def lambda_row(cfg: dict, results: Path, paper: dict) -> dict:
    f4 = cfg["experiments"].get("figure4")
    if f4 and cfg["datasets"][f4["dataset"]]["kind"] == "afhq" and f4.get("lambda_2nd"):
        from varup.report.figure4 import figure4_data

        grid = figure4_data(cfg, results)
        grid = grid[(grid["study"] == "lambda") & grid["fid_mean"].notna()]
        best = grid.loc[grid["fid_mean"].idxmin()]
        ok = 0.001 <= best["lambda_2nd"] <= 0.003 and best["lambda_se"] > 0
        return {**base_row("lambda_ranges", f"{f4['dataset']} d{f4['depth']}", paper), "n": int(best["n"]),
                "method_mean": float(best["fid_mean"]), "verdict": SUPPORTED if ok else NOT_SUPPORTED,
                "why": f"lowest FID {best['fid_mean']:.2f} at λ1 {best['lambda_2nd']:g}, λ2 {best['lambda_se']:g} "
                       f"(a point estimate over the grid, no interval)"}
    files = present(str(results), "lambda_study")
    if not files:
        return not_run("lambda_ranges", "—", paper, f"`{TARGETS['lambda_study']}` (experiments.lambda_study), or "
                       "experiments.figure4 on AFHQ")
    st = read_json(files[0])
    return {**base_row("lambda_ranges", "λ study", paper), "n": len(st["points"][0]["seeds"]) if st["points"] else 0,
            "why": "the paper's λ values are tied to its loss scale on AFHQ (VAR d16, 4096 codes); the toy's λ study "
                   f"says: {st['verdict']}"}


def frontier_row(results: Path, paper: dict, cfg: dict) -> dict:
    """The claim study's frontier comparison (its p joins the adjusted family)."""
    from varup.base.frontier import MOVES, UNDETERMINED, describe

    files = present(str(results), "claim_study")
    if not files:
        return not_run("frontier", "—", paper, f"`{TARGETS['claim_study']}`")
    st = read_json(files[0])
    fr = st.get("frontier")
    row = base_row("frontier", st.get("setting", "claim study"), paper)
    if not fr:
        return {**row, "why": f"{files[0]} holds no frontier comparison"}
    m = fr.get("mean_gain") or {}
    row.update(n=fr.get("n", 0), diff_mean=m.get("mean"), ci_low=_clean(m.get("ci_low")),
               ci_high=_clean(m.get("ci_high")), p=m.get("p"),
               metric=f"{st.get('diversity', 'diversity')} at matched {st.get('quality', 'quality')}")
    text = describe(fr, st.get("quality", "quality"), st.get("diversity", "diversity"))
    if fr["verdict"] == UNDETERMINED:
        return {**row, "why": text}
    row.update(verdict=SUPPORTED if fr["verdict"] == MOVES else NOT_SUPPORTED, why=text, _family=True)
    return row


# ----------------------------------------------------------------------------------------------- the ledger
def ledger(cfg: dict, results: str | Path) -> list[dict]:
    """Every claim's rows (one per dataset and depth where the claim is read per run group), in ORDER, verdicts
    decided with the adjustment over the ledger's difference tests."""
    from varup.report.tables import paper_results

    results, paper = Path(results), paper_results()
    rows = run_evidence(cfg, results, paper) + overhead_rows(cfg, results, paper)
    rows += [frontier_row(results, paper, cfg), lambda_row(cfg, results, paper), scaling_row(results, paper, cfg)]
    rows = decide(rows, cfg)
    for cid in ORDER:  # a claim no group could read still gets its row
        if not any(r["claim_id"] == cid for r in rows):
            rows.append({**base_row(cid, "—", paper), "why": "no run group of this config reads it"})
    return sorted(rows, key=lambda r: ORDER.index(r["claim_id"]))


def _cell(v, digits: int = 3, sign: str = "") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{sign}.{digits}g}"


def display(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        ev = "—"
        if r["diff_mean"] is not None:
            ev = f"{_cell(r['diff_mean'], 3, '+')} [{_cell(r['ci_low'], 3, '+')}, {_cell(r['ci_high'], 3, '+')}]"
            if r["claim_id"] == "overhead":
                ev = f"ratio {_cell(r['method_mean'], 4)} [{_cell(r['ci_low'], 4)}, {_cell(r['ci_high'], 4)}]"
        elif r["method_mean"] is not None:
            ev = _cell(r["method_mean"], 4)
        out.append({"claim": f"{r['claim']} ({r['paper_source']})", "paper": r["paper_value"], "setting": r["setting"],
                    "measure (paper's side)": f"{r['metric']} ({r['direction']})" if r["direction"] else r["metric"],
                    "evidence: method − baseline [CI]": ev, "n": str(r["n"]),
                    "p (adjusted)": f"{_cell(r['p'], 2)} ({_cell(r.get('p_adjusted'), 2)})" if r["p"] is not None
                    else "—", "MDE (power 0.8)": _cell(r["mde"], 3), "verdict": r["verdict"], "why": r["why"]})
    return out


def verdict_note(cfg: dict) -> str:
    s = settings(cfg)
    conf = int(round(s["confidence"] * 100))
    names = {"holm": "Holm", "bh": "Benjamini–Hochberg", "none": "no"}
    return (f"Claims ledger: each claim of the paper, the evidence of this run, the paper's number and a verdict. "
            f"Difference claims: paired differences {s['method']} − {s['baseline']} over the training seeds both "
            f"have (same initialisation and data order), mean [{conf} % t-interval], two-sided paired t p, "
            f"{names[s['correction']]} adjustment over the ledger's difference tests (experiments.claims.correction); "
            f"supported = the interval excludes 0 on the paper's side and the adjusted p ≤ {s['alpha']:g}; not "
            f"supported = otherwise; not testable at this scale = under two paired seeds or the measure cannot be "
            f"computed here (why); not run = the result is absent (the target named). MDE: the mean difference the "
            f"design finds with probability 0.8 at level {s['alpha']:g}, from the observed spread. Zero overhead: "
            f"supported when the per-seed step-time ratio's interval lies within 1 ± {s['overhead_tolerance']:g} (wall "
            f"times; outside the adjusted family). Scaling: supported when Δα's interval lies above 0. λ ranges: "
            f"tested only on AFHQ's Figure 4 grid. Frontier (claim study): supported when the objective moves the "
            f"quality–diversity frontier beyond its paired interval (varup.base.frontier).")


def claims_table(cfg: dict, results: str | Path, out: str | Path):
    """Write the ``claims`` table (CSV with every field, display with the note as caption)."""
    import pandas as pd

    from varup.report.tables import write_table

    rows = ledger(cfg, results)
    df = pd.DataFrame(rows)
    write_table(df, out, "claims", verdict_note(cfg), pd.DataFrame(display(rows)))
    return df


__all__ = ["VERDICTS", "SUPPORTED", "NOT_SUPPORTED", "NOT_TESTABLE", "NOT_RUN", "ORDER", "DIFFERENCE_CLAIMS",
           "OTHER_CLAIMS", "settings", "base_row", "difference_row", "decide", "not_run", "run_evidence",
           "overhead_rows", "scaling_row", "lambda_row", "frontier_row", "ledger", "display", "verdict_note",
           "claims_table"]
