"""The contract between a training objective and the training loop.

An objective is an ``nn.Module`` that owns the networks it trains (and frozen ones it uses), and
computes a loss; it owns no optimiser. The loop owns optimisers (one per parameter group), AMP,
clipping, EMA, logging, checkpoints and DDP. Alternating schedules (e.g. MFD's aux:student updates)
are expressed by :meth:`phase`: at each step exactly one parameter group is updated.
:meth:`inference_parts` tells the engine what the stage's inference snapshot holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from occ_mfd.models.snapshot import InferenceParts


@dataclass
class LossOutput:
    """``loss``: scalar tensor to backpropagate. ``logs``: scalars to log (floats or 0-d tensors)."""

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class; subclasses implement :meth:`forward` and usually :meth:`param_groups`."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Optimiser name → parameters it updates. Default: every trainable parameter, under ``main``."""
        return {"main": [p for p in self.parameters() if p.requires_grad]}

    def phase(self, step: int) -> str:
        """Name of the parameter group updated at global step ``step`` (0-based)."""
        return "main"

    def ema_modules(self) -> dict[str, nn.Module]:
        """Modules whose exponential moving average the loop keeps (name → module)."""
        return {}

    def after_backward(self, phase: str) -> dict[str, float]:
        """Called by the loop after ``backward()`` and before the optimiser step; returns extra scalars to log
        (e.g. MFD's gradient-variance estimate). Must not change gradients."""
        return {}

    def portable_config(self) -> dict:
        """Overrides for this objective's config that make a checkpoint self-contained, e.g. replacing the path
        of an earlier stage's checkpoint by that stage's architecture config (its weights are in this
        objective's state_dict anyway). The loop stores ``{**cfg.objective, **portable_config()}``."""
        return {}

    def source(self) -> tuple[str, dict | None] | None:
        """The earlier stage this objective starts from, as ``(what it is, its GridSpec dict)``; the loop refuses
        data on another grid with a message naming both. None: no earlier stage."""
        return None

    def inference_parts(self) -> InferenceParts | None:
        """The networks (live modules; the engine swaps in their EMA weights) and settings that inference needs,
        written as ``<work_dir>/snapshot.pt`` with every checkpoint. None: the stage writes no snapshot."""
        return None

    def forward(self, batch, phase: str) -> LossOutput:  # noqa: D401 - the loss
        raise NotImplementedError
