"""The data order of a training job (the VAR trainer and the tokenizer trainer): a pure function of the step.

Its own module so that the tokenizer's code fingerprint (:mod:`varup.base.codehash`) does not take in the VAR trainer.
"""
from __future__ import annotations

import numpy as np
import torch

from varup.base.runtime import Dist
from varup.base.seeding import derive_seed


class BatchOrder:
    """Deterministic data order: a fresh permutation per epoch from (seed, epoch); the batch of a step is a pure
    function of the step, so resuming needs no sampler state. Each rank takes a contiguous slice of the global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, d: Dist):
        if batch_size % d.world:
            raise ValueError(f"global batch {batch_size} is not divisible by the {d.world} ranks")
        if n < batch_size:
            raise ValueError(f"token cache has {n} rows, fewer than one global batch ({batch_size})")
        self.n, self.B, self.seed, self.d = n, batch_size, seed, d
        self.per_epoch = n // batch_size  # drop last
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=g).numpy(), epoch
        b = self._perm[j * self.B:(j + 1) * self.B]
        per = self.B // self.d.world
        return b[self.d.rank * per:(self.d.rank + 1) * per]


__all__ = ["BatchOrder"]
