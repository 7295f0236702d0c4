"""Terminal Velocity Matching, TVM (Zhou et al., arXiv 2511.19797), distillation variant: a flow-map student whose
derivative at the *terminal* time matches the teacher's velocity there (``../shared/DISTILLERS.md`` §10).

[UNVERIFIED] lumalabs/tvm is README-only and no paper text was available; this follows DISTILLERS.md §10 (the
ICLR-2026 paper note and the survey in ``../shared/papers/``). The exact flow map X(x, s, t) = x + (t − s)·u(x, s, t)
satisfies the Lagrangian identity ∂_t X(x, s, t) = v(X(x, s, t), t) (its end point moves with the flow). The paper
trains from scratch with an EMA self-proxy of v; the distillation variant puts the guided teacher in its place.
With t = 0 noise, t = 1 data:

    x1 = data, n fresh, s < t (below), x_s = (1 − s) n + s x1
    (u, ∂_t u) = jvp(u_θ, (x_s, s, t), (0, 0, 1))  WITH grad          (reverse over forward mode, fp32, math SDPA)
    ∂_t X = u + (t − s)·∂_t u,   X = x_s + (t − s)·u
    L_TVM = mean_elem (∂_t X − sg(v_T^w(sg(X), t)))²·1[s ≠ t]          (terminal velocity matching)
    L_FM  = mean_elem (u_θ(x_s, s, s) − v_T^w(x_s, s))²                 (the s = t boundary: the map's velocity)
    L = mean_b (L_TVM + L_FM)

Unlike MeanFlow / AYF / SMF / FreeFlow, TVM backpropagates *through* the JVP: ∂L/∂θ contains ∂(∂_t u)/∂θ
(``models.flow_map.flow_map_jvp(with_grad=True)``; with the finite-difference fallback, through both sides of
the difference).

Decisions where the source is silent [UNVERIFIED]:
* The argument of the teacher is stop-gradiented, sg(X) (the spec's choice); the gradient reaches θ only through
  ∂_t X and the FM term.
* Times: the paper's "gap" sampler, s, t = min and max of two sigmoid(N(0, 1)) draws, 0 % at s = t
  (``time_sampler="gap"``, the default, as the spec). The presets of :mod:`occ_mfd.objectives.ayf` are accepted too
  (``"fastgen_endpoint"`` adds 25 % at t = 1, the interval the one-step sampler uses).
* Element means (not sums) in both terms, weight 1 each (``fm_weight``): plain L2 without adaptive weighting.
* Not implemented: the CFG-scaling parameterisation u = w·F with a 1/w² weight (needed only for a random w; the
  teacher's w is fixed here) and the paper's semi-Lipschitz network changes (RMSNorm QK, normalised AdaLN): the
  forecaster lacks them, a divergence risk the spec flags.

Data-based, no aux. Cost per update (§0.7): JVP with backward ≈ 3J, guided teacher twice (2 × 2F), the FM term's
student forward + backward 3F: ≈ 13–15F, the most of the family.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from occ_mfd.flow.guidance import guided
from occ_mfd.flow.path import LinearPath, expand_time, state_dtype
from occ_mfd.models.flow_map import JvpBackend, require_flow_map
from occ_mfd.objectives.ayf import TIME_SAMPLERS, AlignYourFlow, flow_map_student
from occ_mfd.objectives.base import LossOutput
from occ_mfd.objectives.occ_teacher import OccStudentStage, load_occ_teacher

#: TVM's own time sampler (time_mean, time_std, s_neq_t_ratio, endpoint_ratio) beside AYF's presets.
TVM_TIME_SAMPLERS = {"gap": (0.0, 1.0, 1.0, 0.0), **TIME_SAMPLERS}


class TerminalVelocityMatching(AlignYourFlow):
    """TVM distillation (see the module doc). ``student``: a :class:`~occ_mfd.models.flow_map.FlowMapEndpoint`; the
    teacher obeys ``net(x_t, t, cond, drop_cond=None) -> v``; prepare(batch) -> (x1, cond) with real data x1.

    AYF supplies the flow-map plumbing (student check, the min/max logit-normal time sampler, one-step ``generate``,
    update counter); the loss is TVM's. Args: cfg_scale of the teacher; fm_weight of the s = t term; time_sampler a
    preset of ``TVM_TIME_SAMPLERS`` and its overrides; jvp "auto" | "func" | "fd"; fd_eps ε of the difference.
    """

    kind = "tvm"

    def __init__(self, teacher: nn.Module, student: nn.Module, prepare: Callable[[Any], tuple], *,
                 cfg_scale: float = 1.0, fm_weight: float = 1.0, time_sampler: str = "gap",
                 time_mean: float | None = None, time_std: float | None = None, s_neq_t_ratio: float | None = None,
                 endpoint_ratio: float | None = None, jvp: str = "auto", fd_eps: float = 1e-4):
        require_flow_map(student, type(self).__name__)
        if time_sampler not in TVM_TIME_SAMPLERS:
            raise ValueError(f"time_sampler must be one of {tuple(TVM_TIME_SAMPLERS)}, got {time_sampler!r}")
        if fm_weight < 0:
            raise ValueError(f"fm_weight must be >= 0, got {fm_weight}")
        preset = TVM_TIME_SAMPLERS[time_sampler]
        time_mean, time_std, s_neq_t_ratio, endpoint_ratio = (
            p if v is None else v for v, p in zip((time_mean, time_std, s_neq_t_ratio, endpoint_ratio), preset))
        super().__init__(teacher, student, prepare, cfg_scale=cfg_scale, warmup_updates=0, time_sampler="fastgen",
                         time_mean=time_mean, time_std=time_std, s_neq_t_ratio=s_neq_t_ratio,
                         endpoint_ratio=endpoint_ratio, jvp=jvp, fd_eps=fd_eps)
        self.time_sampler, self.fm_weight = time_sampler, float(fm_weight)
        self._jvp_backend = JvpBackend(jvp, fd_eps, what="TVM")

    def terminal_velocity(self, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                          cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(∂_t X, X), each (B, ...), with grad: ∂_t X = u + (t − s) ∂_t u from a JVP along (0, 0, 1) that keeps the
        graph, X = x_s + (t − s) u."""
        fn = lambda x_, s_, t_: self.flow_map(x_, s_, t_, cond)  # noqa: E731
        u, du_dt = self._jvp_backend(fn, (x_s, s, t), (torch.zeros_like(x_s), torch.zeros_like(s),
                                                       torch.ones_like(t)), with_grad=True)
        if u is None:                                       # the difference returns no primal: one more forward
            u = self.flow_map(x_s, s, t, cond)
        gap = expand_time(t - s, x_s)
        return u.to(x_s.dtype) + gap * du_dt.to(x_s.dtype), x_s + gap * u.to(x_s.dtype)

    def forward(self, batch, phase: str = "student") -> LossOutput:
        x1, cond = self.prepare(batch)[:2]
        dtype = state_dtype(x1.dtype)
        x1 = x1.to(dtype)
        s, t = self.sample_times(x1.shape[0], x1.device, dtype)
        x_s = LinearPath().interpolate(torch.randn_like(x1), x1, s)             # (B, ...) fresh noise
        teacher = guided(self.teacher, self.cfg_scale)
        dX_dt, X = self.terminal_velocity(x_s, s, t, cond)
        with torch.no_grad():
            v_end = teacher(X.detach(), t, cond)                                 # v_T^w(sg(X), t)
            v_start = teacher(x_s, s, cond)                                      # v_T^w(x_s, s)
        off_diag = (t > s).to(dtype)                                             # 1[s ≠ t]
        tvm = (dX_dt - v_end).pow(2).flatten(1).mean(1) * off_diag               # (B,)
        u_ss = self.flow_map(x_s, s, s, cond).to(dtype)                          # u_θ(x_s, s, s): dt = 0
        fm = (u_ss - v_start).pow(2).flatten(1).mean(1)                          # (B,)
        loss = (tvm + self.fm_weight * fm).mean()
        self._updates.add_(1)
        cfg = 1.0 if self.cfg_scale == 1.0 else 2.0
        return LossOutput(loss=loss, logs={
            "loss": loss.detach(), "tvm_loss": tvm.detach().mean(), "fm_loss": fm.detach().mean(),
            "interval_mean": (t - s).mean(), "nfe_teacher": 2 * cfg, "nfe_aux": 0.0, "nfe_student": 1.0,
            "nfe_jvp": 2.0})


