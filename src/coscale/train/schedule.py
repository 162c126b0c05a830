"""Learning-rate schedule: linear warm-up, then a cosine decay to a floor.

Step ``s`` counts optimizer steps from 0. During warm-up the rate rises linearly so that the first
step already moves (``lr * 1 / warmup``) and step ``warmup - 1`` uses the full rate; afterwards it
follows half a cosine from ``lr`` down to ``min_lr``, reaching ``min_lr`` at the last step.
The schedule is a pure function of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

from coscale.errors import ConfigError


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if warmup_steps < 0 or total_steps <= 0:
        raise ConfigError(f"need warmup_steps >= 0 and total steps > 0, got {warmup_steps}, {total_steps}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 1:
        return lr
    progress = min(1.0, (step - warmup_steps) / (decay_steps - 1))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
