"""Every figure (PNG + PDF): sample grids (baseline vs ours on the same classes and seeds, rows named by class) and
training curves (every method overlaid per quantity). Inputs are the runs' ``qualitative.npz`` and
``train/metrics.jsonl``, and the class names in each dataset's ``tokens/meta.json``."""
from __future__ import annotations

import json
import logging
import textwrap
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

from varup.base.plotting import save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from varup.config.plan import main_runs, uncertainty_enabled, uncertainty_runs  # noqa: E402

log = logging.getLogger("varup.report.figures")


def image_grid(images: np.ndarray, labels: np.ndarray, per_class: int, pad: int = 2) -> np.ndarray:
    """(N,H,W,3) uint8 -> one image: a row per class, ``per_class`` samples per row."""
    classes = np.unique(labels)
    H, W = images.shape[1:3]
    grid = np.full((len(classes) * (H + pad) + pad, per_class * (W + pad) + pad, 3), 255, np.uint8)
    for r, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        for j, i in enumerate(idx):
            y, x = pad + r * (H + pad), pad + j * (W + pad)
            grid[y:y + H, x:x + W] = images[i]
    return grid


def class_names(results: Path, dataset: str) -> list[str] | None:
    """The dataset's class names, from its token cache's ``meta.json`` (None where there is none)."""
    meta = results / dataset / "tokens" / "meta.json"
    return json.loads(meta.read_text())["class_names"] if meta.exists() else None


def _label_rows(ax, labels: np.ndarray, names: list[str] | None, H: int, pad: int = 2) -> None:
    """Class names as y tick labels at the centre of each row of an :func:`image_grid`."""
    classes = np.unique(labels)
    ax.set_yticks([pad + r * (H + pad) + H / 2 for r in range(len(classes))])
    ax.set_yticklabels([names[c] if names is not None and c < len(names) else f"class {c}" for c in classes],
                       fontsize=8)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def samples_figure(cfg: dict, results: Path, out: Path, name: str = "samples") -> None:
    first_seed = cfg["seeds"][0]
    panels = [r for r in main_runs(cfg) if r.seed == first_seed]
    groups: dict[tuple[str, int], list] = {}
    for r in panels:
        groups.setdefault((r.dataset, r.depth), []).append(r)
    rows, cols = len(groups), max(len(v) for v in groups.values())
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 0.8, 2.6 * rows + 0.6), squeeze=False)
    for i, ((dataset, depth), rs) in enumerate(groups.items()):
        names = class_names(results, dataset)
        for j, r in enumerate(rs):
            with np.load(results / r.path / "qualitative.npz") as z:
                imgs, labels, params = z["images"], z["labels"], json.loads(str(z["params"]))
            ax = axes[i][j]
            ax.imshow(image_grid(imgs, labels, params["n_per_class"]))
            ax.set_title(f"{dataset} d{depth} — {r.method} (seed {r.seed}, cfg {params['cfg']})", fontsize=9)
            _label_rows(ax, labels, names, imgs.shape[1])
        for j in range(len(rs), cols):
            axes[i][j].axis("off")
    fig.suptitle("Samples: one row per class, same classes and sampling seeds for every method", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out, name)


def _curves(path: Path) -> dict[int, dict]:
    """A run's ``train/metrics.jsonl`` by step (a step logged twice, e.g. around a resume: its last line)."""
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return {int(r["step"]): r for r in recs}


def log_gaps(steps) -> list[tuple[int, int]]:
    """The step ranges ``(first, last)`` a log has no lines for: a stretch between two lines (or before the first,
    from step 0) longer than 1.5x the log's usual interval (the median spacing), e.g. the part a resumed job lost."""
    steps = sorted(steps)
    if len(steps) < 2:
        return []
    every = float(np.median(np.diff(steps)))
    edges = zip([0, *steps[:-1]], steps)
    return [(int(a + every), int(b - every)) for a, b in edges if b - a > 1.5 * every]