class OccTerminalVelocityMatching(OccStudentStage, TerminalVelocityMatching):
    """TVM distillation of an OccFM teacher into a flow map: what ``configs/*/tvm.py`` build (snapshot kind "tvm").

    Args: teacher_snapshot / teacher; cfg_scale (None: the teacher's sampler CFG); latent_cache_mb; the rest: see
    :class:`TerminalVelocityMatching`.
    """

    def __init__(self, teacher_snapshot: str | None = None, teacher: dict | None = None,
                 cfg_scale: float | None = None, fm_weight: float = 1.0, time_sampler: str = "gap",
                 time_mean: float | None = None, time_std: float | None = None, s_neq_t_ratio: float | None = None,
                 endpoint_ratio: float | None = None, jvp: str = "auto", fd_eps: float = 1e-4,
                 latent_cache_mb: float = 0.0):
        t = load_occ_teacher(teacher_snapshot, teacher, with_aux=False, latent_cache_mb=latent_cache_mb)
        super().__init__(t.teacher, flow_map_student(t.student), t.prepare,
                         cfg_scale=t.cfg_scale if cfg_scale is None else float(cfg_scale), fm_weight=fm_weight,
                         time_sampler=time_sampler, time_mean=time_mean, time_std=time_std,
                         s_neq_t_ratio=s_neq_t_ratio, endpoint_ratio=endpoint_ratio, jvp=jvp, fd_eps=fd_eps)
        self._remember(t)
