"""Seeds derived from names and numbers (stable across processes and machines) and seeded torch generators."""
from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts, e.g. ``derive_seed(seed, 'sample', shard, batch)``."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
