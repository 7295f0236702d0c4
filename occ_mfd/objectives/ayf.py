"""Align Your Flow, AYF-EMD (Sabour, Fidler, Kreis, arXiv 2506.14603), distilled into a one-step flow map: an MFD
Table 1 baseline.

[UNVERIFIED] No official AYF code was available; this follows ``../shared/DISTILLERS.md`` §7 (the paper's Eulerian
map distillation written in our convention, which is algebraically NVlabs FastGen's ``MeanFlowModel`` with
``loss_type="opt_grad"``, ``use_cd=True``, ``norm_method="poly_1.0"``) and §6 for the time sampler. The student
is a two-time flow map u_θ(x, s, t, c) (``occ_mfd.models.flow_map``: a teacher copy with a zero-initialised Δt
path, so it starts as the teacher, X(z, 0, 1) = the teacher's one-step jump). With t = 0 noise, t = 1 data:

    x1 = data (future latents / target samples), n fresh, s ≤ t (below), x_s = (1 − s) n + s x1
    v = v_T^w(x_s, s, c)                                                   (guided teacher; no grad)
    (u⁻, du⁻/ds) = jvp(u_θ, (x_s, s, t), (v, 1, 0))                        (no grad, fp32, math SDPA; §0.6)
    g = u⁻ − v − r_k·(t − s)·du⁻/ds                                         (Eulerian residual, §0.3: the exact
                                                                              map has u = v + (t − s) du/ds)
    ĝ = g / (‖g‖ + c),  ‖·‖ per sample over all elements                     (tangent normalisation, c = 0.1)
    L = w·mean_b ‖u_θ − sg(u_θ − ĝ)‖²   ⇒   ∇L = 2w·ĝ·∇u_θ                  (w ≡ 1)

d/ds is the derivative along the teacher's trajectory (x moves with v as s moves, t fixed). s = t gives g = u − v:
plain flow matching on the teacher; t = 1 gives continuous consistency distillation. r_k = min(1, k/H) warms up
the transport term over the first H student updates (the sCM lesson: the tangent blows up without it), k counted
by a persistent buffer (so it resumes).

Decisions where the spec is [UNVERIFIED]:
* c = 0.1 (sCM; FastGen ``norm_const`` default), H = ``warmup_updates`` (benchmark: 10 % of the budget; sCM 10k).
* Times: ``time_sampler`` (a preset; ``time_mean`` / ``time_std`` / ``s_neq_t_ratio`` / ``endpoint_ratio`` override
  it). a, b ~ sigmoid(N(time_mean, time_std²)), s = min, t = max; then a disjoint fraction 1 − ``s_neq_t_ratio`` of
  the batch gets t := s (plain FM on the teacher) and a fraction ``endpoint_ratio`` gets t := 1 (FastGen's
  ``consistency_ratio`` bucket, r = 0 in its convention: continuous consistency distillation to the data end).
  - ``"fastgen_endpoint"`` (default): FastGen's distillation recipe (``configs/experiments/WanT2V/config_mf.py``,
    DISTILLERS.md §6: logit-normal(+0.8, 1.6) in our convention, always s < t) + 25 % at t = 1.
  - ``"fastgen"``: the same without the t = 1 bucket.
  - ``"meanflow"``: the previous default, MeanFlow's official sampler (logit-normal(+0.4, 1), t := s for 25 %;
    FastGen's CIFAR-10 ``r_sample_ratio`` 0.75), no t = 1 bucket.
  [Decision, measured] The one-step sampler evaluates the map at (s, t) = (0, 1). "meanflow" almost never draws a
  pair near it (P(s < 0.1, t > 0.9) ≈ 0.03 %, vs 2.4 % now), so X(z, 0, 1) is left to extrapolation and drifts as
  the Δt path learns mid-range intervals. benchmarks/distill_study.py, 600 updates, seeds 0–2 (``ayf`` vs
  ``ayf_meanflow``): ED toy 0.295 ± 0.010 → 0.032 ± 0.013; conditional 1.048 ± 0.088 (worse than the start, 0.71)
  → 0.241 ± 0.056. Single-harness runs on the same setups: "fastgen" alone 0.048 ± 0.003 / 0.34 ± 0.06; t = 1 only
  (s ~ U(0, 1), continuous CD) was unstable on the conditional suite (ED 0.6–2.1 between evaluations).
* w ≡ 1 (no adaptive time weighting), the loss summed over elements per sample then averaged over the batch.
* Only AYF-EMD (the main row). AYF-LMD, autoguidance and the adversarial fine-tuning stage are not implemented.
* JVP backend: ``jvp="auto"`` tries ``torch.func.jvp`` and, if forward-mode AD fails for some kernel, falls back
  (with a warning) to a central difference for the rest of the run; ``"func"`` / ``"fd"`` force one.

Data-based (needs the future latents, like CD), no aux flow. Cost per update (§0.7): guided teacher 2F, JVP ≈ 2–3F
(a difference: 2F), student fwd + bwd 3F.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from occ_mfd.flow.guidance import guided
from occ_mfd.flow.path import LinearPath, expand_time, state_dtype
from occ_mfd.models.flow_map import FlowMapEndpoint, FlowMapNet, flow_map_jvp, is_flow_map
from occ_mfd.objectives.base import LossOutput
from occ_mfd.objectives.occ_teacher import OccStudentStage, load_occ_teacher
from occ_mfd.objectives.student_only import StudentOnlyObjective

log = logging.getLogger(__name__)
JVP_CHOICES = ("auto", "func", "fd")
# (time_mean, time_std, s_neq_t_ratio, endpoint_ratio) of each time-sampler preset (see the module doc).
TIME_SAMPLERS = {"fastgen_endpoint": (0.8, 1.6, 1.0, 0.25), "fastgen": (0.8, 1.6, 1.0, 0.0),
                 "meanflow": (0.4, 1.0, 0.75, 0.0)}


class AlignYourFlow(StudentOnlyObjective):
    """AYF-EMD (see the module doc). ``student``: a :class:`~occ_mfd.models.flow_map.FlowMapEndpoint` (the module
    the EMA and the snapshot hold; its ``flow_map`` is u_θ(x, s, t, cond, drop_cond)); the teacher obeys
    ``net(x_t, t, cond, drop_cond=None) -> v``. prepare(batch) -> (x1, cond) with real data x1 (B, ...).

    Args: cfg_scale of the teacher; tangent_c c; warmup_updates H; time_sampler a preset of ``TIME_SAMPLERS``;
    time_mean / time_std of the logit-normal times, s_neq_t_ratio the fraction not at s = t, endpoint_ratio the
    fraction at t = 1 (each None: the preset's); jvp "auto" | "func" | "fd"; fd_eps ε of the difference.
    """

    kind = "ayf"

    def __init__(self, teacher: nn.Module, student: nn.Module, prepare: Callable[[Any], tuple], *,
                 cfg_scale: float = 1.0, tangent_c: float = 0.1, warmup_updates: int = 1000,
                 time_sampler: str = "fastgen_endpoint", time_mean: float | None = None, time_std: float | None = None,
                 s_neq_t_ratio: float | None = None, endpoint_ratio: float | None = None, jvp: str = "auto",
                 fd_eps: float = 1e-4):
        super().__init__()
        if time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"time_sampler must be one of {tuple(TIME_SAMPLERS)}, got {time_sampler!r}")
        preset = TIME_SAMPLERS[time_sampler]
        time_mean, time_std, s_neq_t_ratio, endpoint_ratio = (
            p if v is None else v for v, p in zip((time_mean, time_std, s_neq_t_ratio, endpoint_ratio), preset))
        if not is_flow_map(student):
            raise ValueError(f"AYF trains a two-time flow map: the student must be a models.flow_map.FlowMapEndpoint "
                             f"(a velocity net wrapped by FlowMapNet), got {type(student).__name__}, which has no "
                             f"interval input (s, t)")
        if teacher is student or teacher is student.flow_map:
            raise ValueError("teacher and student must be distinct modules (deep-copy the teacher)")
        if jvp not in JVP_CHOICES:
            raise ValueError(f"jvp must be one of {JVP_CHOICES}, got {jvp!r}")
        if tangent_c <= 0 or warmup_updates < 0 or time_std <= 0 or not 0.0 <= s_neq_t_ratio <= 1.0 or fd_eps <= 0:
            raise ValueError(f"need tangent_c > 0, warmup_updates >= 0, time_std > 0, 0 <= s_neq_t_ratio <= 1, "
                             f"fd_eps > 0; got {tangent_c}, {warmup_updates}, {time_std}, {s_neq_t_ratio}, {fd_eps}")
        if not 0.0 <= endpoint_ratio <= s_neq_t_ratio:
            raise ValueError(f"need 0 <= endpoint_ratio <= s_neq_t_ratio (the t = 1 and the s = t buckets are "
                             f"disjoint); got {endpoint_ratio}, {s_neq_t_ratio}")
        self.teacher, self.student, self.prepare = teacher, student, prepare
        self.teacher.requires_grad_(False).eval()
        self.cfg_scale, self.tangent_c, self.warmup_updates = float(cfg_scale), float(tangent_c), int(warmup_updates)
        self.time_sampler = time_sampler
        self.time_mean, self.time_std, self.s_neq_t_ratio = float(time_mean), float(time_std), float(s_neq_t_ratio)
        self.endpoint_ratio = float(endpoint_ratio)
        self.jvp, self.fd_eps = jvp, float(fd_eps)
        self._jvp_method = "fd" if jvp == "fd" else "func"      # "auto" may switch to "fd" once (see module doc)
        # Student forwards so far (k of the warm-up r_k), kept in checkpoints.
        self.register_buffer("_updates", torch.tensor(0, dtype=torch.long))

    @property
    def flow_map(self) -> nn.Module:
        """u_θ(x, s, t, cond, drop_cond): the student's flow map (a property: registering it twice would duplicate
        its weights in the state_dict)."""
        return self.student.flow_map

    # ---------------------------------------------------------------- contract with the loop: StudentOnlyObjective
    # ---------------------------------------------------------------- pieces
    def generate(self, z: torch.Tensor, cond: Any) -> torch.Tensor:
        """X(z, 0, 1) = z + u(z, 0, 1): the one-step sample, (B, ...) → (B, ...)."""
        return z + self.student(z, torch.zeros(z.shape[0], device=z.device, dtype=z.dtype), cond)

    def warmup(self) -> float:
        """r_k = min(1, k / H) for the k-th student update (1 when H = 0)."""
        return 1.0 if self.warmup_updates == 0 else min(1.0, int(self._updates) / self.warmup_updates)

    def sample_times(self, B: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t), each (B,): logit-normal pair, s = min, t = max; then, from one uniform r per sample, t := s where
        r ≥ s_neq_t_ratio and t := 1 where r < endpoint_ratio (disjoint buckets)."""
        u = torch.sigmoid(self.time_mean + self.time_std * torch.randn(2, B, device=device, dtype=dtype))
        s, t = u.min(0).values, u.max(0).values
        r = torch.rand(B, device=device)
        t = torch.where(r >= self.s_neq_t_ratio, s, t)
        return s, torch.where(r < self.endpoint_ratio, torch.ones_like(t), t)

    def tangent(self, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                cond: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(u⁻ or None, du⁻/ds along (v, 1, 0)), no grad; see :func:`~occ_mfd.models.flow_map.flow_map_jvp`."""
        fn = lambda x_, s_, t_: self.flow_map(x_, s_, t_, cond)  # noqa: E731
        args = ((x_s, s, t), (v, torch.ones_like(s), torch.zeros_like(t)))
        if self._jvp_method == "func":
            try:
                return flow_map_jvp(fn, *args, method="func")
            except (RuntimeError, NotImplementedError) as e:
                if self.jvp != "auto":
                    raise
                log.warning("AYF: torch.func.jvp failed (%s); using a central finite difference (eps=%g) from now on",
                            e, self.fd_eps)
                self._jvp_method = "fd"
        return flow_map_jvp(fn, *args, method="fd", eps=self.fd_eps)

    def residual(self, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Any, r: float,
                 u_now: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """(g, exact): g = u⁻ − v_T^w(x_s, s) − r (t − s) du⁻/ds (B, ...), no grad. u⁻ is the JVP's primal; with the
        difference (no primal) it is ``u_now`` (the same weights' forward, detached) or one more forward."""
        with torch.no_grad():
            v = guided(self.teacher, self.cfg_scale)(x_s, s, cond)
            u_minus, du_ds = self.tangent(x_s, s, t, v, cond)
            exact = u_minus is not None
            if not exact:
                u_minus = u_now.detach() if u_now is not None else self.flow_map(x_s, s, t, cond)
            g = u_minus.to(x_s.dtype) - v - r * expand_time(t - s, x_s) * du_ds.to(x_s.dtype)
        return g, exact

    # ---------------------------------------------------------------- the loss
    def forward(self, batch, phase: str = "student") -> LossOutput:
        x1, cond = self.prepare(batch)[:2]
        dtype = state_dtype(x1.dtype)
        x1 = x1.to(dtype)
        B = x1.shape[0]
        r = self.warmup()
        self._updates.add_(1)
        s, t = self.sample_times(B, x1.device, dtype)
        x_s = LinearPath().interpolate(torch.randn_like(x1), x1, s)             # (B, ...) fresh noise
        u = self.flow_map(x_s, s, t, cond).to(dtype)                           # (B, ...) with grad
        g, _ = self.residual(x_s, s, t, cond, r, u_now=u)
        g_norm = g.flatten(1).norm(dim=1)                                        # (B,)
        g_hat = g / expand_time(g_norm + self.tangent_c, g)
        loss = (u - (u.detach() - g_hat)).pow(2).flatten(1).sum(1).mean()    # value mean ‖ĝ‖², gradient 2 ĝ ∇u
        logs = {"loss": loss.detach(), "g_norm": g_norm.mean(), "warmup_r": r, "interval_mean": (t - s).mean(),
                "nfe_teacher": 1.0 if self.cfg_scale == 1.0 else 2.0, "nfe_aux": 0.0, "nfe_student": 1.0,
                "nfe_jvp": 2.0}   # primal + tangent (func), or the two sides of the difference
        return LossOutput(loss=loss, logs=logs)


def flow_map_student(net: nn.Module, inject_at: str = "time_mlp", dt_path: str = "time_mlp") -> FlowMapEndpoint:
    """A velocity net (a teacher copy) → the flow-map student AYF trains: FlowMapEndpoint(FlowMapNet(net))."""
    return FlowMapEndpoint(FlowMapNet(net, inject_at=inject_at, dt_path=dt_path))


class OccAlignYourFlow(OccStudentStage, AlignYourFlow):
    """AYF-EMD of an OccFM teacher into a one-step flow map: what ``configs/*/ayf.py`` build. The snapshot's "net" is
    the :class:`FlowMapEndpoint` (kind "ayf"), which the one-step pipeline samples exactly.

    Args: teacher_snapshot / teacher (the teacher stage's snapshot or its stored description); cfg_scale (None: the
    teacher's sampler CFG); the rest: see :class:`AlignYourFlow`.
    """

    def __init__(self, teacher_snapshot: str | None = None, teacher: dict | None = None,
                 cfg_scale: float | None = None, tangent_c: float = 0.1, warmup_updates: int = 1000,
                 time_sampler: str = "fastgen_endpoint", time_mean: float | None = None,
                 time_std: float | None = None, s_neq_t_ratio: float | None = None,
                 endpoint_ratio: float | None = None, jvp: str = "auto", fd_eps: float = 1e-4):
        t = load_occ_teacher(teacher_snapshot, teacher, with_aux=False)
        super().__init__(t.teacher, flow_map_student(t.student), t.prepare,
                         cfg_scale=t.cfg_scale if cfg_scale is None else float(cfg_scale), tangent_c=tangent_c,
                         warmup_updates=warmup_updates, time_sampler=time_sampler, time_mean=time_mean,
                         time_std=time_std, s_neq_t_ratio=s_neq_t_ratio, endpoint_ratio=endpoint_ratio, jvp=jvp,
                         fd_eps=fd_eps)
        self._remember(t)
