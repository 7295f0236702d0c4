"""Exponential moving average of model weights (EDM2 / Karras-style "power" warm-up, simplified).

After the ``n``-th update (``n`` = 0, 1, …, counted per EMA module) the shadow weights become
``s ← d·s + (1 − d)·θ`` with ``d = min(decay, (1 + n) / (10 + n))``: early on ``d`` is small, so the
average forgets the random initialisation quickly (d = 0.1, 0.18, 0.25, … → ``decay``), the usual
warm-up of timm / diffusers EMAs. Floating buffers and non-float tensors are copied, not averaged.

Only modules whose parameters were stepped are updated: the loop passes the names to update, so an EMA of
MFD's student is not "decayed" during the aux phases (its weights did not change then).
"""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copies of ``modules`` (name → module); state is plain tensors, checkpoint-friendly."""

    def __init__(self, modules: dict[str, nn.Module], decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.modules = dict(modules)
        self.decay = float(decay)
        self.shadow = {name: {k: v.detach().clone() for k, v in m.state_dict().items()}
                       for name, m in self.modules.items()}
        self.param_keys = {name: {k for k, _ in m.named_parameters()} for name, m in self.modules.items()}
        self.num_updates = {name: 0 for name in self.modules}

    def decay_at(self, n: int) -> float:
        """Decay used for the ``n``-th update (0-based)."""
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, names=None) -> None:
        """Update the shadows of ``names`` (default: all modules) from their live weights."""
        for name in (self.modules if names is None else names):
            d = self.decay_at(self.num_updates[name])
            live = self.modules[name].state_dict()
            for k, s in self.shadow[name].items():
                v = live[k].detach()
                if k in self.param_keys[name] and s.is_floating_point():
                    s.lerp_(v.to(s.dtype), 1.0 - d)  # s + (1-d)(v - s) = d·s + (1-d)·v
                else:
                    s.copy_(v)
            self.num_updates[name] += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": dict(self.num_updates),
                "shadow": {n: dict(s) for n, s in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state: module names differ: {sorted(missing)}")
        for name, sd in state["shadow"].items():
            for k, s in self.shadow[name].items():
                s.copy_(sd[k])
        self.num_updates = {k: int(v) for k, v in state["num_updates"].items()}
