"""MeanFlow (Geng et al., arXiv 2505.13447), distillation variant: a one-step (and few-step) flow-map student trained
with the MeanFlow identity on the guided teacher's velocity (``../shared/DISTILLERS.md`` §6).

The student is a two-time flow map u_θ(x, s, t, c) (``occ_mfd.models.flow_map``: a teacher copy with a
zero-initialised Δt path, so it starts as the teacher and X(z, 0, 1) is the teacher's one-step jump). The exact
map X(x, s, t) = x + (t − s)·u is constant along a trajectory as its start s moves (§0.3 (M)); differentiating
x_s + (t − s)·u(x_s, s, t) in s gives the MeanFlow identity in our convention (t = 0 noise, t = 1 data):

    u(x_s, s, t) = v(x_s, s) + (t − s)·du/ds,      du/ds = ∂_s u + (∇_x u)·v(x_s, s)        (paper Eq. 6, s ↔ r)

MeanFlow regresses u_θ on the right-hand side with a stop-gradient (paper Eq. 9-10):

    x1 = data, n fresh, s ≤ t (below), x_s = (1 − s) n + s x1
    v⋆ = v_T^w(x_s, s, c)                                   (distillation: the guided teacher, FastGen ``use_cd``)
    (u⁻, du⁻/ds) = jvp(u_θ, (x_s, s, t), (v⋆, 1, 0))        (no grad, fp32, math SDPA; §0.6)
    u_tgt = v⋆ + r_k·(t − s)·du⁻/ds                          (r_k = 1 unless a tangent warm-up is asked for)
    Δ = u_θ(x_s, s, t, c) − sg(u_tgt)
    L = mean_b sg(1 / (‖Δ‖² + ε)^p)·‖Δ‖²,  ‖·‖² summed per sample      (adaptive weight, p = 1, ε = 0.01:
                                                                        Gsunshine/meanflow ``norm_p``, ``norm_eps``)

so the gradient is 2Δ/(‖Δ‖² + ε)^p·∇u_θ. With u⁻ the same weights' value of u_θ, Δ equals (numerically) the
Eulerian residual g = u⁻ − v⋆ − r_k (t − s) du⁻/ds of :class:`~occ_mfd.objectives.ayf.AlignYourFlow`; the two
methods differ in how the residual is normalised (AYF: g/(‖g‖ + c); MeanFlow: the adaptive weight above). This
class reuses AYF's flow-map machinery (student check, time sampler, JVP with its finite-difference fallback,
update counter) and replaces the loss.

Decisions:
* Time sampler default ``"fastgen_endpoint"`` (FastGen's MeanFlow *distillation* recipe, logit-normal(+0.8, 1.6) in
  our convention, always s < t, + 25 % at t = 1), not the official from-scratch sampler ("meanflow":
  logit-normal(+0.4, 1), 25 % at s = t) that DISTILLERS.md §6 names for the benchmark: this project measured that
  the latter almost never draws an interval near (0, 1), the one the one-step sampler uses (P ≈ 0.03 %; AYF's
  study, ``occ_mfd/objectives/ayf.py``), and left the one-step map worse than its start. ``time_sampler="meanflow"``
  (study row ``meanflow_official``) keeps the spec's choice.
* No tangent warm-up by default (``warmup_updates=0``: MeanFlow has none; FastGen's distillation recipe warms the
  tangent over 2000 iterations, available as ``warmup_updates``).

Data-based (needs the future latents), no aux. Cost per update (§0.7): guided teacher 2F, JVP ≈ 2–3F, student
forward + backward 3F.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from occ_mfd.flow.path import LinearPath, state_dtype
from occ_mfd.models.flow_map import require_flow_map
from occ_mfd.objectives.ayf import AlignYourFlow, flow_map_student
from occ_mfd.objectives.base import LossOutput
from occ_mfd.objectives.occ_teacher import OccStudentStage, load_occ_teacher


def adaptive_l2(delta: torch.Tensor, p: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MeanFlow's adaptive L2 (paper §4.3): delta (B, ...) → (mean_b sg(1/(‖Δ_b‖² + ε)^p)·‖Δ_b‖², ‖Δ_b‖² (B,)
    detached), ‖·‖² summed over each sample's elements. The gradient is 2Δ/(‖Δ‖² + ε)^p: scale-free for p = 1."""
    sq = delta.pow(2).flatten(1).sum(1)                                     # (B,)
    w = (sq.detach() + eps).pow(-p)
    return (w * sq).mean(), sq.detach()