def _gap_notes(path: Path, logs: dict[int, dict], label: str) -> list[str]:
    """A warning per gap of one run's log (naming the file and the missing steps) and the figure's note for it."""
    gaps = log_gaps(logs)
    for a, b in gaps:
        log.warning("%s has no lines for steps %d-%d: the training curves show a gap there", path, a, b)
    return [f"{label}: steps {a}-{b}" for a, b in gaps]


def aligned(logs: list[dict[int, dict]], get) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values (seeds, steps)) of one logged quantity, seeds aligned by step over the union of their
    steps (no truncation to the shortest log); NaN where a seed has no value. A step missing from every log
    (spacing above 1.5x the usual log interval) gets a NaN column, so a line shows the gap instead of bridging it."""
    steps = sorted(set().union(*logs)) if logs else []
    vals = np.array([[_value(lg.get(t), get) for t in steps] for lg in logs], np.float64).reshape(len(logs), -1)
    if len(steps) > 2:
        d = np.diff(steps)
        gaps = np.flatnonzero(d > 1.5 * np.median(d))
        steps = np.insert(np.asarray(steps, np.float64), gaps + 1, np.asarray(steps)[gaps] + d[gaps] / 2)
        vals = np.insert(vals, gaps + 1, np.nan, axis=1)
    return np.asarray(steps, np.float64), vals


def _value(rec: dict | None, get) -> float:
    try:
        v = get(rec) if rec is not None else None
    except (KeyError, IndexError, TypeError):
        v = None
    return np.nan if v is None else float(v)


# one panel per quantity: (title, y label, y scale, [(line label, getter, line style)])
CURVES = [
    ("cross-entropy $L_{CE}$", "nats / token", "linear", [("", lambda r: r["ce"], "-")]),
    ("second-order term $L_{2nd}$", "$d(s, s^*)$ as in the loss (log scale)", "log", [("", lambda r: r["l2nd"], "-")]),
    ("semantic entropy $L_{SE}$", "nats / token", "linear", [("", lambda r: r["lse"], "-")]),
    ("regulariser strength", r"$\|\nabla_{logits}\,\lambda\,$term$\| \,/\, \|\nabla_{logits} L_{CE}\|$ (log)", "log",
     [(r"$\lambda_1 L_{2nd}$", lambda r: r["gshare_2nd"] or None, "-"),
      (r"$\lambda_2 L_{SE}$", lambda r: r["gshare_se"] or None, "--")]),
    ("predictive dispersion", r"$s = V\,\mathrm{Var}_v[p_v]$ (token mean)", "linear",
     [("model $s$", lambda r: r["pred_dispersion"], "-"), ("reference $s^*$", lambda r: r["ref_dispersion"], ":")]),
    ("cross-entropy per scale, finest last", "nats / token", "linear",
     [("first scale", lambda r: r["per_scale"]["ce"][0], ":"),
      ("last scale", lambda r: r["per_scale"]["ce"][-1], "-")]),
]


def _method_colours(methods) -> dict[str, str]:
    return {m: f"C{i}" for i, m in enumerate(dict.fromkeys(methods))}


def _curve_panel(ax, by_method: dict[str, list[dict[int, dict]]], colours: dict, spec) -> None:
    """Every method on one panel: per seed a thin line, the mean over the seeds present at a step a thick one."""
    title, ylabel, yscale, lines = spec
    for method, logs in by_method.items():
        for label, get, style in lines:
            steps, vals = aligned(logs, get)
            if not np.isfinite(vals).any() or (yscale == "log" and not (vals > 0).any()):
                continue
            if yscale == "log":
                vals = np.where(vals > 0, vals, np.nan)
            for v in vals if len(logs) > 1 else []:
                ax.plot(steps, v, style, color=colours[method], lw=0.7, alpha=0.45)
            with warnings.catch_warnings():  # a step no seed logged (a gap) has an empty mean: NaN, as wanted
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(vals, axis=0)
            ax.plot(steps, mean, style, color=colours[method], lw=1.6,
                    label=f"{method} (n = {len(logs)})" + (f": {label}" if label else ""))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.set_yscale(yscale)
        ax.legend(fontsize=6.5)
    else:
        ax.text(0.5, 0.5, "not logged (or 0: a baseline's λ = 0)", ha="center", va="center", fontsize=8,
                transform=ax.transAxes)


def training_curves_figure(cfg: dict, results: Path, out: Path, name: str = "training_curves") -> None:
    """Per (dataset, depth) a block of panels, one per quantity of :data:`CURVES`, with every method overlaid
    (a colour per method; thin lines: seeds, thick: their mean), seeds aligned by step."""
    groups: dict[tuple[str, int], dict[str, list]] = {}
    for r in main_runs(cfg):
        groups.setdefault((r.dataset, r.depth), {}).setdefault(r.method, []).append(r)
    colours = _method_colours(m for g in groups.values() for m in g)
    ncol = 3
    nrow = -(-len(CURVES) // ncol)
    fig, axes = plt.subplots(nrow * len(groups), ncol, figsize=(5.2 * ncol, 3.4 * nrow * len(groups)), squeeze=False)
    notes = []
    for g, ((dataset, depth), methods) in enumerate(groups.items()):
        logs = {m: [_curves(results / r.path / "train" / "metrics.jsonl") for r in rs] for m, rs in methods.items()}
        notes += [n for m, rs in methods.items() for r, lg in zip(rs, logs[m])
                  for n in _gap_notes(results / r.path / "train" / "metrics.jsonl", lg, r.path)]
        for k, spec in enumerate(CURVES):
            ax = axes[g * nrow + k // ncol][k % ncol]
            _curve_panel(ax, logs, colours, spec)
            ax.set_title(f"{dataset} d{depth}: {ax.get_title()}", fontsize=9)
        for k in range(len(CURVES), nrow * ncol):
            axes[g * nrow + k // ncol][k % ncol].axis("off")
    fig.suptitle("Training curves: thick lines the mean over the n training seeds logged at a step, thin lines each "
                 "seed; a gap is a stretch of steps no log has", fontsize=10)
    fig.tight_layout()
    if notes:
        fig.text(0.5, 0, "Logs with gaps (no lines for these steps): " + "; ".join(notes), ha="center", va="top",
                 fontsize=8, color="firebrick", wrap=True)
    save_figure(fig, out, name)


def _err(g):
    """Error bars of Figure 4: the std over seeds, none (0) where a point has one seed (std None)."""
    return g["fid_std"].astype(float).fillna(0.0)


def figure4(cfg: dict, results: Path, out: Path, name: str = "figure4") -> None:
    """Figure 4: FID against lambda_2nd (a line per lambda_se), against lambda_se (a line per lambda_2nd), and
    against the CFG scale (baseline vs ours)."""
    from varup.report.figure4 import figure4_data

    df = figure4_data(cfg, results)
    grid, sweep = df[df["study"] == "lambda"], df[df["study"] == "cfg"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for b, g in grid.groupby("lambda_se"):
        g = g.sort_values("lambda_2nd")
        ax[0].errorbar(g["lambda_2nd"], g["fid_mean"], yerr=_err(g), marker="o", capsize=2, label=f"λ2 = {b:g}")
    for a, g in grid.groupby("lambda_2nd"):
        g = g.sort_values("lambda_se")
        ax[1].errorbar(g["lambda_se"], g["fid_mean"], yerr=_err(g), marker="o", capsize=2, label=f"λ1 = {a:g}")
    for m, g in sweep.groupby("method"):
        g = g.sort_values("cfg")
        ax[2].errorbar(g["cfg"], g["fid_mean"], yerr=_err(g), marker="o", capsize=2, label=m)
    for a_, xl in zip(ax, ("λ1 (second-order weight)", "λ2 (semantic-entropy weight)", "CFG scale")):
        a_.set_xlabel(xl)
        a_.set_ylabel("FID ↓")
        a_.grid(alpha=0.3)
        a_.legend(fontsize=7)
    f4 = cfg["experiments"]["figure4"]
    fig.suptitle(f"Hyper-parameters of the objective on {f4['dataset']} (d{f4['depth']})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out, name)


def make_figures(cfg: dict, results: str | Path, out: str | Path, device: str = "auto") -> None:  # noqa: ARG001
    results, out = Path(results), Path(out)
    samples_figure(cfg, results, out)
    training_curves_figure(cfg, results, out)
    if cfg["experiments"].get("figure4"):
        figure4(cfg, results, out)
    if uncertainty_enabled(cfg):
        uncertainty_figures(cfg, results, out)
    log.info("figures written to %s", out)


def uncertainty_figures(cfg: dict, results: Path, out: Path) -> None:
    """σ maps of the first uncertainty run of every method (same dataset, depth, seed), and the DropPath sweep."""
    from varup.base.utils import read_json
    from varup.report.uncertainty import sigma_figure, sweep_figure

    runs_ = uncertainty_runs(cfg)
    first = runs_[0]
    same = [r for r in runs_ if (r.dataset, r.depth, r.seed) == (first.dataset, first.depth, first.seed)]
    sigma_figure({r.method: results / r.path / "uncertainty" / "mc_dropout.npz" for r in same}, out,
                   name="mc_dropout_sigma", class_names=class_names(results, first.dataset))
    sweep_figure([read_json(results / r.path / "uncertainty" / "sweep_scored.json") for r in runs_], out,
                   name="droppath_sweep")


def short_label(e: Mapping[str, Any]) -> str:
    if e["study"] == "droppath":
        return f"DropPath {e['rate']:g}"
    return e["prompt"].replace(" or ", " | ").replace(" background", "").replace(" on a ", ", ")


def prompt_sigma_figure(runs: Sequence[tuple[str, Mapping[str, Any], Mapping[str, np.ndarray]]], out_dir,
                        name: str = "prompt_sigma") -> float:
    """PNG + PDF: per run (a label, its sets.json record, its sigma.npz) two rows over the prompt sets: the mean
    image of the MC-Dropout passes and the σ map, all σ maps on one colour scale (with a colourbar); a set the
    family cannot take is left blank. Returns the colour scale's maximum."""
    sets = runs[0][1]["sets"]
    stem = [e["set"][:-4] for e in sets]
    vmax = max([float(z[f"{k}_sigma"].max()) for _, _, z in runs for k in stem if f"{k}_sigma" in z] or [1e-6])
    fig, axes = plt.subplots(2 * len(runs), len(sets), figsize=(1.15 * len(sets) + 0.9, 2.3 * len(runs) + 0.6),
                             squeeze=False)
    im = None
    for r, (label, _, z) in enumerate(runs):
        for c, (k, e) in enumerate(zip(stem, sets)):
            top, bottom = axes[2 * r][c], axes[2 * r + 1][c]
            if f"{k}_sigma" in z:
                top.imshow(np.clip(np.transpose(z[f"{k}_mean"], (1, 2, 0)), 0, 1))
                im = bottom.imshow(z[f"{k}_sigma"], cmap="magma", vmin=0, vmax=vmax)
            else:  # the class-conditional VAR cannot take this prompt
                for ax in (top, bottom):
                    ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=7, color="0.5",
                            transform=ax.transAxes)
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
            if r == 0:
                top.set_title(textwrap.fill(short_label(e), 14), fontsize=6)
        axes[2 * r][0].set_ylabel(f"{label}\nmean", fontsize=7)
        axes[2 * r + 1][0].set_ylabel("σ", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.5, label="σ (pixel std over passes)")
    save_figure(fig, out_dir, name)
    plt.close(fig)
    return vmax


