"""The learning-rate schedule of both toy pretraining recipes: linear warm-up, then cosine decay.

transformers' `get_cosine_schedule_with_warmup` / `get_cosine_with_min_lr_schedule_with_warmup`
are not the same function: their warm-up starts at 0 (factor step / warmup_steps), this one at
1 / warmup_steps (factor (step + 1) / warmup_steps), and the committed toy weights were trained
with this one, so it stays.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float = 0.0) -> float:
    """Learning-rate factor of `step`: (step + 1) / warmup_steps during the warm-up, then a
    cosine from 1 down to `floor` at `total_steps` (and `floor` after it)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return floor + (1 - floor) * cosine
