"""Mean Flow Distillation (MFD, arXiv 2606.11155) as an Objective, generic over networks.

Convention (DESIGN.md): t = 0 noise, t = 1 data, x_t = (1 - t) x0 + t x1, v = x1 - x0.

* Student  G_theta(x0, c) = x0 + student(x0, t = student_time, c): one network evaluation; with
  ``student = copy(teacher)`` and ``student_time = 0`` it starts as the teacher's one-step Euler jump.
* Aux flow v_phi (init: a copy of the teacher) is trained with ordinary FM on the student's samples
  (same conditioning), so it tracks the student's distribution p_theta.
* Student update: x1 = G_theta(x0); u1, u2 ~ U(0, 1), s = min, t = max (with probability
  1 - r_not_equal_t_ratio, s := t); x_s = (1 - s) x0 + s x1; with no gradient, integrate the guided
  teacher and the aux from x_s over [s, t] by Euler (shared n, per-sample steps <= h) -> mean flows
  U_T, U_A. Surrogate (paper Eq. 20, Jacobian omission):
      L = mean((U_A - U_T).detach() * x_s)    =>    dL/dtheta = mean((U_A - U_T) * dx_s/dtheta).
  Sign: gradient descent moves x_s along U_T - U_A. A flow's velocity points toward its data
  (v = E[x1 - x0 | x_t]), so the student moves toward where the teacher's flow goes and away from
  its own samples: toward the teacher's distribution. (The authors' convention has noise at t = 1,
  v' = -v, and writes (U'_T - U'_A) * x; the same thing.) ``mean`` over all elements matches the
  authors' code; Adam makes the overall scale irrelevant.
* s = t everywhere (``r_not_equal_t_ratio = 0``) turns mean flows into instantaneous velocities:
  the VSD / Diff-Instruct baseline -- see :func:`variational_score_distillation`.

Schedule: ``phase(step)`` is "aux" for ``step % (aux_steps + student_steps) < aux_steps``, else "student":
each cycle starts with the aux updates (so the aux has tracked the current student before it is used).
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from occ_mfd.distill.grad_stats import GradientVarianceMeter
from occ_mfd.engine.objective import LossOutput, Objective
from occ_mfd.flow.fm_objective import flow_matching_loss
from occ_mfd.flow.guidance import guided
from occ_mfd.flow.path import LinearPath
from occ_mfd.flow.solver import euler_mean_velocity


class MeanFlowDistillation(Objective):
    """MFD objective. Networks obey ``net(x_t, t, cond, drop_cond=None) -> v``.

    prepare(batch) -> (x1_like, cond): x1_like (B, ...) gives the sample's shape/dtype/device (its values
    are not used), cond the conditioning. Logs per student update: ``loss`` (surrogate), ``mf_dist``
    (mean over samples of ||U_T - U_A||_2, the paper's Fig. 7), ``nfe_teacher``/``nfe_aux`` (network
    evaluations of batch size B; the guided teacher counts 2 per step), ``interval_mean``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        aux: nn.Module,
        prepare: Callable[[Any], tuple],
        *,
        cfg_scale: float = 1.0,
        ode_step: float = 0.02,
        aux_steps: int = 9,
        student_steps: int = 1,
        r_not_equal_t_ratio: float = 1.0,
        student_time: float = 0.0,
        aux_time_sampler: Callable | None = None,
    ):
        super().__init__()
        if aux_steps < 0 or student_steps < 1:
            raise ValueError(f"need aux_steps >= 0 and student_steps >= 1, got {aux_steps}, {student_steps}")
        if not 0.0 <= r_not_equal_t_ratio <= 1.0:
            raise ValueError(f"r_not_equal_t_ratio must be in [0, 1], got {r_not_equal_t_ratio}")
        if teacher is student or teacher is aux or student is aux:
            raise ValueError("teacher, student and aux must be distinct modules (deep-copy the teacher)")
        self.teacher, self.student, self.aux = teacher, student, aux
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.prepare = prepare
        self.cfg_scale = float(cfg_scale)
        self.ode_step = float(ode_step)
        self.aux_steps, self.student_steps = int(aux_steps), int(student_steps)
        self.r_not_equal_t_ratio = float(r_not_equal_t_ratio)
        self.student_time = float(student_time)
        self.aux_time_sampler = aux_time_sampler
        # Running gradient statistics of the student updates (logs only; not part of the state).
        self._grad_meter = GradientVarianceMeter(beta=0.99)

    @classmethod
    def from_teacher(cls, teacher: nn.Module, prepare: Callable, **kwargs) -> "MeanFlowDistillation":
        """Student and aux both start as deep copies of the teacher (the paper's initialisation)."""
        return cls(teacher, copy.deepcopy(teacher), copy.deepcopy(teacher), prepare, **kwargs)

    # ---------------------------------------------------------------- contract with the loop
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: dropout/norm statistics stay in inference mode
        return self

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"aux": [p for p in self.aux.parameters() if p.requires_grad],
                "student": [p for p in self.student.parameters() if p.requires_grad]}

    def phase(self, step: int) -> str:
        return "aux" if step % (self.aux_steps + self.student_steps) < self.aux_steps else "student"

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def after_backward(self, phase: str) -> dict[str, float]:
        """Student updates: running estimate of the gradient variance (the paper's stability argument)."""
        if phase != "student":
            return {}
        stats = self._grad_meter.update(self.param_groups()["student"])
        return {"student_grad_var": stats["grad_var"], "student_grad_snr": stats["grad_snr"]}

    # ---------------------------------------------------------------- pieces
    def generate(self, x0: torch.Tensor, cond: Any) -> torch.Tensor:
        """G_theta(x0, c) = x0 + student(x0, student_time, c): (B, ...) -> (B, ...)."""
        t = torch.full((x0.shape[0],), self.student_time, device=x0.device, dtype=x0.dtype)
        return x0 + self.student(x0, t, cond)

    def sample_interval(self, B: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t), each (B,): s = min(u1, u2), t = max(u1, u2); s := t with prob 1 - r_not_equal_t_ratio."""
        u = torch.rand(2, B, device=device, dtype=dtype)
        s, t = u.min(0).values, u.max(0).values
        same = torch.rand(B, device=device) >= self.r_not_equal_t_ratio
        s = torch.where(same, t, s)
        return s, t

    @torch.no_grad()
    def mean_flows(self, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Any):
        """Teacher (guided) and aux mean velocities over [s, t] from x_s: (U_T, U_A, n_substeps)."""
        teacher_v = guided(self.teacher, self.cfg_scale)
        mt = euler_mean_velocity(lambda x, tau: teacher_v(x, tau, cond), x_s, s, t, self.ode_step)
        ma = euler_mean_velocity(lambda x, tau: self.aux(x, tau, cond), x_s, s, t, self.ode_step)
        return mt.mean_velocity, ma.mean_velocity, mt.nfe

    def student_loss(self, x1: torch.Tensor, x0: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                     cond: Any) -> tuple[torch.Tensor, dict]:
        """Surrogate for given student samples x1 (with grad), noise x0 and interval; see module doc."""
        x_s = LinearPath().interpolate(x0, x1, s)  # (B, ...) carries d/dtheta through x1
        U_T, U_A, n = self.mean_flows(x_s.detach(), s, t, cond)
        diff = U_A - U_T  # (B, ...) no grad
        loss = (diff * x_s).mean()  # Eq. 20: gradient (U_A - U_T) dx_s/dtheta
        dist = diff.flatten(1).norm(dim=1).mean()
        logs = {"loss": loss.detach(), "mf_dist": dist,
                "nfe_teacher": float(n * (1 if self.cfg_scale == 1.0 else 2)), "nfe_aux": float(n),
                "interval_mean": (t - s).mean()}
        return loss, logs

    # ---------------------------------------------------------------- the loss
    def forward(self, batch, phase: str) -> LossOutput:
        x_like, cond = self.prepare(batch)[:2]
        B = x_like.shape[0]
        x0 = torch.randn_like(x_like)
        if phase == "aux":
            with torch.no_grad():
                x1 = self.generate(x0, cond)
            sampler = self.aux_time_sampler
            t = sampler(B, device=x1.device).to(x1.dtype) if sampler else torch.rand(B, device=x1.device,
                                                                                   dtype=x1.dtype)
            loss = flow_matching_loss(self.aux, x1, cond, t)  # fresh noise: the aux learns p_theta's flow
            return LossOutput(loss=loss, logs={"aux_fm_loss": loss.detach()})
        if phase == "student":
            x1 = self.generate(x0, cond)
            s, t = self.sample_interval(B, x1.device, x1.dtype)
            loss, logs = self.student_loss(x1, x0, s, t, cond)
            return LossOutput(loss=loss, logs=logs)
        raise ValueError(f"unknown phase {phase!r}; expected 'aux' or 'student'")


def variational_score_distillation(teacher, student, aux, prepare, **kwargs) -> MeanFlowDistillation:
    """VSD / Diff-Instruct baseline: MFD with s = t always (``r_not_equal_t_ratio = 0``), i.e. the
    instantaneous velocity difference v_aux(x_t, t) - v_teacher(x_t, t) replaces the mean flows."""
    if kwargs.get("r_not_equal_t_ratio", 0.0) != 0.0:
        raise ValueError("VSD is r_not_equal_t_ratio = 0; use MeanFlowDistillation for other ratios")
    kwargs["r_not_equal_t_ratio"] = 0.0
    return MeanFlowDistillation(teacher, student, aux, prepare, **kwargs)
