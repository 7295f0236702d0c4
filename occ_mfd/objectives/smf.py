"""Stabilised MeanFlow distillation, "SMF" (arXiv 2605.17834, "Stabilizing, Scaling & Enhancing MeanFlow for
Large-scale Diffusion Distillation"): MeanFlow with a discrete-solution warm-up and trajectory distribution
alignment (``../shared/DISTILLERS.md`` §8).

[UNVERIFIED] Only the abstract and a review of the paper were available (``../shared/papers/``), no code; the
equations below are DISTILLERS.md §8's reading, in our convention (t = 0 noise, t = 1 data). The student is a
two-time flow map u_θ(x, s, t, c) (``occ_mfd.models.flow_map``), x_s = (1 − s) n + s x1 from data as in MeanFlow.

* Phase A, the warm-up (the first K_w student updates): the "discrete solution" target
      u_tgt = U_T(x_s; s, t) = the guided teacher's Euler mean velocity over [s, t], sub-steps ≤ h
  (``occ_mfd.flow.solver.euler_mean_velocity``, MFD's), with MeanFlow's adaptive L2 (§6). It contains no
  stop-gradient term of the student, the abstract's stated cause of collapse ("the MeanFlow target containing a
  stop-gradient term from an undertrained model"). No JVP, no aux.
* The switch: at K_w = ``discrete_updates`` student updates, or earlier when the phase-A residual (an EMA of
  mean ‖Δ‖²) falls below ``switch_loss_ratio`` × its first value (§8: "or when the phase-A loss falls below 0.1×
  its initial value"). With alignment on, the aux then gets ``switch_aux_updates`` = 20 aux-only updates (inside
  the loop's budget) so that it describes the current student before it is used.
* Phase B: MeanFlow's differential target (:class:`~occ_mfd.objectives.meanflow.MeanFlow`: u_tgt = v⋆ + (t − s)
  du⁻/ds by a no-grad JVP) + λ_TDA·L_TDA, the trajectory distribution alignment. For a one-step student the only
  non-trivial trajectory point is its sample x1 = X_θ(z, 0, 1), so L_TDA is DMD2's distribution-matching loss on
  x1 (§2, :meth:`DistributionMatchingDistillation.distribution_matching_loss`; TDM, arXiv 2503.06674, the seed
  paper's ref. [22], applies it per step of a K-step student) against an aux flow trained by flow matching on the
  student's one-step samples (§0.5), ``aux_steps`` aux updates per ``student_steps`` student updates.

Each part is switchable: ``discrete_updates=0`` (and ``switch_loss_ratio`` irrelevant) is "no warm-up" (study row
``smf_no_warmup``: MeanFlow + alignment), ``align_weight=0`` is "no alignment" (``smf_no_align``; no aux network is
then needed), both off is MeanFlow.

Decisions where the source is silent [UNVERIFIED]:
* Phase A uses the discrete *mean-velocity* target without student terms (DISTILLERS.md §8's default reading); the
  alternative "discretised identity" u_tgt = [Δ v_T + (t − s − Δ) u⁻(x_s + Δ v_T, s + Δ, t)]/(t − s) contains
  sg(u⁻), contradicting the abstract's rationale, and is not implemented.
* λ_TDA = 1 (both terms are self-normalised: MeanFlow's adaptive weight, DMD2's per-sample normaliser), DMD2's
  time range U(0.02, 0.98), the aux unguided, 20 aux-only updates at the switch, K_w = 25 % of the budget
  (configs / the study set it), switch ratio 0.1 on an EMA (decay 0.9) of the per-update mean ‖Δ‖² (summed per
  sample), h = the project's MFD sub-step (0.02 toys, 0.1 occupancy).
* The schedule is held in buffers (student updates, the switch, aux updates still due), so ``phase`` depends on
  the state, not only on the step; a checkpoint resumes it.

Cost per student update (§0.7, F = one student-size forward): phase A 3F + n·(guided teacher 2F); phase B MeanFlow
(5F + J) + TDA (student forward + backward 3F, guided teacher 2F, aux F), plus 4F per aux update.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from occ_mfd.flow.guidance import guided
from occ_mfd.flow.path import state_dtype
from occ_mfd.flow.solver import euler_mean_velocity
from occ_mfd.objectives.ayf import flow_map_student
from occ_mfd.objectives.base import LossOutput
from occ_mfd.objectives.dmd2 import DistributionMatchingDistillation
from occ_mfd.objectives.flow_matching import flow_matching_loss
from occ_mfd.objectives.meanflow import MeanFlow
from occ_mfd.objectives.occ_teacher import OccStudentStage, load_occ_teacher

#: Decay of the EMA of the phase-A residual that the loss-based switch compares with its first value.
SWITCH_EMA = 0.9


class StabilizedMeanFlow(MeanFlow):
    """SMF (see the module doc). ``student``: a :class:`~occ_mfd.models.flow_map.FlowMapEndpoint`; ``aux``: a velocity
    net (a teacher copy) or None when ``align_weight`` = 0; prepare(batch) -> (x1, cond) with real data x1.

    Args: discrete_updates K_w (0: no warm-up); switch_loss_ratio (0: switch only at K_w); max_substep h of the
    phase-A Euler target; align_weight λ_TDA (0: no alignment, no aux); aux_steps / student_steps: the phase-B
    aux:student schedule; switch_aux_updates aux-only updates at the switch; t_min / t_max: the TDA time range; the
    rest: see :class:`~occ_mfd.objectives.meanflow.MeanFlow`.
    """

    kind = "smf"

    def __init__(self, teacher: nn.Module, student: nn.Module, aux: nn.Module | None, prepare: Callable[[Any], tuple],
                 *, cfg_scale: float = 1.0, discrete_updates: int = 250, switch_loss_ratio: float = 0.1,
                 max_substep: float = 0.02, align_weight: float = 1.0, aux_steps: int = 4, student_steps: int = 1,
                 switch_aux_updates: int = 20, t_min: float = 0.02, t_max: float = 0.98, norm_p: float = 1.0,
                 norm_eps: float = 0.01, time_sampler: str = "fastgen_endpoint", time_mean: float | None = None,
                 time_std: float | None = None, s_neq_t_ratio: float | None = None,
                 endpoint_ratio: float | None = None, jvp: str = "auto", fd_eps: float = 1e-4):
        super().__init__(teacher, student, prepare, cfg_scale=cfg_scale, norm_p=norm_p, norm_eps=norm_eps,
                         time_sampler=time_sampler, time_mean=time_mean, time_std=time_std,
                         s_neq_t_ratio=s_neq_t_ratio, endpoint_ratio=endpoint_ratio, jvp=jvp, fd_eps=fd_eps)
        if discrete_updates < 0 or not 0.0 <= switch_loss_ratio < 1.0 or max_substep <= 0:
            raise ValueError(f"need discrete_updates >= 0, 0 <= switch_loss_ratio < 1, max_substep > 0; got "
                             f"{discrete_updates}, {switch_loss_ratio}, {max_substep}")
        if align_weight < 0 or aux_steps < 0 or student_steps < 1 or switch_aux_updates < 0:
            raise ValueError(f"need align_weight >= 0, aux_steps >= 0, student_steps >= 1, switch_aux_updates >= 0; "
                             f"got {align_weight}, {aux_steps}, {student_steps}, {switch_aux_updates}")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if align_weight > 0 and aux is None:
            raise ValueError("trajectory distribution alignment (align_weight > 0) needs an aux flow (a teacher copy)")
        if aux is not None and (aux is teacher or aux is student or aux is student.flow_map):
            raise ValueError("teacher, student and aux must be distinct modules (deep-copy the teacher)")
        self.aux = aux if align_weight > 0 else None
        self.discrete_updates, self.switch_loss_ratio = int(discrete_updates), float(switch_loss_ratio)
        self.max_substep, self.align_weight = float(max_substep), float(align_weight)
        self.aux_steps, self.student_steps = int(aux_steps), int(student_steps)
        self.switch_aux_updates, self.t_min, self.t_max = int(switch_aux_updates), float(t_min), float(t_max)
        # The schedule's state (checkpointed): student update at which phase B began (−1: still in phase A), aux
        # updates due before the next student update, phase-B student updates since the last aux block, and the
        # phase-A residual's first value and EMA (NaN: none yet).
        self.register_buffer("_switched_at", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("_aux_due", torch.tensor(0, dtype=torch.long))
        self.register_buffer("_cycle", torch.tensor(0, dtype=torch.long))
        self.register_buffer("_residual0", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("_residual_ema", torch.tensor(math.nan, dtype=torch.float64))
        if self.discrete_updates == 0:
            self._switch()

    # ---------------------------------------------------------------- contract with the loop
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups()
        if self.aux is not None:
            groups["aux"] = [p for p in self.aux.parameters() if p.requires_grad]
        return groups

    def phase(self, step: int) -> str:
        """"aux" while aux updates are due (after the switch, and ``aux_steps`` after every ``student_steps``
        phase-B student updates), else "student"; always "student" in phase A or without alignment."""
        return "aux" if self.aux is not None and int(self._aux_due) > 0 else "student"

    @property
    def in_warmup(self) -> bool:
        """Phase A (the discrete target) or not."""
        return int(self._switched_at) < 0

    @staticmethod
    def loop_steps(updates: int, discrete_updates: int, aux_steps: int, student_steps: int = 1,
                   switch_aux_updates: int = 20, align: bool = True) -> int:
        """Loop steps (aux + student) that ``updates`` student updates take when the switch happens at K_w =
        ``discrete_updates`` (not earlier by the loss ratio): the budget of a fixed-length training run. The last
        step is a student update (aux blocks due after it are not run)."""
        if not align:
            return updates
        k_w = min(discrete_updates, updates)
        b = updates - k_w                                   # phase-B student updates
        if b == 0:
            return updates
        return updates + switch_aux_updates + aux_steps * ((b - 1) // student_steps)

    # ---------------------------------------------------------------- pieces
    def _switch(self) -> None:
        self._switched_at.fill_(int(self._updates))
        if self.aux is not None:
            self._aux_due.fill_(self.switch_aux_updates)

    def target(self, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Any,
               u: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Phase A: U_T(x_s; s, t), the guided teacher's Euler mean velocity (no grad); phase B: MeanFlow's."""
        if not self.in_warmup:
            return super().target(x_s, s, t, cond, u)
        with torch.no_grad():
            teacher_v = guided(self.teacher, self.cfg_scale)
            mv = euler_mean_velocity(lambda x, tau: teacher_v(x, tau, cond), x_s, s, t, self.max_substep)
        return mv.mean_velocity, {"nfe_teacher": float(mv.nfe * (1 if self.cfg_scale == 1.0 else 2)), "nfe_jvp": 0.0}

    def _after_warmup_update(self, residual_sq: float) -> None:
        """Track the phase-A residual and switch when K_w updates are done or it fell below the ratio."""
        if math.isnan(float(self._residual0)):
            self._residual0.fill_(residual_sq)
            self._residual_ema.fill_(residual_sq)
        else:
            self._residual_ema.mul_(SWITCH_EMA).add_((1 - SWITCH_EMA) * residual_sq)
        ratio = float(self._residual_ema) / float(self._residual0) if float(self._residual0) > 0 else 0.0
        low = self.switch_loss_ratio > 0 and ratio <= self.switch_loss_ratio
        if int(self._updates) >= self.discrete_updates or low:
            self._switch()

    def alignment_loss(self, x_like: torch.Tensor, cond: Any) -> tuple[torch.Tensor, dict]:
        """λ_TDA × DMD2's loss on x1 = X_θ(z, 0, 1) (with grad) against the aux, fresh z and n, t ~ U(t_min, t_max);
        ``x_like`` (B, ...) gives the shape (its values are not used)."""
        dtype = state_dtype(x_like.dtype)
        z = torch.randn(x_like.shape, device=x_like.device, dtype=dtype)
        x1 = self.generate(z, cond).to(dtype)
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(x1.shape[0], device=x1.device, dtype=dtype)
        # DMD2's loss reads self.teacher, self.cfg_scale and self.aux, which this objective has (one home for it)
        loss, logs = DistributionMatchingDistillation.distribution_matching_loss(self, x1, torch.randn_like(z), t,
                                                                                 cond)
        return self.align_weight * loss, {"tda_loss": loss.detach(), "tda_grad_norm": logs["dm_grad_norm"],
                                          "nfe_teacher": logs["nfe_teacher"], "nfe_aux": logs["nfe_aux"]}

    # ---------------------------------------------------------------- the loss
    def forward(self, batch, phase: str = "student") -> LossOutput:
        if phase == "aux":
            if self.aux is None:
                raise ValueError("SMF without alignment (align_weight = 0) has no aux phase")
            x_like, cond = self.prepare(batch)[:2]
            dtype = state_dtype(x_like.dtype)
            with torch.no_grad():
                x1 = self.generate(torch.randn(x_like.shape, device=x_like.device, dtype=dtype), cond).to(dtype)
            t = torch.rand(x1.shape[0], device=x1.device, dtype=dtype)
            loss = flow_matching_loss(self.aux, x1, cond, t)      # fresh noise: the aux learns the student's flow
            self._aux_due.fill_(max(0, int(self._aux_due) - 1))
            return LossOutput(loss=loss, logs={"aux_fm_loss": loss.detach()})
        if phase != "student":
            raise ValueError(f"unknown phase {phase!r}; expected 'aux' or 'student'")
        warm = self.in_warmup
        x1, cond = self.prepare(batch)[:2]
        loss, logs = self.flow_map_loss(x1, cond)                 # counts the update
        logs.update(mf_loss=loss.detach(), warmup_phase=float(warm))
        if warm:
            self._after_warmup_update(float(logs["residual_sq"]))
        elif self.aux is not None:
            tda, tda_logs = self.alignment_loss(x1, cond)
            loss = loss + tda
            logs.update(tda_logs, nfe_teacher=logs["nfe_teacher"] + tda_logs["nfe_teacher"], nfe_student=2.0,
                        loss=loss.detach())
            self._cycle.add_(1)
            if int(self._cycle) >= self.student_steps:
                self._cycle.zero_()
                self._aux_due.fill_(self.aux_steps)
        return LossOutput(loss=loss, logs=logs)


