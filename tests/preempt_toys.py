"""Helpers of the engine tests (preemption, checkpoints), importable by the subprocesses and DDP ranks those tests start.

:class:`SignalingDataset` is the engine's toy regression data (same items) that sends signals to its own
process when a given item is fetched, so a signal reaches training at a known step, mid-stage; ``delay_s``
makes each item slow, so that a test can signal a run from outside while it trains.
"""
from __future__ import annotations

import os
import signal
import time

import torch

from occ_mfd.engine.toys import ToyRegressionDataset


class SignalingDataset(ToyRegressionDataset):
    """Fetching item number ``at_fetch`` (0-based count of ``__getitem__`` calls in this process; with batch
    size B that is the first item of step ``at_fetch // B``) sends ``signals`` (names, e.g. ["SIGTERM"]) to
    this process, ``gap_s`` apart, on rank ``rank`` only. ``delay_s``: sleep per item."""

    def __init__(self, n: int = 20, dim: int = 4, seed: int = 0, at_fetch: int | None = None,
                 signals: tuple = ("SIGTERM",), gap_s: float = 0.0, rank: int = 0, delay_s: float = 0.0):
        super().__init__(n=n, dim=dim, seed=seed)
        self.at_fetch, self.signals, self.gap_s, self.rank, self.delay_s = at_fetch, signals, gap_s, rank, delay_s
        self.fetches = 0

    def __getitem__(self, i: int):
        if self.fetches == self.at_fetch and int(os.environ.get("RANK", "0")) == self.rank:
            for k, name in enumerate(self.signals):
                if k:
                    time.sleep(self.gap_s)
                os.kill(os.getpid(), getattr(signal, name))
        self.fetches += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().__getitem__(i)


def toy_cfg(max_steps: int = 12, data: dict | None = None, **train_kw) -> dict:
    """Two phases, torch-RNG input noise, EMA, warm-up + cosine, grad clipping: everything a resume must
    restore. 20 samples / batch 4 = 5 batches per epoch, so most stops are mid-epoch. No step checkpoints
    unless asked (``ckpt_interval`` 1000) and no wall-clock ones (``ckpt_minutes`` None)."""
    return dict(data={**dict(type="preempt_toys.SignalingDataset", n=20, dim=4), **(data or {})},
                objective=dict(type="occ_mfd.engine.toys.ToyRegression", dim=4, noise=0.3, two_phase=True, ratio=3),
                optim=dict(aux=dict(lr=1e-2, weight_decay=0.05, grad_clip=0.5), student=dict(lr=2e-2)),
                train={**dict(max_steps=max_steps, batch_size=4, warmup_steps=3, ema_decay=0.99, log_interval=4,
                              ckpt_interval=1000, ckpt_minutes=None, keep_ckpts=2, tensorboard=False), **train_kw})


class CountingClock:
    """A fake clock for ``train(..., clock=)``: every reading is ``step_s`` seconds after the previous one."""

    def __init__(self, step_s: float = 1.0):
        self.t, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.t += self.step_s
        return self.t


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two training checkpoints hold the same step, weights, EMA, optimiser state and RNG (bit-exact)."""
    assert a["step"] == b["step"]
    for k, v in a["objective"].items():
        assert torch.equal(v, b["objective"][k]), k
    for name, sd in a["ema"]["shadow"]["student"].items():
        assert torch.equal(sd, b["ema"]["shadow"]["student"][name]), name
    for g in ("aux", "student"):
        for i, st in a["optimizers"][g]["state"].items():
            for key, t in st.items():
                assert torch.equal(t, b["optimizers"][g]["state"][i][key]), (g, i, key)
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
