"""Mean Flow Distillation (MFD, arXiv 2606.11155) as an Objective, generic over networks.

Convention (docs/design.md): t = 0 noise, t = 1 data, x_t = (1 - t) x0 + t x1, v = x1 - x0.

* Student  G_theta(x0, c) = x0 + student(x0, t = student_time, c): one network evaluation; with
  ``student = copy(teacher)`` and ``student_time = 0`` it starts as the teacher's one-step Euler jump.
* Aux flow v_phi (init: a copy of the teacher) is trained with ordinary FM on the student's samples
  (same conditioning), so it tracks the student's distribution p_theta.
* Student update: x1 = G_theta(x0); u1, u2 ~ U(0, 1), s = min, t = max (with probability
  1 - s_neq_t_ratio, s := t, see ``vsd_time``); x_s = (1 - s) n + s x1 with **fresh** noise n ~ N(0, I),
  independent of x0, as the authors' code does (happyw1nd/MFD, ``train_sana_mfd.py``: ``noise_for_Z``) and
  as the aux flow is trained: x_s is then distributed as the student's noised marginal p_theta,s, which is
  where the aux's velocity describes p_theta (``noise="coupled"``, n = x0, is kept as an ablation: it queries
  both fields off that marginal). With no gradient, integrate the guided
  teacher and the aux from x_s over [s, t] by Euler (shared n, per-sample steps <= h = ``max_substep``,
  the paper's ODE step size, Table 2) -> mean flows
  U_T, U_A. Surrogate (paper Eq. 20, Jacobian omission):
      L = mean((U_A - U_T).detach() * x_s)    =>    dL/dtheta = mean((U_A - U_T) * dx_s/dtheta).
  Sign: gradient descent moves x_s along U_T - U_A. A flow's velocity points toward its data
  (v = E[x1 - x0 | x_t]), so the student moves toward where the teacher's flow goes and away from
  its own samples: toward the teacher's distribution. (The authors' convention has noise at t = 1,
  v' = -v, and writes (U'_T - U'_A) * x; the same thing.) ``mean`` over all elements matches the
  authors' code; Adam makes the overall scale irrelevant.
* s = t everywhere (``s_neq_t_ratio = 0``) turns mean flows into instantaneous velocities: the
  VSD / Diff-Instruct baseline (Luo et al. 2023; Wang et al. 2023), with t ~ U(0, 1) (``vsd_time="uniform"``)
  and fresh noise: L = mean(sg(v_A - v_T)(x_t, t) * x_t), dL/dx1 = t (v_A - v_T). ``vsd_time="max2"`` keeps
  this project's earlier variant, t = max of two uniforms (density 2t), as an ablation.
* Precision: under autocast only the network calls run in bf16. Latents, times, noise and every solver state
  (Euler x, tau, the mean-velocity sum, the CFG combination) stay fp32, so training sees the same time
  embeddings as fp32 evaluation.

Schedule: ``phase(step)`` is "aux" for ``step % (aux_steps + student_steps) < aux_steps``, else "student":
each cycle starts with the aux updates (so the aux has tracked the current student before it is used).
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from occ_mfd.flow.guidance import guided
from occ_mfd.flow.path import LinearPath, state_dtype
from occ_mfd.flow.solver import euler_mean_velocity
from occ_mfd.objectives.base import LossOutput, Objective
from occ_mfd.objectives.flow_matching import flow_matching_loss
from occ_mfd.objectives.grad_stats import GradientVarianceMeter
from occ_mfd.objectives.occ_teacher import OccStudentStage, load_occ_teacher


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
        max_substep: float = 0.02,
        aux_steps: int = 9,
        student_steps: int = 1,
        s_neq_t_ratio: float = 1.0,
        student_time: float = 0.0,
        noise: str = "fresh",
        vsd_time: str = "uniform",
    ):
        super().__init__()
        if noise not in ("fresh", "coupled"):
            raise ValueError(f"noise must be 'fresh' (the authors') or 'coupled' (ablation), got {noise!r}")
        if vsd_time not in ("uniform", "max2"):
            raise ValueError(f"vsd_time must be 'uniform' (Diff-Instruct) or 'max2' (ablation), got {vsd_time!r}")
        if aux_steps < 0 or student_steps < 1:
            raise ValueError(f"need aux_steps >= 0 and student_steps >= 1, got {aux_steps}, {student_steps}")
        if not 0.0 <= s_neq_t_ratio <= 1.0:
            raise ValueError(f"s_neq_t_ratio must be in [0, 1], got {s_neq_t_ratio}")
        if max_substep <= 0:
            raise ValueError(f"max_substep (the paper's h) must be > 0, got {max_substep}")
        if teacher is student or teacher is aux or student is aux:
            raise ValueError("teacher, student and aux must be distinct modules (deep-copy the teacher)")
        self.teacher, self.student, self.aux = teacher, student, aux
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.prepare = prepare
        self.cfg_scale = float(cfg_scale)
        self.max_substep = float(max_substep)
        self.aux_steps, self.student_steps = int(aux_steps), int(student_steps)
        self.s_neq_t_ratio = float(s_neq_t_ratio)
        self.student_time = float(student_time)
        self.noise, self.vsd_time = noise, vsd_time
        # Running gradient statistics of the student updates (logs only; not part of the state).
        self._grad_meter = GradientVarianceMeter(beta=0.99)

    @classmethod
    def from_teacher(cls, teacher: nn.Module, prepare: Callable, **kwargs) -> "MeanFlowDistillation":
        """Student and aux both start as deep copies of the teacher (the paper's initialisation)."""
        return cls(teacher, copy.deepcopy(teacher), copy.deepcopy(teacher), prepare, **kwargs)

    @property
    def kind(self) -> str:
        """What the student is called in tables and snapshots: "vsd" when every interval is degenerate (s = t),
        else "student". The one place that decides it."""
        return "vsd" if self.s_neq_t_ratio == 0.0 else "student"

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

    def sample_interval(self, B: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t), each (B,): s = min(u1, u2), t = max(u1, u2); with prob 1 - s_neq_t_ratio a degenerate
        interval s = t = u1 ~ U(0, 1) (``vsd_time="uniform"``) or s = t = max(u1, u2) (``"max2"``)."""
        u = torch.rand(2, B, device=device, dtype=dtype)
        s, t = u.min(0).values, u.max(0).values
        same = torch.rand(B, device=device) >= self.s_neq_t_ratio
        point = u[0] if self.vsd_time == "uniform" else t
        return torch.where(same, point, s), torch.where(same, point, t)

    @torch.no_grad()
    def mean_flows(self, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Any):
        """Teacher (guided) and aux mean velocities over [s, t] from x_s: (U_T, U_A, n_substeps)."""
        teacher_v = guided(self.teacher, self.cfg_scale)
        mt = euler_mean_velocity(lambda x, tau: teacher_v(x, tau, cond), x_s, s, t, self.max_substep)
        aux_v = guided(self.aux, 1.0)  # one pass, velocity cast to the fp32 state
        ma = euler_mean_velocity(lambda x, tau: aux_v(x, tau, cond), x_s, s, t, self.max_substep)
        return mt.mean_velocity, ma.mean_velocity, mt.nfe

    def student_loss(self, x1: torch.Tensor, n: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                     cond: Any) -> tuple[torch.Tensor, dict]:
        """Surrogate for given student samples x1 (with grad), the noise n of x_s and the interval; see the
        module doc."""
        x_s = LinearPath().interpolate(n, x1, s)  # (B, ...) carries d/dtheta through x1
        U_T, U_A, n_sub = self.mean_flows(x_s.detach(), s, t, cond)
        diff = U_A - U_T  # (B, ...) no grad
        loss = (diff * x_s).mean()  # Eq. 20: gradient (U_A - U_T) dx_s/dtheta
        dist = diff.flatten(1).norm(dim=1).mean()
        logs = {"loss": loss.detach(), "mf_dist": dist,
                "nfe_teacher": float(n_sub * (1 if self.cfg_scale == 1.0 else 2)), "nfe_aux": float(n_sub),
                "interval_mean": (t - s).mean()}
        return loss, logs

    # ---------------------------------------------------------------- the loss
    def forward(self, batch, phase: str) -> LossOutput:
        x_like, cond = self.prepare(batch)[:2]
        B = x_like.shape[0]
        dtype = state_dtype(x_like.dtype)
        x0 = torch.randn(x_like.shape, device=x_like.device, dtype=dtype)
        if phase == "aux":
            with torch.no_grad():
                x1 = self.generate(x0, cond)
            t = torch.rand(B, device=x1.device, dtype=dtype)
            loss = flow_matching_loss(self.aux, x1.to(dtype), cond, t)  # fresh noise: the aux learns p_theta's flow
            return LossOutput(loss=loss, logs={"aux_fm_loss": loss.detach()})
        if phase == "student":
            x1 = self.generate(x0, cond).to(dtype)
            s, t = self.sample_interval(B, x1.device, dtype)
            n = torch.randn_like(x0) if self.noise == "fresh" else x0
            loss, logs = self.student_loss(x1, n, s, t, cond)
            return LossOutput(loss=loss, logs=logs)
        raise ValueError(f"unknown phase {phase!r}; expected 'aux' or 'student'")


def variational_score_distillation(teacher, student, aux, prepare, **kwargs) -> MeanFlowDistillation:
    """VSD / Diff-Instruct baseline: MFD with s = t always (``s_neq_t_ratio = 0``), i.e. the
    instantaneous velocity difference v_aux(x_t, t) - v_teacher(x_t, t) replaces the mean flows."""
    if kwargs.get("s_neq_t_ratio", 0.0) != 0.0:
        raise ValueError("VSD is s_neq_t_ratio = 0; use MeanFlowDistillation for other ratios")
    kwargs["s_neq_t_ratio"] = 0.0
    return MeanFlowDistillation(teacher, student, aux, prepare, **kwargs)


class OccMeanFlowDistillation(OccStudentStage, MeanFlowDistillation):
    """MFD of an OccFM teacher into a one-step student: what ``configs/*/mfd.py`` and ``vsd.py`` build.

    The teacher stage's snapshot gives the frozen teacher network (its EMA weights) and the frozen VAE; student
    and aux flow start as copies of the teacher network (the paper's initialisation), see
    :mod:`occ_mfd.objectives.occ_teacher`. The student snapshot is a one-step forecaster.

    Args:
        teacher_snapshot / teacher: the teacher stage's snapshot (file or work dir), or (in stored configs) its
            description.
        cfg_scale: guidance of the teacher inside the student update (None: the teacher's sampler value).
        max_substep, aux_steps, student_steps, s_neq_t_ratio, student_time, noise, vsd_time: see
            :class:`MeanFlowDistillation` (s_neq_t_ratio = 0 is VSD / Diff-Instruct).
        latent_cache_mb: > 0 caches the frozen VAE's latents of the training frames (every distiller takes it).
    """

    def __init__(self, teacher_snapshot: str | None = None, teacher: dict | None = None,
                 cfg_scale: float | None = None, max_substep: float = 0.02, aux_steps: int = 9,
                 student_steps: int = 1, s_neq_t_ratio: float = 1.0, student_time: float = 0.0,
                 noise: str = "fresh", vsd_time: str = "uniform", latent_cache_mb: float = 0.0):
        t = load_occ_teacher(teacher_snapshot, teacher, latent_cache_mb=latent_cache_mb)
        super().__init__(t.teacher, t.student, t.aux, t.prepare,
                         cfg_scale=t.cfg_scale if cfg_scale is None else float(cfg_scale),
                         max_substep=max_substep, aux_steps=aux_steps, student_steps=student_steps,
                         s_neq_t_ratio=s_neq_t_ratio, student_time=student_time, noise=noise,
                         vsd_time=vsd_time)
        self._remember(t)
