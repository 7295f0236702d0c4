"""Consistency distillation (Song et al. 2023), adapted to flow matching, one step: an MFD Table 1 baseline.

In our convention (t = 0 noise), following ``../shared/DISTILLERS.md`` §5 (the LCM script of
huggingface/diffusers and NVlabs FastGen ``CM.py``):

    f_theta(x, t, c) = x + (1 - t) net_theta(x, t, c)          (boundary f(x, 1) = x built in; f(z, 0) = G(z))
    grid 0 = tau_0 < ... < tau_N = 1 (SD3-shifted), k ~ U{0..N-1}, x1 = data, fresh n:
    x_k = (1 - tau_k) n + tau_k x1
    x̂_{k+1} = x_k + (tau_{k+1} - tau_k) v_T^w(x_k, tau_k, c)                 (one guided teacher Euler step)
    y = f_{theta^-}(x̂_{k+1}, tau_{k+1}, c)   (= x̂_{k+1} at tau_{k+1} = 1),  theta^- an EMA of theta (mu)
    L = mean(sqrt((f_theta(x_k, tau_k, c) - sg y)^2 + c^2) - c)                (pseudo-Huber, c = 1e-3)

The target EMA is a post-step edit, which ``after_backward`` must not do (it runs before the optimiser step):
it is applied lazily at the start of the next ``forward`` (nothing reads the target in between), and a
persistent flag keeps that exact across a resume. It needs real data x1 (the future latents), so it is
exposed to teacher-data mismatch under CFG.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from occ_mfd.flow.guidance import guided
from occ_mfd.flow.path import LinearPath, expand_time, state_dtype
from occ_mfd.flow.time_sampling import time_grid
from occ_mfd.objectives.base import LossOutput
from occ_mfd.objectives.occ_teacher import OccStudentStage, load_occ_teacher
from occ_mfd.objectives.student_only import StudentOnlyObjective


class ConsistencyDistillation(StudentOnlyObjective):
    """One-step consistency distillation; networks obey ``net(x_t, t, cond, drop_cond=None) -> v``.

    prepare(batch) -> (x1, cond) with real data x1 (B, ...). Args: grid_steps N and shift of the teacher's
    grid; target_decay mu of the target EMA; huber_c (0: squared error); cfg_scale of the teacher.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, prepare: Callable[[Any], tuple], *,
                 cfg_scale: float = 1.0, grid_steps: int = 20, shift: float = 3.0, target_decay: float = 0.95,
                 huber_c: float = 1e-3):
        super().__init__()
        if teacher is student:
            raise ValueError("teacher and student must be distinct modules (deep-copy the teacher)")
        if grid_steps < 1 or not 0.0 <= target_decay < 1.0 or huber_c < 0:
            raise ValueError(f"need grid_steps >= 1, 0 <= target_decay < 1, huber_c >= 0; got {grid_steps}, "
                             f"{target_decay}, {huber_c}")
        self.teacher, self.student, self.prepare = teacher, student, prepare
        self.teacher.requires_grad_(False).eval()
        self.target = copy.deepcopy(student).requires_grad_(False)
        self.cfg_scale, self.shift, self.huber_c = float(cfg_scale), float(shift), float(huber_c)
        self.grid_steps, self.target_decay = int(grid_steps), float(target_decay)
        # True once a forward ran: its optimiser step is then pending for the target EMA (kept in checkpoints).
        self.register_buffer("_target_pending", torch.tensor(False))

    kind = "cd"

    def generate(self, z: torch.Tensor, cond: Any) -> torch.Tensor:
        """G(z) = f_theta(z, 0) = z + net(z, 0): the one-step sample."""
        return self.consistency(self.student, z, torch.zeros(z.shape[0], device=z.device, dtype=z.dtype), cond)

    @staticmethod
    def consistency(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """f(x, t) = x + (1 - t) net(x, t): (B, ...) → (B, ...); f(x, 1) = x exactly (selected, not computed: a
        velocity may be infinite at t = 1, e.g. a point mass's (c - x) / (1 - t))."""
        f = x + expand_time(1 - t, x) * guided(net, 1.0)(x, t, cond)
        return torch.where(expand_time(t, x) >= 1, x, f)

    @torch.no_grad()
    def update_target(self) -> None:
        """theta^- ← mu theta^- + (1 - mu) theta (applied lazily, see the module doc)."""
        for p_t, p in zip(self.target.parameters(), self.student.parameters()):
            p_t.lerp_(p.detach(), 1.0 - self.target_decay)

    def forward(self, batch, phase: str = "student") -> LossOutput:
        if bool(self._target_pending):
            self.update_target()
        self._target_pending.fill_(True)
        x1, cond = self.prepare(batch)[:2]
        dtype = state_dtype(x1.dtype)
        x1 = x1.to(dtype)
        B = x1.shape[0]
        grid = time_grid(self.grid_steps, self.shift, device=x1.device, dtype=dtype)
        k = torch.randint(0, self.grid_steps, (B,), device=x1.device)
        tau, tau_next = grid[k], grid[k + 1]
        x_k = LinearPath().interpolate(torch.randn_like(x1), x1, tau)
        with torch.no_grad():
            x_next = x_k + expand_time(tau_next - tau, x_k) * guided(self.teacher, self.cfg_scale)(x_k, tau, cond)
            y = self.consistency(self.target, x_next, tau_next, cond)   # x_next itself where tau_next = 1
        diff = self.consistency(self.student, x_k, tau, cond) - y
        loss = ((diff.pow(2) + self.huber_c ** 2).sqrt() - self.huber_c).mean() if self.huber_c else diff.pow(2).mean()
        logs = {"loss": loss.detach(), "tau_mean": tau.mean(), "nfe_teacher": 1.0 if self.cfg_scale == 1.0 else 2.0,
                "nfe_aux": 1.0}                                           # the target's forward, in the aux slot
        return LossOutput(loss=loss, logs=logs)


class OccConsistencyDistillation(OccStudentStage, ConsistencyDistillation):
    """CD of an OccFM teacher into a one-step student: what ``configs/*/cd.py`` build.

    Args: teacher_snapshot / teacher (the teacher stage's snapshot or its stored description); cfg_scale (None:
    the teacher's sampler CFG); grid_steps, shift, target_decay, huber_c: see :class:`ConsistencyDistillation`.
    """

    def __init__(self, teacher_snapshot: str | None = None, teacher: dict | None = None,
                 cfg_scale: float | None = None, grid_steps: int = 20, shift: float = 3.0,
                 target_decay: float = 0.95, huber_c: float = 1e-3, latent_cache_mb: float = 0.0):
        t = load_occ_teacher(teacher_snapshot, teacher, with_aux=False, latent_cache_mb=latent_cache_mb)
        super().__init__(t.teacher, t.student, t.prepare, cfg_scale=t.cfg_scale if cfg_scale is None else cfg_scale,
                         grid_steps=grid_steps, shift=shift, target_decay=target_decay, huber_c=huber_c)
        self._remember(t)