def prompt_figures(cfg: dict, results: str | Path, out: str | Path) -> None:
    """The prompt study's σ figure (:func:`varup.studies.prompts.prompt_sigma_figure`): every study run of the first seed."""
    from varup.base.utils import read_json
    from varup.config.textplan import FAMILY_NAMES, study_runs

    results = Path(results)
    runs_ = [r for r in study_runs(cfg) if r.seed == study_runs(cfg)[0].seed]
    panels = []
    for r in runs_:
        d = results / r.path / "prompts"
        with np.load(d / "sigma.npz") as z:
            panels.append((f"{FAMILY_NAMES[r.family]} {r.method}", read_json(d / "sets.json"),
                           {k: z[k] for k in z.files}))
    vmax = prompt_sigma_figure(panels, out, name="prompt_sigma")
    log.info("prompt σ figure: %d runs, σ scale 0..%.3f", len(panels), vmax)


# ---------------------------------------------------------------------------------------- LM arm
LM_CURVES = [("SFT cross-entropy $L_{CE}$ (response tokens)", "nats / token", "linear", [("", lambda r: r["ce"], "-")]),
             ("predictive entropy", "nats / token", "linear", [("", lambda r: r["pred_entropy"], "-")])]


def _mode_panel(ax, text: str, by_method: dict[str, list[dict]], colours: dict, train_freq: list | None) -> None:
    """One instruction: the true mode probabilities (the training sample's shares as ticks) and each method's
    generated frequencies (mean over seeds)."""
    first = next(iter(by_method.values()))[0]["modes"]["per_instruction"][text]
    k = len(first["true"])
    width = 0.8 / (len(by_method) + 1)
    x = np.arange(k)
    ax.bar(x, first["true"], width, color="0.6", label="true")
    if train_freq is not None:
        ax.plot(x, train_freq, "k_", ms=9, mew=1.5, label="SFT training sample")
    for i, (method, recs) in enumerate(by_method.items(), 1):
        f = np.mean([r["modes"]["per_instruction"][text]["freq"] for r in recs], axis=0)
        ax.bar(x + i * width, f, width, color=colours[method], label=f"{method} (n = {len(recs)})")
    ax.set_title(text, fontsize=8)
    ax.set_xticks(x + 0.4 - width / 2, [str(j) for j in range(k)], fontsize=7)
    ax.set_xlabel("mode (most to least likely)", fontsize=7)
    ax.set_ylabel("share of responses", fontsize=7)


