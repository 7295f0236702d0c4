"""Running gradient statistics for the distillation logs (the paper's gradient-variance argument).

Usage in a loop, after ``loss.backward()`` and before ``optimizer.step()`` of the student phase::

    meter = GradientVarianceMeter(beta=0.99)
    ...
    stats = meter.update(objective.param_groups()["student"])   # {"grad_norm", "grad_var", "grad_snr"}
    logger.log(stats)

``grad_var`` is the EMA estimate of the total variance sum_i (E[g_i^2] - E[g_i]^2) across steps, i.e. the
trace of the gradient covariance (it mixes in the drift of the parameters, so compare runs at equal beta).
"""
from __future__ import annotations

from typing import Iterable

import torch


class GradientVarianceMeter:
    """EMA of g and g^2 over a fixed list of parameters (flattened); no state outside the object."""

    def __init__(self, beta: float = 0.99):
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        self.beta = beta
        self.m1: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.count = 0

    @staticmethod
    def flat_grad(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
        gs = [p.grad.detach().reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
              for p in params]
        return torch.cat(gs).float()

    def update(self, params: Iterable[torch.nn.Parameter]) -> dict[str, float]:
        g = self.flat_grad(list(params))
        if self.m1 is None:
            self.m1, self.m2 = torch.zeros_like(g), torch.zeros_like(g)
        self.m1.mul_(self.beta).add_(g, alpha=1 - self.beta)
        self.m2.mul_(self.beta).add_(g * g, alpha=1 - self.beta)
        self.count += 1
        corr = 1 - self.beta ** self.count  # Adam-style bias correction
        m1, m2 = self.m1 / corr, self.m2 / corr
        var = (m2 - m1 * m1).clamp_min(0).sum()
        return {"grad_norm": float(g.norm()), "grad_var": float(var),
                "grad_snr": float(m1.pow(2).sum() / var.clamp_min(1e-30))}