class OccStabilizedMeanFlow(OccStudentStage, StabilizedMeanFlow):
    """SMF of an OccFM teacher into a flow map: what ``configs/*/smf.py`` build (snapshot kind "smf").

    Args: teacher_snapshot / teacher; cfg_scale (None: the teacher's sampler CFG); latent_cache_mb; the rest: see
    :class:`StabilizedMeanFlow`. The aux is a copy of the teacher, built only when ``align_weight`` > 0.
    """

    def __init__(self, teacher_snapshot: str | None = None, teacher: dict | None = None,
                 cfg_scale: float | None = None, discrete_updates: int = 250, switch_loss_ratio: float = 0.1,
                 max_substep: float = 0.1, align_weight: float = 1.0, aux_steps: int = 4, student_steps: int = 1,
                 switch_aux_updates: int = 20, t_min: float = 0.02, t_max: float = 0.98, norm_p: float = 1.0,
                 norm_eps: float = 0.01, time_sampler: str = "fastgen_endpoint", time_mean: float | None = None,
                 time_std: float | None = None, s_neq_t_ratio: float | None = None,
                 endpoint_ratio: float | None = None, jvp: str = "auto", fd_eps: float = 1e-4,
                 latent_cache_mb: float = 0.0):
        t = load_occ_teacher(teacher_snapshot, teacher, with_aux=align_weight > 0, latent_cache_mb=latent_cache_mb)
        super().__init__(t.teacher, flow_map_student(t.student), t.aux, t.prepare,
                         cfg_scale=t.cfg_scale if cfg_scale is None else float(cfg_scale),
                         discrete_updates=discrete_updates, switch_loss_ratio=switch_loss_ratio,
                         max_substep=max_substep, align_weight=align_weight, aux_steps=aux_steps,
                         student_steps=student_steps, switch_aux_updates=switch_aux_updates, t_min=t_min, t_max=t_max,
                         norm_p=norm_p, norm_eps=norm_eps, time_sampler=time_sampler, time_mean=time_mean,
                         time_std=time_std, s_neq_t_ratio=s_neq_t_ratio, endpoint_ratio=endpoint_ratio, jvp=jvp,
                         fd_eps=fd_eps)
        self._remember(t)
