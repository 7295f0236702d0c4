"""Flow maps known in closed form, for the tests of the flow-map distillers (MeanFlow, SMF, TVM, FreeFlow).

The 1-D FM path to N(mu, sigma²) (tests/test_mfd.py's ``GaussianFlow`` is its exact velocity) has the exact flow map
    X(x, s, t) − t·mu = (r_t / r_s)·(x − s·mu),   r_τ² = (1 − τ)² + τ²σ²,
and velocity v(x, t) = mu + β(t)(x − t mu), β(t) = (tσ² − (1 − t)) / r_t², linear in x.
"""
from __future__ import annotations

import torch
from torch import nn

from test_mfd import MU, SIG, gauss_velocity


def gauss_beta(t: torch.Tensor) -> torch.Tensor:
    """β(t): the slope ∂v/∂x of the Gaussian velocity."""
    return (t * SIG ** 2 - (1 - t)) / ((1 - t) ** 2 + t ** 2 * SIG ** 2)


class GaussianMap(nn.Module):
    """u(x, s, t) = the exact average velocity (X − x)/(t − s) of the Gaussian path (v(x, s) at s = t), plus a
    constant ``offset`` c (0: exact). With an offset, X' = X + (t − s)c and ∂_t X' = ∂_t X + c."""

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(float(offset), dtype=torch.float64))

    def forward(self, x, s, t, cond=None, drop_cond=None):
        s, t = torch.as_tensor(s).expand(x.shape[0]), torch.as_tensor(t).expand(x.shape[0])
        r = lambda tau: torch.sqrt((1 - tau) ** 2 + tau ** 2 * SIG ** 2)[:, None]  # noqa: E731
        X = t[:, None] * MU + r(t) / r(s) * (x - s[:, None] * MU)
        gap = (t - s)[:, None]
        safe = torch.where(gap > 0, gap, torch.ones_like(gap))
        u = torch.where(gap > 0, (X - x) / safe, gauss_velocity(x, s, MU, SIG ** 2))
        return u + self.offset


class ConstantMap(nn.Module):
    """u(x, s, t) = p: a flow map that ignores its inputs."""

    def __init__(self, p):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p, dtype=torch.float64))

    def forward(self, x, s, t, cond=None, drop_cond=None):
        return self.p.expand_as(x)


class PointMap(nn.Module):
    """u(x, s, t) = (p − x)/(1 − s): the exact flow map toward a point mass at p, so X(x, 0, 1) = p for every x."""

    def __init__(self, p):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p, dtype=torch.float64))

    def forward(self, x, s, t, cond=None, drop_cond=None):
        s = torch.as_tensor(s, dtype=x.dtype).expand(x.shape[0])
        return (self.p - x) / (1 - s[:, None])


class NoForwardAD(torch.autograd.Function):
    """Identity with a backward but no jvp: torch.func.jvp cannot go through it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g
