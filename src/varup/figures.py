"""Every figure (PNG + PDF): sample grids (baseline vs ours on the same classes and seeds) and training curves
(loss components per scale). Inputs are the runs' ``qualitative.npz`` and ``train/metrics.jsonl``."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from varup.config import main_runs, uncertainty_enabled, uncertainty_runs  # noqa: E402
from varup.utils import atomic_path  # noqa: E402

log = logging.getLogger("varup.figures")


def save_figure(fig, out_dir: str | Path, name: str) -> None:
    for ext in ("png", "pdf"):
        with atomic_path(Path(out_dir) / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
    plt.close(fig)


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


def samples_figure(cfg: dict, results: Path, out: Path, name: str = "samples") -> None:
    first_seed = cfg["seeds"][0]
    panels = [r for r in main_runs(cfg) if r.seed == first_seed]
    groups: dict[tuple[str, int], list] = {}
    for r in panels:
        groups.setdefault((r.dataset, r.depth), []).append(r)
    rows, cols = len(groups), max(len(v) for v in groups.values())
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows + 0.6), squeeze=False)
    for i, ((dataset, depth), rs) in enumerate(groups.items()):
        for j, r in enumerate(rs):
            with np.load(results / r.path / "qualitative.npz") as z:
                imgs, labels, params = z["images"], z["labels"], json.loads(str(z["params"]))
            ax = axes[i][j]
            ax.imshow(image_grid(imgs, labels, params["n_per_class"]))
            ax.set_title(f"{dataset} d{depth} — {r.method} (seed {r.seed}, cfg {params['cfg']})", fontsize=9)
            ax.axis("off")
        for j in range(len(rs), cols):
            axes[i][j].axis("off")
    fig.suptitle("Samples: one row per class, same classes and sampling seeds for every method", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out, name)


def _curves(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def training_curves_figure(cfg: dict, results: Path, out: Path, name: str = "training_curves") -> None:
    comps = [("ce", "cross-entropy $L_{CE}$"), ("l2nd", "second-order $L_{2nd}$"), ("lse", "semantic entropy $L_{SE}$")]
    groups: dict[tuple[str, int, str], list] = {}
    for r in main_runs(cfg):
        groups.setdefault((r.dataset, r.depth, r.method), []).append(r)
    ncol = len(comps) + 2
    fig, axes = plt.subplots(len(groups), ncol, figsize=(4.3 * ncol, 2.9 * len(groups)), squeeze=False)
    for i, ((dataset, depth, method), rs) in enumerate(groups.items()):
        logs = [_curves(results / r.path / "train" / "metrics.jsonl") for r in rs]
        n = min(len(lg) for lg in logs)
        steps = np.array([rec["step"] for rec in logs[0][:n]])
        for j, (key, title) in enumerate(comps):
            ax = axes[i][j]
            arr = np.array([[rec["per_scale"][key] for rec in lg[:n]] for lg in logs])  # (seeds, n, SN)
            mean = arr.mean(0)
            cmap = plt.get_cmap("viridis", mean.shape[1])
            for k in range(mean.shape[1]):
                ax.plot(steps, mean[:, k], color=cmap(k), lw=1.2, label=f"scale {k}")
            ax.set_title(f"{dataset} d{depth} {method}: {title}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, ncol=2)
        _strength_panels(axes[i][len(comps)], axes[i][len(comps) + 1], logs, n, steps, f"{dataset} d{depth} {method}")
    fig.tight_layout()
    save_figure(fig, out, name)


def _series(logs: list[list[dict]], n: int, key: str) -> np.ndarray | None:
    """Seed mean of one logged scalar over the first n log lines, or None where a log lacks it."""
    vals = [[rec.get(key) for rec in lg[:n]] for lg in logs]
    if any(v is None for row in vals for v in row):
        return None
    return np.asarray(vals, np.float64).mean(0)


def _strength_panels(ax_g, ax_s, logs, n, steps, title: str) -> None:
    """Whether a λ can matter: each weighted regulariser's logit-gradient norm as a share of CE's (log scale; a
    baseline's are 0 and not drawn), and the predictive dispersion s beside the reference's s*."""
    for key, label, colour in (("gshare_2nd", r"$\lambda_1 L_{2nd}$", "C0"), ("gshare_se", r"$\lambda_2 L_{SE}$", "C1")):
        y = _series(logs, n, key)
        if y is not None and (y > 0).any():
            ax_g.plot(steps, np.where(y > 0, y, np.nan), color=colour, lw=1.2, label=label)
    ax_g.set_yscale("log") if ax_g.lines else ax_g.text(0.5, 0.5, "λ = 0: no regulariser in the gradient",
                                                         ha="center", va="center", fontsize=8, transform=ax_g.transAxes)
    ax_g.set_title(f"{title}: ‖∇ term‖ / ‖∇ CE‖", fontsize=9)
    ax_g.set_xlabel("step")
    ax_g.grid(alpha=0.3)
    if ax_g.lines:
        ax_g.legend(fontsize=7)
    for key, label, style in (("pred_dispersion", "model s", "-"), ("ref_dispersion", "reference s*", "--")):
        y = _series(logs, n, key)
        if y is not None:
            ax_s.plot(steps, y, "k" + style, lw=1.2, label=label)
    ax_s.set_title(f"{title}: predictive dispersion", fontsize=9)
    ax_s.set_xlabel("step")
    ax_s.grid(alpha=0.3)
    if ax_s.lines:
        ax_s.legend(fontsize=7)


def _err(g):
    """Error bars of Figure 4: the std over seeds, none (0) where a point has one seed (std None)."""
    return g["fid_std"].astype(float).fillna(0.0)


def figure4(cfg: dict, results: Path, out: Path, name: str = "figure4") -> None:
    """Figure 4: FID against lambda_2nd (a line per lambda_se), against lambda_se (a line per lambda_2nd), and
    against the CFG scale (baseline vs ours)."""
    from varup.tables import figure4_data

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
    if cfg.get("experiments", {}).get("figure4"):
        figure4(cfg, results, out)
    if uncertainty_enabled(cfg):
        uncertainty_figures(cfg, results, out)
    log.info("figures written to %s", out)


def uncertainty_figures(cfg: dict, results: Path, out: Path) -> None:
    """σ maps of the first uncertainty run of every method (same dataset, depth, seed), and the DropPath sweep."""
    from varup import uncertainty as U
    from varup.utils import read_json

    runs_ = uncertainty_runs(cfg)
    first = runs_[0]
    same = [r for r in runs_ if (r.dataset, r.depth, r.seed) == (first.dataset, first.depth, first.seed)]
    U.sigma_figure({r.method: results / r.path / "uncertainty" / "mc_dropout.npz" for r in same}, out,
                   name="mc_dropout_sigma")
    U.sweep_figure([read_json(results / r.path / "uncertainty" / "sweep_scored.json") for r in runs_], out,
                   name="droppath_sweep")
