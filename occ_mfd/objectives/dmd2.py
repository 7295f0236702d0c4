"""DMD2's distribution-matching generator loss (Yin et al. 2024, arXiv 2405.14867), without its GAN head.

One of the MFD paper's Table 1 baselines, on the same contract as MFD (teacher, one-step student, aux / "fake"
flow trained by flow matching on student samples; ``phase(step)`` alternates them). In our convention
(t = 0 noise), following ``../shared/DISTILLERS.md`` §2 (tianweiy/DMD2 ``compute_distribution_matching_loss``,
NVlabs FastGen ``variational_score_distillation_loss``):

    x1 = G(z);  t ~ U(t_min, t_max);  x_t = (1 - t) n + t sg(x1) with fresh n       (no gradient through x_t)
    x̂_T = x_t + (1 - t) v_T^w(x_t, t),   x̂_A = x_t + (1 - t) v_A(x_t, t)            (data predictions)
    w = mean_elements |x1 - x̂_T| per sample (fp32, + 1e-6);   g = (x̂_A - x̂_T) / w
    L = ½ mean((x1 - sg(x1 - g))²)   ⇒   dL/dx1 = g / numel: descent moves x1 along x̂_T - x̂_A.

Differences from VSD / Diff-Instruct: the data-prediction (1 - t) weighting, the per-sample normalisation w,
and the gradient applied at x1 instead of through x_t. Defaults: t ∈ [0.02, 0.98] (DMD2's step range), fake
updates 4 per generator update (FastGen ``student_update_freq=5``; tianweiy/DMD2 uses 5:1, see DISTILLERS.md
F4), the fake flow without guidance. The optional diffusion-GAN head is not implemented (it needs real data;
DISTILLERS.md §2 makes "DMD2" the no-GAN row).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from occ_mfd.flow.guidance import guided
from occ_mfd.flow.path import LinearPath, expand_time, state_dtype
from occ_mfd.objectives.base import LossOutput
from occ_mfd.objectives.mfd import MeanFlowDistillation
from occ_mfd.objectives.occ_teacher import OccStudentStage, load_occ_teacher


class DistributionMatchingDistillation(MeanFlowDistillation):
    """DMD2 generator loss; the aux ("fake") phase, schedule, student and groups are MFD's (see module doc)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, aux: nn.Module, prepare: Callable[[Any], tuple],
                 *, cfg_scale: float = 1.0, aux_steps: int = 4, student_steps: int = 1, t_min: float = 0.02,
                 t_max: float = 0.98, student_time: float = 0.0):
        super().__init__(teacher, student, aux, prepare, cfg_scale=cfg_scale, aux_steps=aux_steps,
                         student_steps=student_steps, student_time=student_time)
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)

    @property
    def kind(self) -> str:
        return "dmd2"

    def distribution_matching_loss(self, x1: torch.Tensor, n: torch.Tensor, t: torch.Tensor,
                                   cond: Any) -> tuple[torch.Tensor, dict]:
        """L for student samples x1 (with grad), fresh noise n and times t (B,)."""
        with torch.no_grad():
            x_t = LinearPath().interpolate(n, x1.detach(), t)                               # (B, ...)
            one_minus_t = expand_time(1 - t, x_t)
            x_teacher = x_t + one_minus_t * guided(self.teacher, self.cfg_scale)(x_t, t, cond)
            x_fake = x_t + one_minus_t * guided(self.aux, 1.0)(x_t, t, cond)
            w = (x1.detach() - x_teacher).abs().flatten(1).mean(1).float() + 1e-6          # (B,)
            g = torch.nan_to_num((x_fake - x_teacher) / expand_time(w, x_t))
        loss = 0.5 * (x1 - (x1 - g).detach()).pow(2).mean()
        logs = {"loss": loss.detach(), "dm_grad_norm": g.flatten(1).norm(dim=1).mean(),
                "nfe_teacher": 1.0 if self.cfg_scale == 1.0 else 2.0, "nfe_aux": 1.0}
        return loss, logs

    def generator_step(self, batch) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor, dict]:
        """The generator update's draws and loss: z ~ N(0, I), x1 = G(z), fresh noise, t ~ U(t_min, t_max) →
        (z, x1, cond, L, logs); SenseFlow adds its terms to the same z and x1."""
        x_like, cond = self.prepare(batch)[:2]
        dtype = state_dtype(x_like.dtype)
        z = torch.randn(x_like.shape, device=x_like.device, dtype=dtype)
        x1 = self.generate(z, cond).to(dtype)
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(x1.shape[0], device=x1.device, dtype=dtype)
        loss, logs = self.distribution_matching_loss(x1, torch.randn_like(z), t, cond)
        return z, x1, cond, loss, logs

    def forward(self, batch, phase: str) -> LossOutput:
        if phase != "student":
            return super().forward(batch, phase)                       # the fake flow's FM on student samples
        loss, logs = self.generator_step(batch)[3:]
        return LossOutput(loss=loss, logs=logs)


class OccDMD2(OccStudentStage, DistributionMatchingDistillation):
    """DMD2 of an OccFM teacher into a one-step student: what ``configs/*/dmd2.py`` build.

    Args:
        teacher_snapshot / teacher: the teacher stage's snapshot (file or work dir), or its stored description.
        cfg_scale: the teacher's guidance in the loss (None: its sampler's). aux_steps, student_steps, t_min,
            t_max, student_time: see :class:`DistributionMatchingDistillation`.
    """

    def __init__(self, teacher_snapshot: str | None = None, teacher: dict | None = None,
                 cfg_scale: float | None = None, aux_steps: int = 4, student_steps: int = 1, t_min: float = 0.02,
                 t_max: float = 0.98, student_time: float = 0.0, latent_cache_mb: float = 0.0):
        t = load_occ_teacher(teacher_snapshot, teacher, latent_cache_mb=latent_cache_mb)
        super().__init__(t.teacher, t.student, t.aux, t.prepare,
                         cfg_scale=t.cfg_scale if cfg_scale is None else float(cfg_scale), aux_steps=aux_steps,
                         student_steps=student_steps, t_min=t_min, t_max=t_max, student_time=student_time)
        self._remember(t)
