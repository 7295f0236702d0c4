"""The loop contract of an aux-free distiller (CD, AYF): one parameter group, the student, updated every step.

Subclasses set ``self.teacher`` (frozen, kept in eval mode), ``self.student`` (trained, EMA'd) and call
``super().__init__()``; the gradient-variance meter is this class's.
"""
from __future__ import annotations

from torch import nn

from occ_mfd.objectives.base import Objective
from occ_mfd.objectives.grad_stats import GradientVarianceMeter


class StudentOnlyObjective(Objective):
    def __init__(self):
        super().__init__()
        self._grad_meter = GradientVarianceMeter(beta=0.99)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"student": [p for p in self.student.parameters() if p.requires_grad]}

    def phase(self, step: int) -> str:
        return "student"

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def after_backward(self, phase: str) -> dict[str, float]:
        stats = self._grad_meter.update(self.param_groups()["student"])
        return {"student_grad_var": stats["grad_var"], "student_grad_snr": stats["grad_snr"]}