def lm_figures(cfg: dict, results: str | Path, out: str | Path) -> None:
    """``lm_modes``: per multi-mode toy instruction, the true mode distribution beside each method's generated one
    (invalid responses are the missing mass), and the SFT curves of every method (thin: seeds, thick: mean)."""
    from varup.config.lmplan import ZERO_SHOT, is_toy, lm_runs

    results = Path(results)
    runs = lm_runs(cfg)
    scores: dict[str, list[dict]] = {}
    for r in runs:
        scores.setdefault(r.method, []).append(json.loads((results / r.path / "scores.json").read_text()))
    colours = _method_colours(scores)
    texts = ([t for t, v in next(iter(scores.values()))[0]["modes"]["per_instruction"].items() if v["modes"] > 1]
             if is_toy(cfg) else [])
    ncol = 4
    nrow = 1 + -(-len(texts) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.6 * nrow), squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    curves = {m: [_curves(results / r.path / "train" / "metrics.jsonl") for r in runs if r.method == m]
              for m in scores if m != ZERO_SHOT}
    for ax, spec in zip(axes[0], LM_CURVES):
        ax.set_visible(True)
        _curve_panel(ax, curves, colours, spec)
    corpus = results / "lm" / "corpus" / "summary.json"
    train_freq = ({i["instruction"]: i.get("train_freq") for i in json.loads(corpus.read_text())["instructions"]}
                  if texts and corpus.exists() else {})
    for ax, text in zip(axes[1:].ravel(), texts):
        ax.set_visible(True)
        _mode_panel(ax, text, scores, colours, train_freq.get(text))
    if texts:
        axes[1, 0].legend(fontsize=6)
    fig.suptitle("LM arm: SFT curves; generated vs true mode frequencies per instruction", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out, "lm_modes")
    plt.close(fig)
    log.info("LM figure: %d runs, %d instructions", len(runs), len(texts))
