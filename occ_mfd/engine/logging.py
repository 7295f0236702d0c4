"""Training logs: a progress line, ``work_dir/log.jsonl`` (machine-readable) and TensorBoard scalars.

Values are averaged per phase over each ``log_interval`` window, so a phase that runs rarely (MFD's
student, 1 step in 10) is still logged at every interval in which it ran. Only rank 0 writes. The progress
line goes to the ``logging`` logger of this module (``tools/train.py`` prints it).
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

log = logging.getLogger(__name__)


class TrainLogger:
    """``update(step, phase, scalars)`` every step; ``flush(step)`` at each log interval."""

    def __init__(self, work_dir: str | os.PathLike, max_steps: int, samples_per_step: int,
                 enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.max_steps = max_steps
        self.samples_per_step = samples_per_step
        self.jsonl = Path(work_dir) / "log.jsonl"
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(work_dir) / "tb"))
        self._sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._counts: dict[str, int] = defaultdict(int)
        self._t0 = time.perf_counter()
        self._steps_in_window = 0
        self._start_time = self._t0
        self._start_step: int | None = None

    def update(self, step: int, phase: str, scalars: dict[str, float]) -> None:
        if self._start_step is None:
            self._start_step = step
        self._steps_in_window += 1
        self._counts[phase] += 1
        for k, v in scalars.items():
            self._sums[phase][k] += float(v)

    def flush(self, step: int, extra: dict | None = None) -> None:
        """Write the averages of the window ending at ``step`` (1-based count of steps done)."""
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        rate = self._steps_in_window * self.samples_per_step / dt
        done = step - (self._start_step or 0)
        per_step = (now - self._start_time) / max(done, 1)
        eta = datetime.timedelta(seconds=int(per_step * max(self.max_steps - step, 0)))
        if self.enabled:
            for phase, sums in self._sums.items():
                means = {k: v / self._counts[phase] for k, v in sums.items()}
                rec = {"step": step, "phase": phase, "samples_per_s": rate, "time": time.time(),
                       **means, **(extra or {})}
                with open(self.jsonl, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if self.writer is not None:
                    for k, v in means.items():
                        if math.isfinite(v):
                            self.writer.add_scalar(f"{phase}/{k}", v, step)
                    self.writer.add_scalar("perf/samples_per_s", rate, step)
                log.info(f"step {step}/{self.max_steps} [{phase}] loss {means.get('loss', float('nan')):.4g} "
                           f"lr {means.get('lr', float('nan')):.3g} gnorm {means.get('grad_norm', float('nan')):.3g}"
                           f" | {rate:.1f} samples/s | ETA {eta}")
        self._sums.clear()
        self._counts.clear()
        self._steps_in_window = 0
        self._t0 = now

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at emit time (so captured or redirected output still sees it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def log_to_stdout(level: int = logging.INFO, name: str = "occ_mfd") -> None:
    """For command-line tools: print the library's log messages (``name`` and below) as plain lines on stdout.
    Idempotent: calling it again (e.g. ``main()`` twice in one process) adds no second handler."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
