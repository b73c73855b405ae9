"""Streaming token-level calibration: negative log-likelihood and expected calibration error (ECE) of top-1
predictions, accumulated batch by batch without ever holding an N x V table beyond the current batch chunk."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

_CHUNK_ELEMENTS = 1 << 22  # float64 elements per chunk (32 MiB): rows per chunk = this // V


@dataclass
class _Acc:
    """Running sums for one group of tokens (all tokens, or one scale)."""

    n_bins: int
    nll_sum: float = 0.0
    n: int = 0
    correct: float = 0.0
    conf_sum: float = 0.0
    bin_count: np.ndarray = field(init=False)
    bin_conf: np.ndarray = field(init=False)
    bin_acc: np.ndarray = field(init=False)

    def __post_init__(self):
        self.bin_count = np.zeros(self.n_bins, dtype=np.int64)
        self.bin_conf = np.zeros(self.n_bins, dtype=np.float64)
        self.bin_acc = np.zeros(self.n_bins, dtype=np.float64)

    def add(self, nll: np.ndarray, conf: np.ndarray, correct: np.ndarray, bins: np.ndarray) -> None:
        self.nll_sum += float(nll.sum())
        self.n += len(nll)
        self.correct += float(correct.sum())
        self.conf_sum += float(conf.sum())
        self.bin_count += np.bincount(bins, minlength=self.n_bins)
        self.bin_conf += np.bincount(bins, weights=conf, minlength=self.n_bins)
        self.bin_acc += np.bincount(bins, weights=correct, minlength=self.n_bins)

    def result(self, with_bins: bool) -> dict:
        if self.n == 0:
            raise ValueError("no tokens were accumulated")
        nonempty = self.bin_count > 0
        acc_b = np.where(nonempty, self.bin_acc / np.maximum(self.bin_count, 1), 0.0)
        conf_b = np.where(nonempty, self.bin_conf / np.maximum(self.bin_count, 1), 0.0)
        ece = float((np.abs(acc_b - conf_b) * self.bin_count).sum() / self.n)
        out = {"nll": self.nll_sum / self.n, "ece": ece, "accuracy": self.correct / self.n,
               "mean_confidence": self.conf_sum / self.n, "n": self.n}
        if with_bins:
            edges = np.linspace(0.0, 1.0, self.n_bins + 1)
            out["bins"] = [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(self.bin_count[b]),
                            "confidence": float(conf_b[b]) if nonempty[b] else None,
                            "accuracy": float(acc_b[b]) if nonempty[b] else None} for b in range(self.n_bins)]
        return out


class TokenCalibration:
    """Accumulates, over batches of next-token logits, the mean NLL of the targets and the ECE of the top-1
    prediction: confidence = max softmax probability, equal-width bins (lo, hi] on [0, 1] (confidence exactly 0
    goes to the first bin), ECE = sum_b |acc_b - conf_b| * n_b / n. Optional ``scale_ids`` give the same per scale.

    Computation is float64 per chunk of rows; only O(n_bins) sums are kept across batches.
    """

    def __init__(self, n_bins: int = 15):
        if n_bins < 1:
            raise ValueError("n_bins must be >= 1")
        self.n_bins = n_bins
        self.total = _Acc(n_bins)
        self.per_scale: dict[int, _Acc] = {}
        self._with_scales: bool | None = None  # all batches must agree, else per-scale sums would be partial

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, scale_ids: torch.Tensor | None = None) -> None:
        """Add a batch: ``logits`` (n, V) float, ``targets`` (n,) long in [0, V), optional ``scale_ids`` (n,) ints."""
        if logits.dim() != 2 or targets.shape != (logits.shape[0],):
            raise ValueError(f"expected logits (n, V) and targets (n,), got {tuple(logits.shape)} and "
                             f"{tuple(targets.shape)}")
        if scale_ids is not None and scale_ids.shape != targets.shape:
            raise ValueError(f"scale_ids must have shape {tuple(targets.shape)}, got {tuple(scale_ids.shape)}")
        if self._with_scales is not None and self._with_scales != (scale_ids is not None):
            raise ValueError("scale_ids must be given for every batch or for none")
        self._with_scales = scale_ids is not None
        if targets.numel() and (targets.min() < 0 or targets.max() >= logits.shape[1]):
            raise ValueError(f"targets must lie in [0, {logits.shape[1]})")
        rows = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[1]))
        for start in range(0, logits.shape[0], rows):
            sl = slice(start, start + rows)
            self._update_chunk(logits[sl], targets[sl], None if scale_ids is None else scale_ids[sl])

    def _update_chunk(self, logits: torch.Tensor, targets: torch.Tensor, scale_ids: torch.Tensor | None) -> None:
        x = logits.detach().to(torch.float64)
        t = targets.detach().to(device=x.device, dtype=torch.long)
        lse = torch.logsumexp(x, dim=1)
        nll = (lse - x.gather(1, t[:, None]).squeeze(1)).cpu().numpy()
        top, pred = x.max(dim=1)
        conf = torch.exp(top - lse).cpu().numpy()
        correct = (pred == t).to(torch.float64).cpu().numpy()
        bins = np.clip(np.ceil(conf * self.n_bins).astype(np.int64) - 1, 0, self.n_bins - 1)
        self.total.add(nll, conf, correct, bins)
        if scale_ids is None:
            return
        sid = scale_ids.detach().cpu().numpy()
        for s in np.unique(sid):
            m = sid == s
            self.per_scale.setdefault(int(s), _Acc(self.n_bins)).add(nll[m], conf[m], correct[m], bins[m])

    def compute(self) -> dict:
        """``nll`` (mean, nats), ``ece``, ``accuracy``, ``mean_confidence``, ``n``, ``bins`` (per bin: lo, hi, count,
        mean confidence, accuracy; None for empty bins), ``n_bins``, and ``per_scale`` {scale id: same without bins}
        when scale ids were given."""
        out = self.total.result(with_bins=True)
        out["n_bins"] = self.n_bins
        if self.per_scale:
            out["per_scale"] = {s: acc.result(with_bins=False) for s, acc in sorted(self.per_scale.items())}
        return out
