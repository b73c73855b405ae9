"""Figure 4's numbers (FID over the λ grid and the CFG sweep), read from the runs' metrics files: shared by the
Figure 4 table and the figure, so that neither one's code is in the other's fingerprint."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from varup.base.utils import read_json
from varup.config.plan import Run, cfg_sweep, figure4_seeds, grid_points
from varup.report.tablefmt import mean_std


def figure4_data(cfg: dict, results: Path) -> pd.DataFrame:
    """Figure 4's numbers: FID over the lambda grid and over the CFG sweep (read, not written)."""
    f4 = cfg["experiments"]["figure4"]
    seeds = figure4_seeds(cfg)
    rows = []
    for (a, b), method in grid_points(cfg).items():
        ms = [read_json(results / Run(f4["dataset"], int(f4["depth"]), method, s).path / "metrics.json") for s in seeds]
        rows.append({"study": "lambda", "lambda_2nd": a, "lambda_se": b, "method": method, "cfg": None,
                     **_fid_point(ms)})
    sweep: dict[tuple[str, float], list] = {}
    for r, c in cfg_sweep(cfg):
        sweep.setdefault((r.method, c), []).append(read_json(results / r.path / "cfg_sweep" / f"cfg{c:g}" / "metrics.json"))
    for (method, c), ms in sweep.items():
        rows.append({"study": "cfg", "lambda_2nd": None, "lambda_se": None, "method": method, "cfg": c,
                     **_fid_point(ms)})
    return pd.DataFrame(rows)


def _fid_point(ms: list[dict]) -> dict:
    """FID mean and std (None for one run) and KID mean over the runs (seeds) of one Figure 4 point."""
    fid = mean_std(m["fidelity"]["fid"] for m in ms)
    return {"n": fid.n, "fid_mean": fid.mean, "fid_std": fid.std,
            "kid_mean": mean_std(m["fidelity"]["kid_mean"] for m in ms).mean}
