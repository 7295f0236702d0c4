"""Classifier-free guidance (Ho & Salimans 2022) with cond and uncond in one batch of 2B."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


def repeat_batch(cond: Any, n: int) -> Any:
    """Tile every tensor in ``cond`` n times along dim 0 (``[c; c; ...]``, not interleaved).

    Tensors are tiled; dicts, dataclass instances, lists and tuples are recursed into (containers);
    None and other values (ints, strings, config) are returned unchanged.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        if cond.ndim == 0:
            return cond
        return cond.repeat(n, *([1] * (cond.ndim - 1)))
    if isinstance(cond, dict):
        return {k: repeat_batch(v, n) for k, v in cond.items()}
    if dataclasses.is_dataclass(cond) and not isinstance(cond, type):
        changes = {f.name: repeat_batch(getattr(cond, f.name), n) for f in dataclasses.fields(cond) if f.init}
        return dataclasses.replace(cond, **changes)
    if isinstance(cond, (list, tuple)):
        out = [repeat_batch(v, n) for v in cond]
        return type(cond)(out) if isinstance(cond, list) else tuple(out)
    return cond


def guided(net: Callable, scale: float, fused: bool = True) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
    """Return ``f(x, t, cond) = v_u + scale * (v_c - v_u)`` for ``net(x, t, cond, drop_cond)``.

    ``fused``: the conditional and unconditional passes are one forward of batch 2B with
    ``drop_cond = [False]*B + [True]*B``; otherwise two forwards of batch B (cond, then uncond), the slow
    reference the speed protocol compares against. ``scale == 1`` is a single conditional pass (no drop_cond).
    The velocity comes back in ``x``'s dtype: under autocast the network may compute in bf16, but the
    guidance combination and the solver state stay in the caller's precision (fp32).
    """
    scale = float(scale)

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if scale == 1.0:
            return net(x, t, cond).to(x.dtype)
        B = x.shape[0]
        if not fused:
            v_c = net(x, t, cond).to(x.dtype)
            v_u = net(x, t, cond, drop_cond=torch.ones(B, dtype=torch.bool, device=x.device)).to(x.dtype)
            return v_u + scale * (v_c - v_u)
        drop = torch.zeros(2 * B, dtype=torch.bool, device=x.device)
        drop[B:] = True
        v = net(torch.cat([x, x]), torch.cat([t, t]), repeat_batch(cond, 2), drop_cond=drop).to(x.dtype)
        v_c, v_u = v[:B], v[B:]
        return v_u + scale * (v_c - v_u)

    return velocity
