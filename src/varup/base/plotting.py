"""Writing a matplotlib figure as PNG and PDF, atomically (shared by the report and the studies that draw)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from varup.base.utils import atomic_path  # noqa: E402


def save_figure(fig, out_dir: str | Path, name: str) -> None:
    for ext in ("png", "pdf"):
        with atomic_path(Path(out_dir) / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
    plt.close(fig)
