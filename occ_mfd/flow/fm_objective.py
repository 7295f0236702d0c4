"""Generic conditional flow matching as an :class:`~occ_mfd.engine.objective.Objective`.

Loss (Lipman et al. 2023, Eq. 23; our convention t = 0 noise): E || v(x_t, t, c) - (x1 - x0) ||^2 with
x_t = (1 - t) x0 + t x1, x0 ~ N(0, I), t ~ logit-normal (SD3). The forecaster predicts all frames but the
loss is on future frames: ``prepare`` returns only the future latents as x1 and the past inside ``cond``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from occ_mfd.engine.objective import LossOutput, Objective
from occ_mfd.flow.path import LinearPath, expand_time
from occ_mfd.flow.time_sampling import LogitNormalTime


def flow_matching_loss(
    net: Callable,
    x1: torch.Tensor,
    cond: Any,
    t: torch.Tensor,
    x0: torch.Tensor | None = None,
    drop_cond: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar FM loss. x1, x0: (B, ...); t: (B,); loss_mask broadcastable to x1 (1 = counts);
    weight: (B,) per-sample weights. Mean over counted elements (masked mean)."""
    if x0 is None:
        x0 = torch.randn_like(x1)
    ps = LinearPath().sample(x0, x1, t)
    v = net(ps.x_t, t, cond) if drop_cond is None else net(ps.x_t, t, cond, drop_cond=drop_cond)
    err = (v - ps.dx_t).pow(2)  # (B, ...)
    if weight is not None:
        err = err * expand_time(weight, err)
    if loss_mask is None:
        return err.mean()
    m = loss_mask.to(err.dtype).expand_as(err)
    return (err * m).sum() / m.sum().clamp_min(1.0)


class FlowMatchingObjective(Objective):
    """Conditional FM for ``net(x_t, t, cond, drop_cond=None) -> v``.

    ``prepare(batch)`` returns ``(x1, cond)`` or ``(x1, cond, loss_mask)``. ``cond_drop_prob``: fraction of
    samples trained unconditionally (sets ``drop_cond``) so CFG works at sampling time.
    ``weight_fn(t) -> (B,)``: optional per-sample loss weighting. The loop keeps an EMA of ``net``.
    """

    def __init__(
        self,
        net: nn.Module,
        prepare: Callable[[Any], tuple],
        *,
        time_sampler: Callable = LogitNormalTime(0.0, 1.0),
        cond_drop_prob: float = 0.0,
        weight_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        self.net = net
        self.prepare = prepare
        self.time_sampler = time_sampler
        self.cond_drop_prob = float(cond_drop_prob)
        self.weight_fn = weight_fn

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": [p for p in self.net.parameters() if p.requires_grad]}

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def forward(self, batch, phase: str = "main") -> LossOutput:
        out = self.prepare(batch)
        if len(out) not in (2, 3):
            raise ValueError("prepare(batch) must return (x1, cond) or (x1, cond, loss_mask)")
        x1, cond = out[0], out[1]
        mask = out[2] if len(out) == 3 else None
        B = x1.shape[0]
        t = self.time_sampler(B, device=x1.device).to(x1.dtype)
        drop = None
        if self.cond_drop_prob > 0:
            drop = torch.rand(B, device=x1.device) < self.cond_drop_prob
        w = self.weight_fn(t) if self.weight_fn is not None else None
        loss = flow_matching_loss(self.net, x1, cond, t, drop_cond=drop, loss_mask=mask, weight=w)
        logs = {"fm_loss": loss.detach()}
        if drop is not None:
            logs["cond_drop_frac"] = drop.float().mean()
        return LossOutput(loss=loss, logs=logs)