class MeanFlow(AlignYourFlow):
    """MeanFlow distillation (see the module doc). ``student``: a :class:`~occ_mfd.models.flow_map.FlowMapEndpoint`;
    the teacher obeys ``net(x_t, t, cond, drop_cond=None) -> v``; prepare(batch) -> (x1, cond) with real data x1.

    Args: cfg_scale of the teacher; norm_p p and norm_eps ε of the adaptive weight; warmup_updates H of an optional
    tangent warm-up r_k = min(1, k/H) (0: none); time_sampler a preset of ``ayf.TIME_SAMPLERS`` and its overrides
    time_mean / time_std / s_neq_t_ratio / endpoint_ratio; jvp "auto" | "func" | "fd"; fd_eps ε of the difference.
    """

    kind = "meanflow"

    def __init__(self, teacher: nn.Module, student: nn.Module, prepare: Callable[[Any], tuple], *,
                 cfg_scale: float = 1.0, norm_p: float = 1.0, norm_eps: float = 0.01, warmup_updates: int = 0,
                 time_sampler: str = "fastgen_endpoint", time_mean: float | None = None,
                 time_std: float | None = None, s_neq_t_ratio: float | None = None,
                 endpoint_ratio: float | None = None, jvp: str = "auto", fd_eps: float = 1e-4):
        require_flow_map(student, type(self).__name__)
        if norm_p < 0 or norm_eps <= 0:
            raise ValueError(f"need norm_p >= 0 and norm_eps > 0, got {norm_p}, {norm_eps}")
        super().__init__(teacher, student, prepare, cfg_scale=cfg_scale, warmup_updates=warmup_updates,
                         time_sampler=time_sampler, time_mean=time_mean, time_std=time_std,
                         s_neq_t_ratio=s_neq_t_ratio, endpoint_ratio=endpoint_ratio, jvp=jvp, fd_eps=fd_eps)
        self.norm_p, self.norm_eps = float(norm_p), float(norm_eps)

    def target(self, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Any,
               u: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """u_tgt = v⋆ + r_k (t − s) du⁻/ds (B, ...), no grad, and its NFE logs. ``u``: u_θ(x_s, s, t) of this update
        (its detached value stands for u⁻ = the JVP's primal, which the difference does not return)."""
        g, _ = self.residual(x_s, s, t, cond, self.warmup(), u_now=u)        # g = u⁻ − v⋆ − r (t − s) du⁻/ds
        return u.detach() - g, {"nfe_teacher": 1.0 if self.cfg_scale == 1.0 else 2.0, "nfe_jvp": 2.0}

    def flow_map_loss(self, x1: torch.Tensor, cond: Any) -> tuple[torch.Tensor, dict]:
        """The adaptive-L2 regression of u_θ(x_s, s, t) on sg(:meth:`target`) for data x1 (B, ...) → (L, logs)."""
        dtype = state_dtype(x1.dtype)
        x1 = x1.to(dtype)
        s, t = self.sample_times(x1.shape[0], x1.device, dtype)
        x_s = LinearPath().interpolate(torch.randn_like(x1), x1, s)             # (B, ...) fresh noise
        u = self.flow_map(x_s, s, t, cond).to(dtype)                           # (B, ...) with grad
        u_tgt, logs = self.target(x_s, s, t, cond, u)
        loss, sq = adaptive_l2(u - u_tgt, self.norm_p, self.norm_eps)
        self._updates.add_(1)
        return loss, {"loss": loss.detach(), "residual_sq": sq.mean(), "interval_mean": (t - s).mean(),
                      "nfe_student": 1.0, "nfe_aux": 0.0, **logs}

    def forward(self, batch, phase: str = "student") -> LossOutput:
        loss, logs = self.flow_map_loss(*self.prepare(batch)[:2])
        return LossOutput(loss=loss, logs=logs)


class OccMeanFlow(OccStudentStage, MeanFlow):
    """MeanFlow distillation of an OccFM teacher into a flow map: what ``configs/*/meanflow.py`` build. The snapshot's
    "net" is the :class:`~occ_mfd.models.flow_map.FlowMapEndpoint` (kind "meanflow"), sampled exactly at one step
    and by the flow-map sampler at more.

    Args: teacher_snapshot / teacher (the teacher stage's snapshot or its stored description); cfg_scale (None: the
    teacher's sampler CFG); latent_cache_mb (> 0 caches the frozen VAE's latents); the rest: see :class:`MeanFlow`.
    """

    def __init__(self, teacher_snapshot: str | None = None, teacher: dict | None = None,
                 cfg_scale: float | None = None, norm_p: float = 1.0, norm_eps: float = 0.01, warmup_updates: int = 0,
                 time_sampler: str = "fastgen_endpoint", time_mean: float | None = None,
                 time_std: float | None = None, s_neq_t_ratio: float | None = None,
                 endpoint_ratio: float | None = None, jvp: str = "auto", fd_eps: float = 1e-4,
                 latent_cache_mb: float = 0.0):
        t = load_occ_teacher(teacher_snapshot, teacher, with_aux=False, latent_cache_mb=latent_cache_mb)
        super().__init__(t.teacher, flow_map_student(t.student), t.prepare,
                         cfg_scale=t.cfg_scale if cfg_scale is None else float(cfg_scale), norm_p=norm_p,
                         norm_eps=norm_eps, warmup_updates=warmup_updates, time_sampler=time_sampler,
                         time_mean=time_mean, time_std=time_std, s_neq_t_ratio=s_neq_t_ratio,
                         endpoint_ratio=endpoint_ratio, jvp=jvp, fd_eps=fd_eps)
        self._remember(t)
