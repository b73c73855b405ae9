"""Learning-rate schedules, one home for the trainers' cosine decay (the transformer's ``cosine`` schedule, the
tokenizer's and the LM fine-tuning's warm-up + cosine)."""
from __future__ import annotations

import math


def cosine(peak: float, progress: float, floor_ratio: float) -> float:
    """Half a cosine from ``peak`` at ``progress`` 0 down to ``floor_ratio * peak`` at 1 (and after: clipped)."""
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def warmup_cosine(step: int, peak: float, warmup_steps: int, steps: int, floor_ratio: float = 0.1) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up to ``peak`` over ``warmup_steps`` (the first step gets
    ``peak / warmup_steps``), then :func:`cosine` over the remaining steps down to ``floor_ratio * peak``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return cosine(peak, (step - warmup_steps) / max(1, steps - warmup_steps), floor_ratio)
