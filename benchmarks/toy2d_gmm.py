"""A 2-D Gaussian mixture whose flow-matching velocity is known in closed form (for benchmarks/toy2d.py).

Target p1 = sum_k pi_k N(mu_k, sigma_k^2 I), source x0 ~ N(0, I) independent of x1, path
x_t = (1 - t) x0 + t x1 (t = 0 noise). The marginal (teacher) velocity is v*(x, t) = E[x1 - x0 | x_t = x].

Derivation. Given the component k, (x0, x1, x_t) are jointly Gaussian:
    x_t | k ~ N(t mu_k, s_k^2 I),    s_k^2 = (1 - t)^2 + t^2 sigma_k^2,
    Cov(x1, x_t | k) = t sigma_k^2 I,  Cov(x0, x_t | k) = (1 - t) I.
Gaussian conditioning gives
    E[x1 | x_t = x, k] = mu_k + (t sigma_k^2 / s_k^2) (x - t mu_k),
    E[x0 | x_t = x, k] = ((1 - t) / s_k^2) (x - t mu_k),
so  E[x1 - x0 | x, k] = mu_k + ((t sigma_k^2 - (1 - t)) / s_k^2) (x - t mu_k),
and the posterior over components is w_k(x, t) ∝ pi_k N(x; t mu_k, s_k^2 I) (a softmax of log-densities):
    v*(x, t) = sum_k w_k(x, t) [ mu_k + ((t sigma_k^2 - (1 - t)) / s_k^2) (x - t mu_k) ].
Checks: t = 0 → v* = sum_k pi_k mu_k - x (= E[x1] - x0); t = 1 → v* = x (= x1 - E[x0]).
Axis-aligned anisotropic components (stds (K, 2)) follow per dimension: s_kd^2 = (1 - t)^2 + t^2 sigma_kd^2,
the coefficient is per dimension, and the log-density sums over the two dimensions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GaussianMixture2D:
    """means (K, 2), stds (K,) isotropic or (K, 2) axis-aligned, weights (K,) summing to 1."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def ring(cls, k: int = 8, radius: float = 2.0, std: float = 0.2) -> "GaussianMixture2D":
        ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
        return cls(means, torch.full((k,), std, dtype=torch.float64), torch.full((k,), 1.0 / k, dtype=torch.float64))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds2d[k] * z).float()  # (n, 2)

    @property
    def stds2d(self) -> torch.Tensor:
        """(K, 2) per-dimension stds."""
        return self.stds[:, None].expand(-1, 2) if self.stds.ndim == 1 else self.stds

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v*(x, t): x (B, 2), t (B,) -> (B, 2), computed in float64."""
        xd, td = x.double(), t.double()[:, None, None]  # (B, 2), (B, 1, 1)
        mu, sig2 = self.means[None], (self.stds2d ** 2)[None]  # (1, K, 2), (1, K, 2)
        s2 = (1 - td) ** 2 + td ** 2 * sig2  # (B, K, 2)
        diff = xd[:, None, :] - td * mu  # (B, K, 2)
        logp = torch.log(self.weights)[None] - (diff.pow(2) / (2 * s2)).sum(-1) - 0.5 * torch.log(s2).sum(-1)
        w = torch.softmax(logp, dim=1)  # (B, K)
        coef = (td * sig2 - (1 - td)) / s2  # (B, K, 2)
        per_k = mu + coef * diff  # (B, K, 2)
        return (w[..., None] * per_k).sum(1).to(x.dtype)


class ExactTeacher(nn.Module):
    """The closed-form velocity as a network ``net(x, t, cond, drop_cond=None)`` (unconditional)."""

    def __init__(self, gmm: GaussianMixture2D):
        super().__init__()
        self.gmm = gmm

    def forward(self, x, t, cond=None, drop_cond=None):
        return self.gmm.velocity(x, t)


class MLPVelocity(nn.Module):
    """Small time-conditioned MLP ``net(x, t, cond, drop_cond=None) -> v`` for 2-D toys (cond ignored)."""

    def __init__(self, hidden: int = 128, depth: int = 3, n_freq: int = 4):
        super().__init__()
        self.register_buffer("freq", torch.arange(1, n_freq + 1, dtype=torch.float32) * math.pi, persistent=False)
        layers, d = [], 2 + 1 + 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x, t, cond=None, drop_cond=None):
        tf = t[:, None] * self.freq  # (B, F)
        return self.net(torch.cat([x, t[:, None], torch.sin(tf), torch.cos(tf)], 1))


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (within-sample terms as U-statistics). a (n,2), b (m,2)."""
    a, b = a.double(), b.double()
    n, m = a.shape[0], b.shape[0]
    xy = torch.cdist(a, b).mean()
    xx = torch.cdist(a, a).sum() / (n * (n - 1))
    yy = torch.cdist(b, b).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)
