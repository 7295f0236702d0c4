"""Learning-rate schedules as pure functions of the global step.

A schedule is a multiplier of the base learning rate. Being a function of the step alone, it needs no
state in checkpoints and resumes exactly.

* Warm-up (OccFM, EDM2-style): linear, ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (the
  first update already has a non-zero lr).
* ``"cosine"``: after warm-up, ``r + (1 - r) · ½ (1 + cos(π · p))`` with ``p = (step - W) / (S - W)``
  clipped to [0, 1], ``W`` = warm-up steps, ``S`` = max steps, ``r`` = ``min_lr_ratio`` (OccFM decays to
  0.2×). ``"constant"``: 1 after warm-up (what MFD uses).
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, max_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at global step ``step`` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    p = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
