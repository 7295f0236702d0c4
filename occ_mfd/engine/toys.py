"""Tiny objectives and datasets to exercise the engine (tests, smoke runs): linear regression with a
known solution, optionally noisy (uses the torch RNG, so resumption must restore it) and optionally
two-phase (MFD-like alternation of an "aux" and a "student" group)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from occ_mfd.objectives.base import LossOutput, Objective


class ToyRegressionDataset(Dataset):
    """``n`` pairs (x, y = W x) with fixed x ~ N(0, 1) and W from ``seed``: x, y are (dim,) float32."""

    collate_fn = staticmethod(default_collate)

    def __init__(self, n: int = 64, dim: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, dim, generator=g)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ self.w.T

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class _Net(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.pos_emb = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.lin(x + self.pos_emb) + 0.0 * self.norm(x).sum(-1, keepdim=True)


class ToyRegression(Objective):
    """MSE of a linear net. ``noise``: std of torch-RNG input noise. Forward calls (0-based) in
    ``[nonfinite_from, nonfinite_until)`` return a NaN loss (to test the guard; ``until`` None: forever);
    ``crash_after``: the call with that index raises (a simulated crash). ``two_phase``: ``aux`` and
    ``student`` nets and groups, ``student`` every ``ratio``-th step, EMA of the student."""

    def __init__(self, dim: int = 4, noise: float = 0.0, nonfinite_from: int | None = None,
                 nonfinite_until: int | None = None, crash_after: int | None = None,
                 two_phase: bool = False, ratio: int = 10):
        super().__init__()
        self.nonfinite_until, self.crash_after = nonfinite_until, crash_after
        self.noise, self.nonfinite_from, self.two_phase, self.ratio = noise, nonfinite_from, two_phase, ratio
        self.net = _Net(dim)
        self.aux = _Net(dim) if two_phase else None
        self.calls = 0

    def param_groups(self):
        if not self.two_phase:
            return {"main": list(self.net.parameters())}
        return {"aux": list(self.aux.parameters()), "student": list(self.net.parameters())}

    def phase(self, step: int) -> str:
        if not self.two_phase:
            return "main"
        return "student" if step % self.ratio == self.ratio - 1 else "aux"

    def ema_modules(self):
        return {"student" if self.two_phase else "net": self.net}

    def forward(self, batch, phase: str) -> LossOutput:
        x, y = batch
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise RuntimeError(f"simulated crash at forward call {self.calls}")
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        net = self.aux if phase == "aux" else self.net
        loss = (net(x) - y).pow(2).mean()
        if self.nonfinite_from is not None and self.calls >= self.nonfinite_from and (
                self.nonfinite_until is None or self.calls < self.nonfinite_until):
            loss = loss * float("nan")
        self.calls += 1
        return LossOutput(loss, {"mse": loss.detach()})
